"""Tests for the recording store: layout, sealing into Parquet, the catalog and recovery."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from appliance.errors import StoreError
from appliance.recordings.journal import Journal, event_hash, read, verify_chain
from appliance.recordings.schema import EVENT_COLUMNS, SCHEMA_VERSION
from appliance.recordings.store import SealedSession, Store

SESSION_ID = "sess-store-test"
# The session start time the `write_session` fixture records, and its UTC date.
START_NS = 1_709_208_000_000_000_000
LEAP_DAY = "2024-02-29"

WriteSession = Callable[..., Any]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sealed_rows(parquet: Path) -> list[dict[str, object]]:
    connection = duckdb.connect(":memory:")
    try:
        relation = connection.execute(
            "SELECT * FROM read_parquet(?, hive_partitioning = false) ORDER BY seq",
            [str(parquet)])
        columns = [column[0] for column in relation.description]
        return [dict(zip(columns, row, strict=True)) for row in relation.fetchall()]
    finally:
        connection.close()


def abandon_journal(store: Store, session_id: str, count: int) -> Path:
    """Write `count` events and drop the journal without sealing, as a killed process would."""
    journal = Journal(store.journal_path(session_id), session_id)
    for number in range(count):
        journal.append_sync({"kind": "request", "ts_ns": START_NS + number,
                             "path": f"/call/{number}"})
    journal.close()
    journal.release()
    return journal.path


# -- layout --------------------------------------------------------------------------------------


def test_ensure_creates_private_layout(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")

    store.ensure()

    for directory in (store.root, store.journal_dir, store.sessions_dir):
        assert directory.is_dir()
        assert mode_of(directory) == 0o700, directory


def test_ensure_fixes_open_root_mode(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    os.chmod(root, 0o755)

    Store(root).ensure()

    assert mode_of(root) == 0o700


def test_ensure_is_idempotent(store: Store) -> None:
    store.ensure()

    assert mode_of(store.root) == 0o700


def test_open_journal_is_0600(store: Store, write_session: WriteSession) -> None:
    journal = write_session(SESSION_ID, [], seal=False)
    assert isinstance(journal, Journal)

    assert mode_of(journal.path) == 0o600


# -- sealing -------------------------------------------------------------------------------------


def test_seal_writes_partitioned_parquet(store: Store, write_session: WriteSession) -> None:
    sealed = write_session(SESSION_ID, [{"kind": "request", "path": "/a"}])
    assert isinstance(sealed, SealedSession)

    expected = store.sessions_dir / f"date={LEAP_DAY}" / f"{SESSION_ID}.parquet"
    assert sealed.parquet == expected
    assert expected.is_file()
    assert mode_of(expected) == 0o600
    assert sealed.events == 3
    assert sealed.status == "completed"


def test_seal_removes_journal(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, [])

    assert not store.journal_path(SESSION_ID).exists()
    assert store.live_journals() == []


def test_seal_registers_catalog_row(store: Store, write_session: WriteSession) -> None:
    sealed = write_session(SESSION_ID, [{"kind": "request"}])
    assert isinstance(sealed, SealedSession)

    with store.catalog() as connection:
        row = connection.execute(
            "SELECT session_id, date, file, events, status, last_hash, file_sha256 "
            "FROM session_index").fetchall()
    records = sealed_rows(sealed.parquet)

    assert len(row) == 1
    session_id, date, file, events, status, last_hash, file_sha256 = row[0]
    assert session_id == SESSION_ID
    assert date == LEAP_DAY
    assert file == f"sessions/date={LEAP_DAY}/{SESSION_ID}.parquet"
    assert events == 3
    assert status == "completed"
    assert last_hash == records[-1]["hash"]
    assert file_sha256 == hashlib.sha256(sealed.parquet.read_bytes()).hexdigest()


def test_seal_hive_partition_reads_date(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, [])

    dates = duckdb.sql(
        f"SELECT DISTINCT CAST(date AS VARCHAR) FROM read_parquet("
        f"'{store.sessions_dir}/*/*.parquet', hive_partitioning = true)").fetchall()

    assert dates == [(LEAP_DAY,)]


def test_sealed_record_reproduces_hash(store: Store, write_session: WriteSession) -> None:
    sealed = write_session(SESSION_ID, [
        {"kind": "request", "path": "/a?x=ü", "status": None, "dry_run": True},
        {"kind": "response", "status": 200, "rows_returned": 7, "uid": 1000},
    ])
    assert isinstance(sealed, SealedSession)

    rows = sealed_rows(sealed.parquet)
    events = [json.loads(str(row["record"])) for row in rows]

    for row, event in zip(rows, events, strict=True):
        body = {key: value for key, value in event.items() if key != "hash"}
        assert event_hash(body) == row["hash"]
    assert verify_chain(SESSION_ID, events) == []


def test_sealed_parquet_has_schema_columns(store: Store, write_session: WriteSession) -> None:
    sealed = write_session(SESSION_ID, [])
    assert isinstance(sealed, SealedSession)

    assert list(sealed_rows(sealed.parquet)[0]) == list(EVENT_COLUMNS)


def test_sealed_columns_match_events(store: Store, write_session: WriteSession) -> None:
    sealed = write_session(SESSION_ID, [{"kind": "response", "status": 200, "rows_returned": 7}])
    assert isinstance(sealed, SealedSession)

    row = sealed_rows(sealed.parquet)[1]

    assert row["kind"] == "response"
    assert row["status"] == 200
    assert row["rows_returned"] == 7
    assert row["seq"] == 1


def test_seal_without_end_is_incomplete(store: Store, write_session: WriteSession) -> None:
    sealed = write_session(SESSION_ID, [], end=False)
    assert isinstance(sealed, SealedSession)

    assert sealed.status == "incomplete"


def test_seal_rejects_torn_journal(store: Store) -> None:
    path = abandon_journal(store, SESSION_ID, 2)
    with open(path, "ab") as handle:
        handle.write(b'{"kind":"req')

    with pytest.raises(StoreError, match="torn or invalid record"):
        store.seal(SESSION_ID)

    assert path.exists()


# -- recovery ------------------------------------------------------------------------------------


def test_recover_seals_abandoned_journal(store: Store) -> None:
    abandon_journal(store, SESSION_ID, 3)

    recovered = store.recover()

    assert [session.session_id for session in recovered] == [SESSION_ID]
    assert recovered[0].status == "interrupted"
    assert recovered[0].events == 4
    assert not store.journal_path(SESSION_ID).exists()


def test_recover_appends_verifiable_event(store: Store) -> None:
    abandon_journal(store, SESSION_ID, 3)

    sealed = store.recover()[0]
    events = [json.loads(str(row["record"])) for row in sealed_rows(sealed.parquet)]

    assert events[-1]["kind"] == "session_recovered"
    assert events[-1]["seq"] == 3
    assert verify_chain(SESSION_ID, events) == []


def test_recover_cuts_torn_tail(store: Store) -> None:
    path = abandon_journal(store, SESSION_ID, 2)
    torn = b'{"kind":"request","seq":2,"pa'
    with open(path, "ab") as handle:
        handle.write(torn)

    sealed = store.recover()[0]
    events = [json.loads(str(row["record"])) for row in sealed_rows(sealed.parquet)]
    detail = json.loads(events[-1]["detail"])

    assert [event["seq"] for event in events] == [0, 1, 2]
    assert verify_chain(SESSION_ID, events) == []
    assert detail["torn_record_bytes"] == len(torn)
    assert detail["torn_record_sha256"] == hashlib.sha256(torn).hexdigest()


def test_recover_empty_journal(store: Store) -> None:
    abandon_journal(store, SESSION_ID, 0)

    sealed = store.recover()[0]
    events = [json.loads(str(row["record"])) for row in sealed_rows(sealed.parquet)]

    assert [event["kind"] for event in events] == ["session_recovered"]
    assert verify_chain(SESSION_ID, events) == []


def test_recover_skips_locked_journal(store: Store, write_session: WriteSession) -> None:
    journal = write_session(SESSION_ID, [{"kind": "request"}], seal=False)
    assert isinstance(journal, Journal)
    before = journal.path.read_bytes()

    recovered = store.recover()

    assert recovered == []
    assert journal.path.read_bytes() == before
    assert read(journal.path).torn_tail is None


def test_open_journal_locked_from_creation(store: Store,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    recovered_meanwhile: list[SealedSession] = []
    real_rename = os.rename

    def rename_after_other_recover(source: str, target: str) -> None:
        # Another appliance process starting now runs recover() over the journal directory,
        # both before and after the new journal gets its final name.
        recovered_meanwhile.extend(Store(store.root, store.signing_key).recover())
        real_rename(source, target)
        recovered_meanwhile.extend(Store(store.root, store.signing_key).recover())

    monkeypatch.setattr(os, "rename", rename_after_other_recover)
    journal = store.open_journal(SESSION_ID)
    try:
        assert recovered_meanwhile == []
        assert journal.path.exists()
    finally:
        journal.close()
        journal.release()


# -- catalog -------------------------------------------------------------------------------------


def set_schema_version(store: Store, version: int) -> None:
    with store.catalog(write=True):
        pass
    connection = duckdb.connect(str(store.catalog_path))
    try:
        connection.execute("UPDATE store_meta SET value = ? WHERE key = 'schema_version'",
                           [str(version)])
    finally:
        connection.close()


def test_catalog_records_schema_version(store: Store) -> None:
    with store.catalog(write=True) as connection:
        row = connection.execute(
            "SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()

    assert row == (str(SCHEMA_VERSION),)


def test_catalog_write_rejects_newer_schema(store: Store) -> None:
    set_schema_version(store, SCHEMA_VERSION + 1)

    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"), \
            store.catalog(write=True):
        pass


def test_seal_rejects_newer_schema(store: Store, write_session: WriteSession) -> None:
    set_schema_version(store, SCHEMA_VERSION + 1)

    with pytest.raises(StoreError, match="newer than this appliance"):
        write_session(SESSION_ID, [])

    assert store.journal_path(SESSION_ID).exists()
