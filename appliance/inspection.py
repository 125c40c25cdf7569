"""One session at a glance: metadata, identity, counts and the integrity of its recording.

Integrity is checked from the recorded bytes themselves. Where the store has a signing key,
`recordings.verify` checks the session against the signed digest chain. Otherwise the canonical
`record` of each sealed event (or each line of a live journal) is re-hashed along the chain
with `recordings.journal.verify_chain`. For a sealed session the chain's last hash and the
Parquet file's digest are then compared with what the catalog registered at sealing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from appliance.errors import NotFound, StoreError
from appliance.recordings import journal as journal_module
from appliance.recordings import replay as replay  # noqa: PLC0414
from appliance.recordings.schema import SESSION_START
from appliance.recordings.store import Store

logger = logging.getLogger(__name__)

# Fields of the session_start event's detail that record who ran what, and where.
IDENTITY_FIELDS = ("agent", "principal", "unix_user", "uid", "operator", "command", "cwd",
                   "namespace", "agent_address", "proxy_address")


@dataclass
class Integrity:
    """The result of checking one session's hash chain and file digest."""

    status: str  # intact, broken, or running (intact so far)
    checked_events: int
    problems: list[str] = field(default_factory=list)
    sealed_file: str | None = None
    checked_by: str = "hash chain and catalog digest"
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "checked_events": self.checked_events,
                "checked_by": self.checked_by, "problems": self.problems,
                "notices": self.notices, "sealed_file": self.sealed_file}


def _index_row(store: Store, session_id: str) -> dict[str, Any] | None:
    with store.catalog() as connection:
        cursor = connection.execute(
            "SELECT file, events, last_hash, file_sha256 FROM session_index "
            "WHERE session_id = ?", [session_id])
        row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip(("file", "events", "last_hash", "file_sha256"), row, strict=True))


def _sealed_events(path: Path) -> list[dict[str, Any]]:
    connection = duckdb.connect(":memory:")
    try:
        rows = connection.execute("SELECT record FROM read_parquet(?) ORDER BY seq",
                                  [str(path)]).fetchall()
    except duckdb.Error as error:
        raise StoreError(f"Cannot read {path}: {error}") from error
    finally:
        connection.close()
    events = []
    for (record,) in rows:
        event = json.loads(record) if record else {}
        events.append(event if isinstance(event, dict) else {})
    return events


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sealed_events(store: Store, session_id: str) -> list[dict[str, Any]]:
    """Return the events of a sealed session as recorded; NotFound when it is not sealed."""
    index = _index_row(store, session_id)
    if index is None:
        raise NotFound(f"Session {session_id!r} is not sealed in the store {store.root}.")
    return _sealed_events(store.root / index["file"])


def _signed_integrity(store: Store, session_id: str) -> Integrity | None:
    """Verify with the store's signed digests where the store has a public key, else None."""
    try:
        from appliance.recordings import verify
    except ImportError:
        return None
    try:
        verifier, source = verify.find_public_key(store.root, None)
    except StoreError:
        return None  # No signing key yet: the unsigned checks below still apply.
    report = verify.verify_store(store.root, verifier, source, session_id)
    result = report.sessions[0]
    problems = [f.line() for f in result.findings if f.severity == verify.FAILURE]
    notices = [f.line() for f in result.findings if f.severity != verify.FAILURE]
    if problems:
        status = "broken"
    elif result.state in ("live", "abandoned"):
        status = "running (intact so far)" if result.state == "live" else "abandoned (intact)"
    else:
        status = "intact" if result.state != "unsigned" else "unsigned"
    return Integrity(status, result.events or 0, problems,
                     str(store.root / result.file) if result.file else None,
                     f"signed digest chain, key id {verifier.key_id}", notices)


def integrity(store: Store, session_id: str) -> Integrity:
    """Check a sealed or running session's recording; NotFound when it has neither.

    Uses the store's signed digest chain where there is one (recordings.verify), else the
    hash chain of the events and the digest the catalog registered at sealing.
    """
    signed = _signed_integrity(store, session_id)
    if signed is not None:
        return signed
    index = _index_row(store, session_id)
    if index is not None:
        path = store.root / index["file"]
        if not path.exists():
            return Integrity("broken", 0, [f"the sealed file {path} is missing"], str(path))
        problems = []
        if _file_digest(path) != index["file_sha256"]:
            problems.append(f"{path} does not match the SHA-256 registered at sealing (the "
                            "file was changed or replaced)")
        events = _sealed_events(path)
        problems += journal_module.verify_chain(session_id, events)
        if len(events) != index["events"]:
            problems.append(f"the file holds {len(events)} events, the catalog registered "
                            f"{index['events']} (events were added or removed)")
        if events and events[-1].get("hash") != index["last_hash"]:
            problems.append("the last event's hash differs from the one registered at sealing "
                            "(the end of the session was cut or rewritten)")
        return Integrity("broken" if problems else "intact", len(events), problems, str(path))
    journal_path = store.journal_path(session_id)
    if not journal_path.exists():
        if _index_row(store, session_id) is not None:
            return integrity(store, session_id)  # Sealed since the first look.
        raise NotFound(f"Session {session_id!r} is not in the store {store.root}; list the "
                       "recorded sessions with 'appliance sessions list'.")
    contents = journal_module.read(journal_path)
    problems = list(contents.problems) + journal_module.verify_chain(session_id,
                                                                     contents.events)
    status = "broken" if problems else "running (intact so far)"
    return Integrity(status, len(contents.events), problems)


def _identity(store: Store, session_id: str) -> dict[str, Any]:
    escaped = session_id.replace("'", "''")
    result = replay.run_query(store, "SELECT detail FROM events WHERE session_id = "
                                     f"'{escaped}' AND kind = '{SESSION_START}' ORDER BY seq "
                                     "LIMIT 1")
    if not result.rows or result.rows[0][0] is None:
        return {}
    detail = json.loads(result.rows[0][0])
    return {name: detail.get(name) for name in IDENTITY_FIELDS}


def _counts(store: Store, session_id: str) -> dict[str, Any]:
    escaped = session_id.replace("'", "''")
    kinds = replay.run_query(store, "SELECT kind, count(*) FROM events WHERE session_id = "
                                    f"'{escaped}' GROUP BY kind ORDER BY kind")
    outcomes = replay.run_query(store, "SELECT outcome, count(*) FROM statements WHERE "
                                       f"session_id = '{escaped}' GROUP BY outcome "
                                       "ORDER BY outcome")
    return {
        "events_by_kind": {str(kind): int(count) for kind, count in kinds.rows},
        "statements_by_outcome": {str(outcome): int(count) for outcome, count in outcomes.rows},
    }


def describe(store: Store, session_id: str) -> dict[str, Any]:
    """Return the session's metadata, identity, counts and integrity as one JSON-able dict."""
    session = {key: replay.plain(value) for key, value in
               replay.session_detail(store, session_id).items()}
    return {
        "session": session,
        "identity": _identity(store, session_id),
        "counts": _counts(store, session_id),
        "integrity": integrity(store, session_id).as_dict(),
    }
