"""The per-session journal: an append-only, hash-chained, fsynced JSON Lines file.

Each line is one event, encoded canonically (sorted keys, no spaces, UTF-8) and carrying
`prev_hash` (the hash of the event before it, or the session's genesis hash) and `hash`
(SHA-256 over `prev_hash` and the canonical event without `hash`). An edit, deletion or
reordering of lines breaks the chain; a final line without its newline is a torn write.

The file holds an exclusive flock from creation until `release`, which tells recovery that its
process is alive. Beside it, `<session_id>.head` holds the signed head of the chain (event count
and last hash), rewritten after every fsync and before any append of that batch resolves: cutting
acknowledged events off the end of a journal then shows, because the head still names them. Writes go through one writer thread that batches whatever is queued into a single write and
fsync (group commit), so concurrent requests share fsyncs. `append` resolves only after the
event's fsync returned: record before forward. After any write failure the journal refuses
every later append, because the chain on disk may end in a torn record.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import RecordingFailed, StoreError

if TYPE_CHECKING:
    from appliance.recordings.signing import Signer, Verifier

logger = logging.getLogger(__name__)


def canonical(event: dict[str, Any]) -> bytes:
    """Encode `event` the one way its hash is computed over."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def genesis_hash(session_id: str) -> str:
    return hashlib.sha256(f"appliance-session:{session_id}".encode()).hexdigest()


def event_hash(event: dict[str, Any]) -> str:
    """Return the chain hash of `event`, which must contain `prev_hash` and not `hash`."""
    return hashlib.sha256(canonical(event)).hexdigest()


HEAD_TYPE = "journal_head"
# The head is rewritten in place at a fixed size, so a shorter head never leaves old bytes.
_HEAD_SIZE = 512


def head_path(journal_path: Path) -> Path:
    return journal_path.with_suffix(".head")


@dataclass
class _Pending:
    line: bytes
    seq: int
    hash: str
    future: Future[None] = field(default_factory=Future)


