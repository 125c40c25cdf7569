"""Verify a store, or a copy of one, with nothing but its files and the public key.

Checks, each failure named by session, event and kind of tampering:

- the digest chain: every entry's signature and hash, its index and its link to the entry
  before it (forged, edited, deleted, inserted or reordered digests);
- every signed session: its Parquet file exists (deleted, moved), has the signed SHA-256
  (modified, replaced, swapped with another session's file), and its events form the chain
  the digest signed: sequence numbers (deleted, reordered, inserted events), each event's hash
  over its canonical `record` (edited events), the link to the event before it, every column
  against the `record` it was derived from (an edited column), and the digest's facts (event
  count, counts per kind, time range, last hash: a replaced or re-chained session);
- recovery events: torn final records excluded at recovery (a notice, with their digest) and
  journals found truncated against their signed head (a failure);
- Parquet files no valid digest covers (added sessions, or sessions whose digest was removed);
- live and abandoned journals: their chain, torn tail and signed head.

Nothing is written: the catalog is not opened and no lock is taken, so a read-only copy
verifies, and a verify running beside the appliance never delays its recovery.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from appliance.errors import NotFound, StoreError
from appliance.recordings import digests
from appliance.recordings import journal as journal_module
from appliance.recordings.journal import event_hash, genesis_hash
from appliance.recordings.schema import EVENT_COLUMNS, SESSION_RECOVERED
from appliance.recordings.signing import PUBLIC_KEY_NAME, Verifier, load_public_key

FAILURE = "failure"
NOTICE = "notice"
_BATCH_ROWS = 50_000


@dataclass
class Finding:
    """One thing verification found; failures mean tampering or damage, notices do not."""

    severity: str
    kind: str
    message: str
    session_id: str | None = None
    seq: int | None = None

    def line(self) -> str:
        where = f"session {self.session_id}" if self.session_id else "store"
        if self.seq is not None:
            where += f" event seq {self.seq}"
        return f"{where}: {self.message} [{self.kind}]"


@dataclass
class SessionResult:
    session_id: str
    state: str  # sealed, pruned, live, abandoned or unsigned
    status: str | None = None
    events: int | None = None
    file: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == FAILURE for f in self.findings)


@dataclass
class Report:
    store: str
    key_id: str
    key_source: str
    digest_entries: int = 0
    digest_head: str | None = None
    findings: list[Finding] = field(default_factory=list)
    sessions: list[SessionResult] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        every = self.findings + [f for s in self.sessions for f in s.findings]
        return [f for f in every if f.severity == FAILURE]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "store": self.store,
            "key_id": self.key_id,
            "key_source": self.key_source,
            "digest_chain": {"entries": self.digest_entries, "head": self.digest_head},
            "findings": [asdict(f) for f in self.findings],
            "sessions": [{**{k: v for k, v in asdict(s).items() if k != "findings"},
                          "ok": s.ok, "findings": [asdict(f) for f in s.findings]}
                         for s in self.sessions],
        }


# -- entry points ----------------------------------------------------------------------------------


def find_public_key(root: Path, public_key: Path | None) -> tuple[Verifier, str]:
    """Load the given key, else the store's (or an export's single) own copy of it."""
    if public_key is not None:
        return load_public_key(public_key), str(public_key)
    candidates = [root / PUBLIC_KEY_NAME] if (root / PUBLIC_KEY_NAME).exists() else \
        sorted((root / "keys").glob("*.pub"))
    if len(candidates) != 1:
        raise StoreError(f"No single public key found in {root} (looked for {PUBLIC_KEY_NAME} "
                         "and keys/*.pub); pass --public-key FILE.")
    return load_public_key(candidates[0]), f"{candidates[0]} (the store's own copy)"


def verify_store(root: Path, verifier: Verifier, key_source: str,
                 session_id: str | None = None) -> Report:
    """Verify every session of the store at `root`, or only `session_id`."""
    if not root.is_dir():
        raise StoreError(f"The store {root} does not exist or is not a directory.")
    if not os.access(root, os.R_OK | os.X_OK):
        raise StoreError(f"The store {root} is not readable by this user; it is private to "
                         "root, so run the command as root or verify a copy.")
    report = Report(str(root), verifier.key_id, key_source)
    chain = _check_chain(root, verifier, report)
    files = {str(p.relative_to(root)): p for p in sorted(root.glob("sessions/*/*.parquet"))}
    wanted = [session_id] if session_id else sorted(
        set(chain.sessions) | set(chain.pruned) | {Path(f).stem for f in files}
        | {p.stem for p in _journals(root)})
    signed_sha = {e["file_sha256"]: e["session_id"] for e in chain.sessions.values()}
    for sid in wanted:
        result = _verify_session(root, sid, chain, files, signed_sha, verifier)
        if result is not None:
            report.sessions.append(result)
    if session_id and not report.sessions:
        raise NotFound(f"Session {session_id!r} is neither in the digest chain nor in the "
                       f"files of {root}; list the sessions with 'appliance sessions list'.")
    return report


# -- the digest chain ----------------------------------------------------------------------------


@dataclass
class _Chain:
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    pruned: dict[str, dict[str, Any]] = field(default_factory=dict)
    forged: set[str] = field(default_factory=set)
    sealed_twice: set[str] = field(default_factory=set)
    foreign_files: set[str] = field(default_factory=set)


def chain_path(root: Path, key_id: str) -> Path:
    """Return the digest chain file: a store's `digests.jsonl`, else an export's
    `digests/<key_id>.jsonl` for the key."""
    own = root / digests.DIGESTS_NAME
    return own if own.exists() else root / "digests" / f"{key_id}.jsonl"


def _check_chain(root: Path, verifier: Verifier, report: Report) -> _Chain:
    path = chain_path(root, verifier.key_id)
    contents = digests.read(path)
    chain = _Chain()
    for other in sorted((root / "digests").glob("*.jsonl")):
        if other != path:
            chain.foreign_files |= {str(e.get("file")) for e in digests.read(other).entries}
    if not path.exists():
        # Without sealed files an empty store is fine; with them, each shows as unsigned.
        severity = FAILURE if any(root.glob("sessions/*/*.parquet")) else NOTICE
        report.findings.append(Finding(severity, "digests_missing", (
            f"there is no digest chain for key {verifier.key_id} ({path.name}); was the right "
            "public key given?")))
    for problem in contents.problems:
        report.findings.append(Finding(FAILURE, "digest_invalid", f"digest chain {problem}"))
    if contents.torn_tail is not None:
        report.findings.append(Finding(FAILURE, "digest_torn", (
            f"the digest chain ends in an incomplete line of {len(contents.torn_tail)} bytes "
            "(cut off, or appended to by hand)")))

    previous = digests.genesis(verifier.key_id)
    for position, entry in enumerate(contents.entries):
        sid = str(entry.get("session_id"))
        label = f"digest entry {position} ({entry.get('type')} of session {sid})"
        body = digests.body_of(entry)
        if entry.get("key_id") != verifier.key_id:
            report.findings.append(Finding(FAILURE, "wrong_key", (
                f"{label} names key {entry.get('key_id')}, not the given key "
                f"{verifier.key_id}"), sid))
            chain.forged.add(sid)
        elif digests.digest_hash(body) != entry.get("digest_hash") \
                or not verifier.verify(body, str(entry.get("signature"))):
            report.findings.append(Finding(FAILURE, "digest_forged", (
                f"{label} does not verify with key {verifier.key_id}: it was edited or forged "
                "without the signing key"), sid))
            chain.forged.add(sid)
        else:
            _accept(chain, entry, sid)
        if entry.get("index") != position:
            report.findings.append(Finding(FAILURE, "digest_chain_broken", (
                f"{label} has index {entry.get('index')} at position {position}: digest "
                "entries were deleted, inserted or reordered"), sid))
        elif entry.get("prev_digest_hash") != previous:
            report.findings.append(Finding(FAILURE, "digest_chain_broken", (
                f"{label} does not link to the entry before it: a digest entry before it was "
                "deleted, inserted, reordered or edited"), sid))
        previous = str(entry.get("digest_hash"))
    report.digest_entries = len(contents.entries)
    report.digest_head = previous if contents.entries else None
    return chain


def _accept(chain: _Chain, entry: dict[str, Any], sid: str) -> None:
    if entry.get("type") == digests.SESSION:
        if sid in chain.sessions:
            chain.sealed_twice.add(sid)
        chain.sessions[sid] = entry
        chain.pruned.pop(sid, None)
    elif entry.get("type") == digests.PRUNE:
        removed = chain.sessions.get(sid)
        if removed is not None and removed.get("digest_hash") == entry.get("pruned_digest_hash"):
            chain.pruned[sid] = entry
            del chain.sessions[sid]


# -- one session ---------------------------------------------------------------------------------


def _verify_session(root: Path, sid: str, chain: _Chain, files: dict[str, Path],
                    signed_sha: dict[str, str], verifier: Verifier) -> SessionResult | None:
    journal = root / "journal" / f"{sid}.jsonl"
    on_disk = [f for f, p in files.items() if p.stem == sid]
    if sid in chain.sessions:
        result = _verify_sealed(root, chain.sessions[sid], files, signed_sha)
        if sid in chain.sealed_twice:
            result.findings.append(Finding(NOTICE, "sealed_twice", (
                "the session was sealed twice (the appliance stopped while sealing it); the "
                "later digest applies"), sid))
    elif sid in chain.pruned:
        entry = chain.pruned[sid]
        result = SessionResult(sid, "pruned", file=str(entry.get("file")))
        result.findings.append(Finding(NOTICE, "pruned", (
            f"pruned by the retention policy ({entry.get('reason')}); the removal is signed "
            "in the digest chain"), sid))
        if str(entry.get("file")) in files:
            result.findings.append(Finding(NOTICE, "pruned_file_present", (
                f"its file {entry.get('file')} is still present (a copy made before pruning, "
                "or pruning stopped before removing it)"), sid))
    elif journal.exists():
        result = SessionResult(sid, "live")
    elif sid in chain.forged:
        result = SessionResult(sid, "unsigned", file=on_disk[0] if on_disk else None)
    elif on_disk and all(f in chain.foreign_files for f in on_disk):
        return None  # Another appliance's session in a fleet export; its own key verifies it.
    elif on_disk:
        result = SessionResult(sid, "unsigned", file=on_disk[0])
        result.findings.append(Finding(FAILURE, "file_unsigned", (
            f"file {on_disk[0]} is not covered by any valid signed digest: the session was "
            "added, or its digest entry was removed"), sid))
    else:
        return None
    for extra in on_disk:
        if extra != result.file and result.state != "unsigned":
            result.findings.append(Finding(FAILURE, "file_unsigned", (
                f"file {extra} is not the one its signed digest names ({result.file})"), sid))
    if journal.exists():
        _verify_journal(journal, sid, result, verifier, sealed=sid in chain.sessions)
    return result


def _verify_sealed(root: Path, entry: dict[str, Any], files: dict[str, Path],
                   signed_sha: dict[str, str]) -> SessionResult:
    sid = str(entry["session_id"])
    name = str(entry.get("file"))
    result = SessionResult(sid, "sealed", entry.get("status"), entry.get("events"), name)
    path = files.get(name)
    if path is None:
        elsewhere = [f for f, p in files.items() if p.name == Path(name).name]
        moved = f"; a file of that name is at {elsewhere[0]}" if elsewhere else ""
        result.findings.append(Finding(FAILURE, "file_missing", (
            f"its Parquet file {name} is missing: it was deleted or moved{moved}"), sid))
        return result
    sha = digests.sha256_file(path)
    if sha != entry.get("file_sha256"):
        other = signed_sha.get(sha)
        if other is not None and other != sid:
            result.findings.append(Finding(FAILURE, "file_swapped", (
                f"file {name} is the signed file of session {other}: files were swapped or "
                "renamed"), sid))
            return result
        result.findings.append(Finding(FAILURE, "file_modified", (
            f"file {name} has SHA-256 {sha[:16]}…, its signed digest says "
            f"{str(entry.get('file_sha256'))[:16]}…: the file was modified or replaced"), sid))
    result.findings += check_events(path, sid, entry)
    return result


def check_events(path: Path, sid: str, entry: dict[str, Any] | None) -> list[Finding]:
    """Check a sealed file's events: chain, records against columns, and the signed facts."""
    findings: list[Finding] = []
    walk = _ChainWalk(sid)
    try:
        for position, row_seq, record, edited in _rows(path):
            event = _parse(record)
            seq = event.get("seq") if isinstance(event.get("seq"), int) else row_seq
            if edited:
                findings.append(Finding(FAILURE, "column_edited", (
                    f"column {', '.join(edited)} differs from the hashed record: the column "
                    "was edited after sealing"), sid, seq))
            findings += walk.add(position, event, seq)
    except duckdb.Error as error:
        return [Finding(FAILURE, "file_unreadable", f"{path.name} is not a readable recording "
                                                    f"Parquet file ({error})", sid)]
    findings += walk.finish()
    if entry is not None:
        findings += _compare_facts(sid, walk, entry)
    return findings


