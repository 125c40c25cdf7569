"""Tests for the hash-chained, group-committed session journal.

Every test writes a real journal file with real fsync calls. The disk-full tests mount a
64 KiB tmpfs, which needs root, and unmount it in a `finally` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import RecordingFailed
from appliance.recordings import journal as journal_module
from appliance.recordings.journal import (
    Journal,
    canonical,
    event_hash,
    genesis_hash,
    read,
    verify_chain,
)

SESSION_ID = "sess-journal-test"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tiny_tmpfs(size: str = "64k") -> Iterator[Path]:
    """Mount a tmpfs of `size` on a fresh directory and remove both afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="journal-tmpfs-"))
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                       check=True, capture_output=True)
        mounted = True
        yield directory
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True, capture_output=True)
        directory.rmdir()


def fill_filesystem(directory: Path) -> None:
    """Write a filler file until the file system under `directory` has no space left."""
    with open(directory / "filler", "wb", buffering=0) as filler:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                filler.write(block)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "journal" / f"{SESSION_ID}.jsonl", SESSION_ID)
    try:
        yield opened
    finally:
        opened.close()
        opened.release()


def write_events(journal: Journal, count: int) -> list[dict[str, Any]]:
    """Append `count` request events, close the journal and return what reads back."""
    for number in range(count):
        journal.append_sync({"kind": "request", "path": f"/call/{number}"})
    journal.close()
    return read(journal.path).events


# -- chain ---------------------------------------------------------------------------------------


def test_appended_chain_verifies(journal: Journal) -> None:
    events = write_events(journal, 5)

    assert len(events) == 5
    assert [event["seq"] for event in events] == [0, 1, 2, 3, 4]
    assert events[0]["prev_hash"] == genesis_hash(SESSION_ID)
    assert verify_chain(SESSION_ID, events) == []


def test_event_hash_covers_canonical_body(journal: Journal) -> None:
    events = write_events(journal, 2)
    lines = journal.path.read_bytes().splitlines()

    for event, line in zip(events, lines, strict=True):
        body = {key: value for key, value in event.items() if key != "hash"}
        assert event_hash(body) == event["hash"]
        assert canonical(event) == line


def test_journal_file_mode_is_0600(journal: Journal) -> None:
    write_events(journal, 1)

    assert journal.path.stat().st_mode & 0o777 == 0o600


def test_journal_counts_and_last_hash(journal: Journal) -> None:
    events = write_events(journal, 3)

    assert journal.count == 3
    assert journal.last_hash == events[-1]["hash"]


