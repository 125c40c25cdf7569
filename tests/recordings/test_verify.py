"""The tamper suite: every way of editing a store is detected by verify and named precisely.

Each test seals real sessions into a real store, tampers with its files the way an attacker
without the signing key could (rewriting Parquet files with DuckDB, editing JSON lines), and
checks the finding verify reports: its kind, its session and, where it has one, its event.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.recordings import digests
from appliance.recordings.journal import Journal, canonical, event_hash, genesis_hash
from appliance.recordings.migrations import sealed_events
from appliance.recordings.signing import Signer, export_public_key, load_public_key
from appliance.recordings.store import SealedSession, Store, _write_parquet
from appliance.recordings.verify import FAILURE, NOTICE, Finding, Report, verify_store

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind-mounting needs root")

WriteSession = Callable[..., Any]
STATEMENTS = [{"kind": "request", "statement_id": f"st{n}", "sql": f"SELECT {n}",
               "api_method": "jobs.query"} for n in range(4)]


@pytest.fixture
def sealed(store: Store, write_session: WriteSession) -> list[SealedSession]:
    """Three sealed sessions of six events each (start, four requests, end)."""
    return [write_session(f"sess-{n}", STATEMENTS) for n in range(3)]


def run_verify(store: Store, session_id: str | None = None,
               root: Path | None = None) -> Report:
    verifier = load_public_key(store.public_key_path)
    return verify_store(root or store.root, verifier, "test", session_id)


def kinds(report: Report, severity: str = FAILURE) -> set[tuple[str, str | None, int | None]]:
    every = report.findings + [f for s in report.sessions for f in s.findings]
    return {(f.kind, f.session_id, f.seq) for f in every if f.severity == severity}


def failure_kinds(report: Report) -> set[str]:
    return {kind for kind, _, _ in kinds(report)}


def rewrite(path: Path, statement: str | None = None, order: str = "file_row_number") -> None:
    """Rewrite a sealed Parquet file, as an attacker with DuckDB would: all rows, one changed."""
    connection = duckdb.connect(":memory:")
    try:
        connection.execute("CREATE TABLE t AS SELECT * FROM read_parquet(?, file_row_number = "
                           "true, hive_partitioning = false)", [str(path)])
        if statement:
            connection.execute(statement)
        connection.execute(f"COPY (SELECT * EXCLUDE (file_row_number) FROM t ORDER BY {order}) "
                           f"TO '{path}' (FORMAT parquet)")
    finally:
        connection.close()


def rechain(session_id: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Renumber and re-hash events into a valid chain, as an attacker without the key can."""
    previous = genesis_hash(session_id)
    chained = []
    for seq, event in enumerate(events):
        body = {k: v for k, v in event.items() if k != "hash"}
        body.update(seq=seq, prev_hash=previous)
        body["hash"] = previous = event_hash(body)
        chained.append(body)
    return chained


def digest_lines(store: Store) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.digests_path.read_text().splitlines()]


def write_digest_lines(store: Store, entries: list[dict[str, Any]]) -> None:
    store.digests_path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def abandon(store: Store, session_id: str, count: int) -> Journal:
    """Write a signed journal of `count` requests and drop it, as a killed appliance would."""
    journal = store.open_journal(session_id)
    for number in range(count):
        journal.append_sync({"kind": "request", "path": f"/call/{number}"})
    journal.close()
    journal.release()
    return journal


# -- an untouched store --------------------------------------------------------------------------


def test_intact_store_verifies(store: Store, sealed: list[SealedSession]) -> None:
    report = run_verify(store)

    assert report.ok
    assert kinds(report) == set()
    assert [s.session_id for s in report.sessions] == ["sess-0", "sess-1", "sess-2"]
    assert report.digest_entries == 3


def test_single_session_verifies(store: Store, sealed: list[SealedSession]) -> None:
    report = run_verify(store, "sess-1")

    assert report.ok
    assert [s.session_id for s in report.sessions] == ["sess-1"]


# -- the tamper suite ----------------------------------------------------------------------------


def test_edited_statement_detected(store: Store, sealed: list[SealedSession]) -> None:
    rewrite(sealed[1].parquet, "UPDATE t SET sql = 'DROP TABLE x', record = replace(record, "
                               "'SELECT 2', 'DROP TABLE x') WHERE seq = 3")

    report = run_verify(store)

    assert ("event_edited", "sess-1", 3) in kinds(report)
    assert ("file_modified", "sess-1", None) in kinds(report)
    assert {sid for _, sid, _ in kinds(report)} == {"sess-1"}