def _rows(path: Path) -> Iterator[tuple[int, int | None, str | None, list[str]]]:
    """Yield (row position, seq column, record, columns differing from the record)."""
    connection = duckdb.connect(":memory:")
    try:
        # Files sealed by an older appliance lack columns added since; those are skipped.
        present = {row[0] for row in connection.execute(
            "DESCRIBE SELECT * FROM read_parquet(?, hive_partitioning = false)",
            [str(path)]).fetchall()}
        columns = [c for c in EVENT_COLUMNS if c != "record" and c in present]
        spec = json.dumps({c: EVENT_COLUMNS[c] for c in columns})
        differs = ", ".join(f"CASE WHEN {c} IS DISTINCT FROM r.{c} THEN '{c}' END"
                            for c in columns)
        relation = connection.execute(
            "SELECT file_row_number, seq, record, list_filter([" + differs + "], x -> x IS NOT "
            "NULL) FROM (SELECT *, CASE WHEN json_valid(record) THEN from_json(record, ?) END "
            "AS r FROM read_parquet(?, file_row_number = true, hive_partitioning = false)) "
            "ORDER BY file_row_number", [spec, str(path)])
        while batch := relation.fetchmany(_BATCH_ROWS):
            for position, seq, record, edited in batch:
                yield position, seq, record, list(edited)
    finally:
        connection.close()


