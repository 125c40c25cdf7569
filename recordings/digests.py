"""The store's signed digest chain: one JSON line per sealed, migrated or pruned session.

`digests.jsonl` in the store holds, in order, one entry per event of the store's history:

    type "session"  a session was sealed (or signed when an older store was migrated): its id,
                    status, Parquet file path, SHA-256 and size, event count and count per kind,
                    first and last event timestamps, the hash of its last event, and the
                    schema version it was written with
    type "prune"    a sealed session was removed by the retention policy: which digest it
                    removes, and why

Each entry carries `index` (its position), `prev_digest_hash` (the `digest_hash` of the entry
before it, or a genesis value derived from the key id), `key_id`, `digest_hash` (SHA-256 over
the canonical entry without `digest_hash` and `signature`) and `signature` (Ed25519 over the
same bytes). Editing, forging, deleting, inserting or reordering an entry breaks a signature or
the chain; deleting a session's file while its entry stays shows as a missing file.

Appends are made under the catalog lock, so entries from concurrent sessions never interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import StoreError
from appliance.recordings.journal import canonical
from appliance.recordings.signing import Signer

DIGESTS_NAME = "digests.jsonl"
SESSION = "session"
PRUNE = "prune"
_TAIL_BYTES = 1 << 16


def genesis(key_id: str) -> str:
    return hashlib.sha256(f"appliance-digest-chain:{key_id}".encode()).hexdigest()


def body_of(entry: dict[str, Any]) -> dict[str, Any]:
    """Return the signed part of an entry."""
    return {k: v for k, v in entry.items() if k not in ("digest_hash", "signature")}


def digest_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def session_facts(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise a session's events the way its digest records them."""
    kinds = Counter(str(event.get("kind")) for event in events)
    stamps = [event["ts_ns"] for event in events if isinstance(event.get("ts_ns"), int)]
    return {
        "events": len(events),
        "event_kinds": dict(sorted(kinds.items())),
        "first_ts_ns": min(stamps) if stamps else None,
        "last_ts_ns": max(stamps) if stamps else None,
        "last_hash": events[-1].get("hash") if events else None,
    }


@dataclass
class DigestFile:
    """The entries read back from a digest chain file, and lines that were not entries."""

    entries: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    torn_tail: bytes | None = None


def read(path: Path) -> DigestFile:
    """Read every entry; a missing file is an empty chain."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return DigestFile([])
    except OSError as error:
        raise StoreError(f"Cannot read the digest chain {path}: {error.strerror}.") from error
    lines = data.split(b"\n")
    tail = lines.pop()
    result = DigestFile([], torn_tail=tail or None)
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError as error:
            result.problems.append(f"line {number} is not a digest entry ({error})")
            continue
        if not isinstance(entry, dict):
            result.problems.append(f"line {number} is not a digest entry (not a JSON object)")
            continue
        result.entries.append(entry)
    return result


def _last_entry(path: Path) -> tuple[dict[str, Any] | None, int]:
    """Return the last complete entry and the file length up to its end (a torn tail cut)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _TAIL_BYTES))
            chunk = handle.read()
    except FileNotFoundError:
        return None, 0
    end = chunk.rfind(b"\n")
    if end < 0:
        if size > len(chunk):
            raise StoreError(f"The digest chain {path} has a last entry longer than "
                             f"{_TAIL_BYTES} bytes; it was not written by the appliance.")
        return None, 0
    start = chunk.rfind(b"\n", 0, end) + 1
    if start == 0 and size > len(chunk):
        raise StoreError(f"The digest chain {path} has a last entry longer than "
                         f"{_TAIL_BYTES} bytes; it was not written by the appliance.")
    try:
        entry = json.loads(chunk[start:end])
    except ValueError as error:
        raise StoreError(f"The last entry of the digest chain {path} is not valid JSON "
                         f"({error}); run 'appliance sessions verify --all' and restore the "
                         "file from a copy.") from error
    return entry, size - (len(chunk) - end - 1)


def append(path: Path, signer: Signer, body: dict[str, Any]) -> dict[str, Any]:
    """Chain, sign and durably append one entry; the caller holds the catalog lock.

    A torn final line (a write cut off by a crash) is cut away first: it was never acknowledged,
    and the session it described still has its journal, so it is sealed again.
    """
    last, intact = _last_entry(path)
    entry = dict(body)
    entry["index"] = int(last["index"]) + 1 if last else 0
    entry["key_id"] = signer.key_id
    entry["prev_digest_hash"] = last["digest_hash"] if last else genesis(signer.key_id)
    signed = body_of(entry)
    entry["digest_hash"] = digest_hash(signed)
    entry["signature"] = signer.sign(signed)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != intact:
                os.ftruncate(fd, intact)
            os.lseek(fd, 0, os.SEEK_END)
            line = canonical(entry) + b"\n"
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise StoreError(f"Cannot append to the digest chain {path}: {error.strerror}.") \
            from error
    return entry