def test_edited_column_alone_detected(store: Store, sealed: list[SealedSession]) -> None:
    rewrite(sealed[1].parquet, "UPDATE t SET sql = 'SELECT harmless' WHERE seq = 3")

    report = run_verify(store)
    edited = [f for s in report.sessions for f in s.findings if f.kind == "column_edited"]

    assert [(f.session_id, f.seq) for f in edited] == [("sess-1", 3)]
    assert "column sql differs" in edited[0].message
    assert ("event_edited", "sess-1", 3) not in kinds(report)


def test_deleted_event_detected(store: Store, sealed: list[SealedSession]) -> None:
    rewrite(sealed[0].parquet, "DELETE FROM t WHERE seq = 2")

    report = run_verify(store)

    assert ("event_deleted", "sess-0", 2) in kinds(report)
    assert ("digest_mismatch", "sess-0", None) in kinds(report)


def test_reordered_events_detected(store: Store, sealed: list[SealedSession]) -> None:
    rewrite(sealed[2].parquet, order="CASE seq WHEN 2 THEN 3 WHEN 3 THEN 2 ELSE seq END")

    report = run_verify(store)

    assert ("event_reordered", "sess-2", 2) in kinds(report)
    assert "event_edited" not in failure_kinds(report)


def test_truncated_journal_detected(store: Store) -> None:
    journal = abandon(store, "sess-live", 5)
    lines = journal.path.read_bytes().splitlines(keepends=True)
    journal.path.write_bytes(b"".join(lines[:3]))

    report = run_verify(store)

    assert ("journal_truncated", "sess-live", None) in kinds(report)
    message = next(f.message for s in report.sessions for f in s.findings
                   if f.kind == "journal_truncated")
    assert "events seq 3 to 4 are missing" in message


def test_truncated_journal_detected_after_recovery(store: Store) -> None:
    journal = abandon(store, "sess-live", 5)
    lines = journal.path.read_bytes().splitlines(keepends=True)
    journal.path.write_bytes(b"".join(lines[:3]))
    store.recover()

    report = run_verify(store)

    assert ("journal_truncated", "sess-live", 3) in kinds(report)


def test_torn_journal_tail_is_notice(store: Store) -> None:
    journal = abandon(store, "sess-live", 3)
    with open(journal.path, "ab") as handle:
        handle.write(b'{"kind":"request","se')

    report = run_verify(store)

    assert report.ok
    assert ("torn_record", "sess-live", None) in kinds(report, NOTICE)


def test_swapped_files_detected(store: Store, sealed: list[SealedSession]) -> None:
    first, second = sealed[0].parquet, sealed[1].parquet
    spare = first.with_suffix(".tmp")
    first.rename(spare)
    second.rename(first)
    spare.rename(second)

    report = run_verify(store)

    assert ("file_swapped", "sess-0", None) in kinds(report)
    assert ("file_swapped", "sess-1", None) in kinds(report)


def test_rechained_session_detected(store: Store, sealed: list[SealedSession]) -> None:
    events = sealed_events(sealed[1].parquet)
    events[2]["sql"] = "SELECT 'nothing to see'"
    del events[3]
    _write_parquet(rechain("sess-1", events), sealed[1].parquet)

    report = run_verify(store)

    assert ("session_replaced", "sess-1", None) in kinds(report)
    assert ("file_modified", "sess-1", None) in kinds(report)
    assert not {"event_edited", "event_deleted", "chain_broken"} & failure_kinds(report)


def test_deleted_session_detected(store: Store, sealed: list[SealedSession]) -> None:
    sealed[1].parquet.unlink()

    report = run_verify(store)

    assert kinds(report) == {("file_missing", "sess-1", None)}


def test_deleted_session_and_digest_detected(store: Store,
                                             sealed: list[SealedSession]) -> None:
    sealed[1].parquet.unlink()
    entries = digest_lines(store)
    write_digest_lines(store, [entries[0], entries[2]])

    report = run_verify(store)

    assert ("digest_chain_broken", "sess-2", None) in kinds(report)


def test_forged_digest_detected(store: Store, sealed: list[SealedSession]) -> None:
    rewrite(sealed[1].parquet, "UPDATE t SET sql = 'SELECT 0' WHERE seq = 1")
    entries = digest_lines(store)
    entries[1]["file_sha256"] = digests.sha256_file(sealed[1].parquet)
    entries[1]["file_bytes"] = sealed[1].parquet.stat().st_size
    body = digests.body_of(entries[1])
    entries[1]["digest_hash"] = digests.digest_hash(body)
    entries[1]["signature"] = Signer(Ed25519PrivateKey.generate()).sign(body)
    write_digest_lines(store, entries)

    report = run_verify(store)

    assert ("digest_forged", "sess-1", None) in kinds(report)