def _parse(record: str | None) -> dict[str, Any]:
    try:
        event = json.loads(record or "")
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


class _ChainWalk:
    """Walks a session's events in stored order and names what breaks the chain."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.seqs: list[int] = []
        self.seen: set[int] = set()
        self.kinds: Counter[str] = Counter()
        self.stamps: list[int] = []
        self.last_hash: str | None = None
        self.previous_seq: int | None = None
        self.previous_hash = genesis_hash(session_id)

    def add(self, position: int, event: dict[str, Any], seq: Any) -> list[Finding]:
        sid = self.session_id
        found = []
        if not event:
            found.append(Finding(FAILURE, "record_invalid", (
                f"row {position} has no valid JSON record: it was edited"), sid, seq))
        elif event.get("session_id") != sid:
            found.append(Finding(FAILURE, "event_foreign", (
                f"the event belongs to session {event.get('session_id')}: it was inserted "
                "from another session"), sid, seq))
        if event and event_hash({k: v for k, v in event.items() if k != "hash"}) \
                != event.get("hash"):
            found.append(Finding(FAILURE, "event_edited", (
                "its hash does not match its content: the event was edited"), sid, seq))
        in_order = isinstance(seq, int) and (
            seq == 0 if self.previous_seq is None else seq == self.previous_seq + 1)
        if in_order and event.get("prev_hash") != self.previous_hash:
            found.append(Finding(FAILURE, "chain_broken", (
                "its prev_hash does not match the event before it: events were replaced or "
                "spliced in"), sid, seq))
        if isinstance(seq, int):
            if seq in self.seen:
                found.append(Finding(FAILURE, "event_inserted",
                                     "it appears twice: an event was inserted", sid, seq))
            elif self.previous_seq is not None and seq < self.previous_seq:
                found.append(Finding(FAILURE, "event_reordered", (
                    f"it comes after event seq {self.previous_seq}: events were reordered"),
                    sid, seq))
            self.seqs.append(seq)
            self.seen.add(seq)
            self.previous_seq = seq
        self.previous_hash = str(event.get("hash"))
        self.last_hash = event.get("hash")
        self.kinds[str(event.get("kind"))] += 1
        if isinstance(event.get("ts_ns"), int):
            self.stamps.append(event["ts_ns"])
        if event.get("kind") == SESSION_RECOVERED:
            found += recovery_findings(sid, event)
        return found

    def finish(self) -> list[Finding]:
        missing = sorted(set(range(max(self.seqs, default=-1) + 1)) - self.seen)
        return [Finding(FAILURE, "event_deleted", f"event seq {low}" + (
                    f" to {high}" if high != low else "") + " is missing: deleted", self.session_id,
                    low) for low, high in _ranges(missing)]


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for number in numbers:
        if ranges and ranges[-1][1] == number - 1:
            ranges[-1] = (ranges[-1][0], number)
        else:
            ranges.append((number, number))
    return ranges


def recovery_findings(sid: str, event: dict[str, Any]) -> list[Finding]:
    """Report what recovery found: torn records (a notice), truncation and invalid lines."""
    try:
        detail = json.loads(str(event.get("detail")))
    except ValueError:
        return []
    if not isinstance(detail, dict):
        return []
    found = []
    seq = event.get("seq")
    if "torn_record_bytes" in detail:
        found.append(Finding(NOTICE, "torn_record", (
            f"recovery excluded a torn final journal record of {detail['torn_record_bytes']} "
            f"bytes (SHA-256 {detail.get('torn_record_sha256')}), written when the appliance "
            "stopped and never acknowledged"), sid, seq))
    for line in detail.get("invalid_records") or []:
        found.append(Finding(FAILURE, "journal_invalid",
                             f"recovery skipped an invalid journal line: {line}", sid, seq))
    for problem in detail.get("journal_head") or []:
        severity = NOTICE if problem.get("kind") == "head_missing" else FAILURE
        found.append(Finding(severity, str(problem.get("kind")),
                             f"at recovery, {problem.get('message')}", sid, seq))
    return found


def _compare_facts(sid: str, walk: _ChainWalk, entry: dict[str, Any]) -> list[Finding]:
    facts = {
        "events": len(walk.seqs),
        "event_kinds": dict(sorted(walk.kinds.items())),
        "first_ts_ns": min(walk.stamps) if walk.stamps else None,
        "last_ts_ns": max(walk.stamps) if walk.stamps else None,
    }
    found = []
    if walk.last_hash != entry.get("last_hash"):
        found.append(Finding(FAILURE, "session_replaced", (
            "its last event's hash differs from the signed digest: the session was replaced, "
            "re-chained or cut short"), sid))
    for name, value in facts.items():
        if value != entry.get(name):
            found.append(Finding(FAILURE, "digest_mismatch", (
                f"the file gives {name} {value}, its signed digest says {entry.get(name)}"), sid))
    return found


# -- journals ------------------------------------------------------------------------------------


def _journals(root: Path) -> list[Path]:
    directory = root / "journal"
    return sorted(directory.glob("*.jsonl")) if directory.is_dir() else []


def _verify_journal(path: Path, sid: str, result: SessionResult, verifier: Verifier,
                    sealed: bool) -> None:
    contents = journal_module.read(path)
    if journal_module.is_live(path):
        result.state = "live"
    elif not sealed:
        result.state = "abandoned"
    if not sealed:
        result.events = len(contents.events)
    if sealed:
        result.findings.append(Finding(NOTICE, "journal_left", (
            "its journal is still present although the session was sealed (the appliance "
            "stopped while sealing); the next start seals it again"), sid))
    if result.state == "abandoned":
        result.findings.append(Finding(NOTICE, "abandoned", (
            "its appliance process ended without sealing it; the next 'appliance run' "
            "recovers it as interrupted"), sid))
    if contents.torn_tail is not None:
        result.findings.append(Finding(NOTICE, "torn_record", (
            f"the journal ends in a torn record of {len(contents.torn_tail)} bytes, never "
            "acknowledged; recovery excludes it and keeps its digest"), sid))
    for problem in contents.problems:
        result.findings.append(Finding(FAILURE, "journal_invalid", f"journal {problem}", sid))
    walk = _ChainWalk(sid)
    for position, event in enumerate(contents.events):
        seq = event.get("seq")
        result.findings += walk.add(position, event, seq)
    result.findings += walk.finish()
    for kind, message in journal_module.check_head(path, sid, contents.events, verifier):
        severity = NOTICE if kind == "head_missing" else FAILURE
        result.findings.append(Finding(severity, kind, message, sid))