class Journal:
    """Appends events for one session; safe to call from the event loop and other threads."""

    def __init__(self, path: Path, session_id: str, signer: Signer | None = None) -> None:
        self.path = path
        self.session_id = session_id
        self._signer = signer
        self._head_fd = -1
        self._lock = threading.Lock()
        self._seq = 0
        self._last_hash = genesis_hash(session_id)
        self._failure: str | None = None
        self._closing = False
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Locked before it gets its final name, so recovery in another process never
            # mistakes a journal being created for one whose process died.
            partial = path.with_suffix(".creating")
            self._fd = os.open(partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                               | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if signer is not None:
                self._head_fd = os.open(head_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                        | os.O_CLOEXEC, 0o600)
                self._write_head(0, self._last_hash)
            os.rename(partial, path)
            fsync_directory(path.parent)
        except OSError as error:
            raise StoreError(f"Cannot create journal {path}: {error.strerror}. Check that the "
                             "store directory exists, is writable by root and has free space.") \
                from error
        self._writer = threading.Thread(target=self._write_loop, name=f"journal-{session_id}",
                                        daemon=True)
        self._writer.start()

    @property
    def count(self) -> int:
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._last_hash

    def _chain(self, event: dict[str, Any]) -> _Pending:
        """Assign sequence number, timestamp and hashes under the lock, in append order."""
        with self._lock:
            if self._failure is not None:
                raise RecordingFailed(self._failure)
            event = dict(event)
            event["session_id"] = self.session_id
            event["seq"] = self._seq
            event.setdefault("ts_ns", time.time_ns())
            event["prev_hash"] = self._last_hash
            event["hash"] = event_hash(event)
            pending = _Pending(canonical(event) + b"\n", self._seq, event["hash"])
            self._queue.put(pending)
            self._seq += 1
            self._last_hash = event["hash"]
            return pending

    def append_sync(self, event: dict[str, Any], timeout: float = 30.0) -> None:
        """Append `event` and block until it is durable; raise RecordingFailed otherwise."""
        self._chain(event).future.result(timeout=timeout)

    async def append(self, event: dict[str, Any]) -> None:
        """Append `event` and wait, without blocking the event loop, until it is durable."""
        pending = self._chain(event)
        await asyncio.wrap_future(pending.future)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write_batch(batch)
            if stop:
                return

    def _write_batch(self, batch: list[_Pending]) -> None:
        if self._failure is None or self._closing:
            data = b"".join(p.line for p in batch)
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
                if self._signer is not None:
                    self._write_head(batch[-1].seq + 1, batch[-1].hash)
            except OSError as error:
                with self._lock:
                    self._closing = False
                    self._failure = (
                        f"Writing journal {self.path} failed: {error.strerror}. The recording "
                        "is stopped and no further request is forwarded; free disk space or fix "
                        "the store, then start a new session."
                    )
                logger.error("Session %s: %s", self.session_id, self._failure)
        for pending in batch:
            if self._failure is None or self._closing:
                pending.future.set_result(None)
            else:
                pending.future.set_exception(RecordingFailed(self._failure))

    def _write_head(self, events: int, last_hash: str) -> None:
        """Sign and store the chain's head; not fsynced, because a head that a power loss
        leaves stale only understates the journal, which was fsynced first."""
        assert self._signer is not None
        document = {"type": HEAD_TYPE, "session_id": self.session_id, "events": events,
                    "last_hash": last_hash}
        signed = {**document, "key_id": self._signer.key_id,
                  "signature": self._signer.sign(document)}
        os.pwrite(self._head_fd, canonical(signed).ljust(_HEAD_SIZE) + b"\n", 0)

    def close(self) -> None:
        """Flush what is queued and stop writing; the file and its lock stay open.

        An append racing with close either lands before the stop marker or raises
        RecordingFailed; it never waits forever.
        """
        with self._lock:
            if self._failure is None:
                self._failure = f"Journal {self.path} is closed."
                self._closing = True
            if self._writer.is_alive():
                self._queue.put(None)
        self._writer.join()

    def release(self) -> None:
        """Close the file, which drops the liveness lock."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._head_fd >= 0:
            os.close(self._head_fd)
            self._head_fd = -1

    @property
    def failed(self) -> bool:
        return self._failure is not None


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class JournalContents:
    """The events read back from a journal, and what was wrong with it."""

    events: list[dict[str, Any]]
    torn_tail: bytes | None = None
    problems: list[str] = field(default_factory=list)
    intact_length: int = 0  # bytes before the torn tail


def read(path: Path) -> JournalContents:
    """Read every complete event of a journal.

    A final line without its newline, or one that is not valid JSON, is a torn write: it is
    excluded from the events and returned in `torn_tail`. Invalid lines elsewhere are reported
    in `problems` and skipped, never silently kept.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # empty when the file ends with a newline
    contents = JournalContents(events=[], torn_tail=tail or None,
                               intact_length=len(data) - len(tail))
    for number, line in enumerate(lines, start=1):
        try:
            event = json.loads(line)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if number == len(lines) and contents.torn_tail is None:
                contents.torn_tail = line
                contents.intact_length -= len(line) + 1
            else:
                contents.problems.append(f"line {number}: not a valid event ({error})")
            continue
        contents.events.append(event)
    return contents


def verify_chain(session_id: str, events: list[dict[str, Any]]) -> list[str]:
    """Check sequence numbers and hashes of `events`; return one message per failure."""
    problems = []
    expected_prev = genesis_hash(session_id)
    for position, event in enumerate(events):
        seq = event.get("seq")
        if seq != position:
            problems.append(f"event {position}: sequence number is {seq}, expected {position} "
                            "(an event was deleted, inserted or reordered)")
        if event.get("session_id") != session_id:
            problems.append(f"event {position}: belongs to session {event.get('session_id')}")
        if event.get("prev_hash") != expected_prev:
            problems.append(f"event {position}: prev_hash does not match the event before it "
                            "(an event was deleted, inserted or reordered)")
        body = {k: v for k, v in event.items() if k != "hash"}
        if event_hash(body) != event.get("hash"):
            problems.append(f"event {position}: hash does not match its content (the event "
                            "was edited)")
        expected_prev = str(event.get("hash"))
    return problems


def check_head(journal_path: Path, session_id: str, events: list[dict[str, Any]],
               verifier: Verifier) -> list[tuple[str, str]]:
    """Compare a journal's events with its signed head; return (kind, message) per problem.

    Kinds: `head_missing` (no head file, as for journals of older appliances), `head_invalid`
    (unreadable, for another session, or a signature that does not verify), `journal_truncated`
    (the head covers more events than the journal holds) and `journal_rewritten` (the event the
    head ends at has another hash).
    """
    path = head_path(journal_path)
    try:
        head = json.loads(path.read_bytes())
        if not isinstance(head, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return [("head_missing", (f"journal {journal_path.name} has no signed head "
                                  f"({path.name}), so truncation at a record boundary "
                                  "cannot be detected"))]
    except (OSError, ValueError) as error:
        return [("head_invalid", f"the signed head {path.name} is unreadable ({error})")]
    document = {"type": HEAD_TYPE, "session_id": head.get("session_id"),
                "events": head.get("events"), "last_hash": head.get("last_hash")}
    if head.get("session_id") != session_id or not isinstance(head.get("events"), int) \
            or not verifier.verify(document, str(head.get("signature"))):
        return [("head_invalid", (f"the signed head {path.name} does not verify with key "
                                  f"{verifier.key_id} (it was edited, forged or belongs to "
                                  "another session)"))]
    signed_events = int(head["events"])
    if signed_events > len(events):
        return [("journal_truncated",
                 (f"the journal was truncated: its signed head covers {signed_events} events, "
                  f"the journal holds {len(events)} (events seq {len(events)} to "
                  f"{signed_events - 1} are missing)"))]
    expected = events[signed_events - 1].get("hash") if signed_events else \
        genesis_hash(session_id)
    if expected != head.get("last_hash"):
        return [("journal_rewritten",
                 (f"the journal was rewritten: event seq {signed_events - 1} does not have the "
                  "hash its signed head names"))]
    return []


def is_live(path: Path) -> bool:
    """Tell whether a process holds the journal's liveness lock, without taking any lock.

    Reads /proc/locks, so a query never makes recovery in another process mistake a dead
    session's journal for a live one.
    """
    try:
        info = os.stat(path)
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(line.split()[1] == "FLOCK" and wanted in line.split()
               for line in locks.splitlines() if len(line.split()) > 5)