def test_forged_key_in_store_detected(store: Store, sealed: list[SealedSession],
                                      tmp_path: Path) -> None:
    real_key = tmp_path / "auditor.pub"
    shutil.copy(store.public_key_path, real_key)
    attacker = Signer(Ed25519PrivateKey.generate())
    entries = digest_lines(store)
    previous = digests.genesis(attacker.key_id)
    for entry in entries:
        entry.update(key_id=attacker.key_id, prev_digest_hash=previous)
        body = digests.body_of(entry)
        entry.update(digest_hash=digests.digest_hash(body), signature=attacker.sign(body))
        previous = entry["digest_hash"]
    write_digest_lines(store, entries)
    export_public_key(attacker, store.public_key_path)

    report = verify_store(store.root, load_public_key(real_key), str(real_key))

    assert {kind for kind, _, _ in kinds(report)} >= {"wrong_key"}
    assert not report.ok


def test_added_session_detected(store: Store, sealed: list[SealedSession]) -> None:
    events = rechain("sess-new", [{"kind": "session_start", "session_id": "sess-new",
                                   "ts_ns": 1}])
    _write_parquet(events, sealed[0].parquet.with_name("sess-new.parquet"))

    report = run_verify(store)

    assert kinds(report) == {("file_unsigned", "sess-new", None)}


def test_edited_digest_line_detected(store: Store, sealed: list[SealedSession]) -> None:
    entries = digest_lines(store)
    entries[0]["events"] = 99
    write_digest_lines(store, entries)

    report = run_verify(store)

    assert ("digest_forged", "sess-0", None) in kinds(report)


def test_reordered_digests_detected(store: Store, sealed: list[SealedSession]) -> None:
    entries = digest_lines(store)
    write_digest_lines(store, [entries[1], entries[0], entries[2]])

    report = run_verify(store)

    assert "digest_chain_broken" in failure_kinds(report)


# -- recovery and retention -------------------------------------------------------------------


def test_recovered_session_verifies(store: Store) -> None:
    journal = abandon(store, "sess-crashed", 4)
    with open(journal.path, "ab") as handle:
        handle.write(b'{"kind":"request","seq":4,"pa')

    recovered = store.recover()
    report = run_verify(store)

    assert [s.status for s in recovered] == ["interrupted"]
    assert report.ok
    assert ("torn_record", "sess-crashed", 4) in kinds(report, NOTICE)


def test_pruned_session_verifies(store: Store, sealed: list[SealedSession]) -> None:
    from appliance.recordings import retention

    removed = retention.prune(store, 1, "test", now_ns=2_000_000_000_000_000_000)
    report = run_verify(store)

    assert len(removed) == 3
    assert report.ok
    assert ("pruned", "sess-0", None) in kinds(report, NOTICE)


def test_dropped_prune_entry_detected(store: Store, sealed: list[SealedSession]) -> None:
    from appliance.recordings import retention

    retention.prune(store, 1, "test", now_ns=2_000_000_000_000_000_000)
    entries = digest_lines(store)
    write_digest_lines(store, entries[:3] + entries[4:])

    report = run_verify(store)

    assert "digest_chain_broken" in failure_kinds(report)


# -- what verify needs -------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_copy(source: Path) -> Iterator[Path]:
    """Copy only the store's files an auditor gets and bind-mount the copy read-only."""
    copy = Path(tempfile.mkdtemp(prefix="verify-copy-"))
    mount = Path(tempfile.mkdtemp(prefix="verify-ro-"))
    mounted = False
    try:
        shutil.copytree(source / "sessions", copy / "sessions")
        shutil.copy(source / "digests.jsonl", copy / "digests.jsonl")
        subprocess.run(["mount", "--bind", str(copy), str(mount)], check=True)
        mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()
        shutil.rmtree(copy)


@needs_root
def test_read_only_copy_verifies(store: Store, sealed: list[SealedSession]) -> None:
    with read_only_copy(store.root) as copy:
        report = verify_store(copy, load_public_key(store.public_key_path), "auditor")

        assert report.ok
        assert len(report.sessions) == 3


def test_finding_line_names_session_and_seq() -> None:
    finding = Finding(FAILURE, "event_edited", "its hash does not match", "sess-1", 3)

    assert finding.line() == "session sess-1 event seq 3: its hash does not match [event_edited]"


def test_signature_is_base64_ed25519(store: Store, sealed: list[SealedSession]) -> None:
    entry = digest_lines(store)[0]

    assert len(base64.b64decode(entry["signature"])) == 64
    assert load_public_key(store.public_key_path).verify(digests.body_of(entry),
                                                         entry["signature"])