def edit_field(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events[1]["path"] = "/call/edited"
    return events


def delete_event(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    del events[2]
    return events


def reorder_two(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events[1], events[2] = events[2], events[1]
    return events


def insert_event(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    forged = {"kind": "request", "path": "/forged", "session_id": SESSION_ID, "seq": 2,
              "ts_ns": events[1]["ts_ns"], "prev_hash": events[1]["hash"]}
    forged["hash"] = event_hash(forged)
    events.insert(2, forged)
    return events


def change_session_id(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events[0]["session_id"] = "another-session"
    return events


def drop_last_event(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Each event names only the one before it, so dropping trailing events leaves a valid chain.
    # Such truncation shows only against the last hash that the catalog keeps.
    return events[:-1]


TAMPERING = [
    pytest.param(edit_field, "was edited", id="edit-field"),
    pytest.param(delete_event, "deleted, inserted or reordered", id="delete-event"),
    pytest.param(reorder_two, "deleted, inserted or reordered", id="reorder-two"),
    pytest.param(insert_event, "deleted, inserted or reordered", id="insert-event"),
    pytest.param(change_session_id, "belongs to session another-session",
                 id="change-session-id"),
]


@pytest.mark.parametrize(("tamper", "expected"), TAMPERING)
def test_verify_chain_detects_tampering(
    journal: Journal, tamper: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    expected: str,
) -> None:
    events = write_events(journal, 5)

    problems = verify_chain(SESSION_ID, tamper(copy.deepcopy(events)))

    assert problems != []
    assert any(expected in problem for problem in problems), problems


def test_verify_chain_prefix_stays_valid(journal: Journal) -> None:
    events = write_events(journal, 5)

    assert verify_chain(SESSION_ID, drop_last_event(events)) == []


def test_verify_chain_rejects_other_genesis(journal: Journal) -> None:
    events = write_events(journal, 3)

    problems = verify_chain("another-session", events)

    assert any("prev_hash does not match" in problem for problem in problems)


# -- torn tail -----------------------------------------------------------------------------------


TORN_TAILS = [
    pytest.param(b'{"kind":"request","seq":3', id="half-object-no-newline"),
    pytest.param(b'{"kind":"request","seq":3}', id="whole-object-no-newline"),
    pytest.param(b'{"kind":"request","se\n', id="half-object-with-newline"),
]


@pytest.mark.parametrize("tail", TORN_TAILS)
def test_read_excludes_torn_tail(journal: Journal, tail: bytes) -> None:
    events = write_events(journal, 3)
    intact = journal.path.stat().st_size
    with open(journal.path, "ab") as handle:
        handle.write(tail)

    contents = read(journal.path)

    assert contents.events == events
    assert contents.torn_tail == tail.rstrip(b"\n")
    assert contents.intact_length == intact
    assert contents.problems == []


def test_read_clean_journal_has_no_tail(journal: Journal) -> None:
    write_events(journal, 2)

    contents = read(journal.path)

    assert contents.torn_tail is None
    assert contents.intact_length == journal.path.stat().st_size


def test_read_reports_invalid_middle_line(journal: Journal) -> None:
    write_events(journal, 1)
    with open(journal.path, "ab") as handle:
        handle.write(b"not json\n")
        handle.write(journal.path.read_bytes().splitlines()[0] + b"\n")

    contents = read(journal.path)

    assert len(contents.events) == 2
    assert contents.torn_tail is None
    assert len(contents.problems) == 1
    assert contents.problems[0].startswith("line 2:")


# -- concurrency and group commit ----------------------------------------------------------------


def test_concurrent_appends_form_one_chain(journal: Journal) -> None:
    tasks_count, threads_count, per_thread = 100, 4, 50

    def append_from_thread(thread_number: int) -> None:
        for number in range(per_thread):
            journal.append_sync({"kind": "request", "path": f"/thread/{thread_number}/{number}"})

    async def append_from_tasks() -> None:
        await asyncio.gather(*(journal.append({"kind": "request", "path": f"/task/{number}"})
                               for number in range(tasks_count)))

    threads = [threading.Thread(target=append_from_thread, args=(n,))
               for n in range(threads_count)]
    for thread in threads:
        thread.start()
    asyncio.run(append_from_tasks())
    for thread in threads:
        thread.join()
    journal.close()

    events = read(journal.path).events
    total = tasks_count + threads_count * per_thread
    assert [event["seq"] for event in events] == list(range(total))
    assert verify_chain(SESSION_ID, events) == []
    assert len({event["path"] for event in events}) == total


def test_group_commit_shares_fsyncs(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    journal_fsyncs: list[int] = []

    def counting_fsync(fd: int) -> None:
        real_fsync(fd)
        if threading.current_thread().name == f"journal-{SESSION_ID}":
            journal_fsyncs.append(fd)

    monkeypatch.setattr(journal_module.os, "fsync", counting_fsync)

    async def append_all() -> None:
        await asyncio.gather(*(journal.append({"kind": "request", "path": f"/{n}"})
                               for n in range(200)))

    asyncio.run(append_all())

    assert len(read(journal.path).events) == 200
    assert 1 <= len(journal_fsyncs) < 200


def test_append_waits_for_fsync(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    release = threading.Event()

    def blocking_fsync(fd: int) -> None:
        release.wait(timeout=10)
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "fsync", blocking_fsync)
    finished = threading.Event()

    def append_and_signal() -> None:
        journal.append_sync({"kind": "request"})
        finished.set()

    appender = threading.Thread(target=append_and_signal)
    appender.start()
    try:
        assert not finished.wait(timeout=0.2)
    finally:
        release.set()
        appender.join(timeout=10)
    assert finished.is_set()


def test_append_after_close_raises(journal: Journal) -> None:
    journal.close()

    with pytest.raises(RecordingFailed, match="is closed"):
        journal.append_sync({"kind": "request"})


def test_append_during_close_fails(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    release = threading.Event()

    def blocking_fsync(fd: int) -> None:
        release.wait(timeout=10)
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "fsync", blocking_fsync)
    outcome: list[BaseException | None] = []

    def append_late() -> None:
        try:
            journal.append_sync({"kind": "request", "path": "/late"}, timeout=1)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - the test inspects the type below.
            outcome.append(error)

    first = threading.Thread(target=journal.append_sync, args=({"kind": "request"},))
    closer = threading.Thread(target=journal.close)
    late = threading.Thread(target=append_late)
    try:
        first.start()
        time.sleep(0.1)  # The writer is now inside the blocked fsync.
        closer.start()
        time.sleep(0.1)  # close() has queued its stop marker and waits for the writer.
        late.start()
        time.sleep(0.1)
    finally:
        release.set()
        for thread in (first, closer, late):
            thread.join(timeout=10)

    assert len(outcome) == 1
    assert isinstance(outcome[0], RecordingFailed), outcome


# -- write failure -------------------------------------------------------------------------------


@needs_root
def test_disk_full_fails_every_append() -> None:
    with tiny_tmpfs() as directory:
        journal = Journal(directory / "journal" / f"{SESSION_ID}.jsonl", SESSION_ID)
        try:
            journal.append_sync({"kind": "session_start"})
            fill_filesystem(directory)

            with pytest.raises(RecordingFailed, match="No space left on device"):
                journal.append_sync({"kind": "request", "detail": "x" * 16384})

            assert journal.failed
            for _ in range(3):
                with pytest.raises(RecordingFailed):
                    journal.append_sync({"kind": "request"})
        finally:
            journal.close()
            journal.release()


@needs_root
def test_disk_full_fails_pending_futures() -> None:
    async def append_many(journal: Journal) -> list[BaseException | None]:
        appends = [journal.append({"kind": "request", "detail": "y" * 4096})
                   for _ in range(50)]
        return await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True),
                                      timeout=10)

    with tiny_tmpfs() as directory:
        journal = Journal(directory / "journal" / f"{SESSION_ID}.jsonl", SESSION_ID)
        try:
            fill_filesystem(directory)

            outcomes = asyncio.run(append_many(journal))

            assert all(isinstance(outcome, RecordingFailed) for outcome in outcomes), outcomes
        finally:
            journal.close()
            journal.release()


@needs_root
def test_failure_message_names_journal() -> None:
    with tiny_tmpfs() as directory:
        journal = Journal(directory / "journal" / f"{SESSION_ID}.jsonl", SESSION_ID)
        try:
            fill_filesystem(directory)

            with pytest.raises(RecordingFailed) as raised:
                journal.append_sync({"kind": "request", "detail": "z" * 16384})

            assert str(journal.path) in str(raised.value)
            assert os.strerror(errno.ENOSPC) in str(raised.value)
        finally:
            journal.close()
            journal.release()
