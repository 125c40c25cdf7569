"""Forward migration of a version 1 store (no signatures) to the current schema."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from appliance.recordings import digests
from appliance.recordings.journal import event_hash, genesis_hash
from appliance.recordings.migrations import recorded_version
from appliance.recordings.schema import SCHEMA_VERSION
from appliance.recordings.signing import load_public_key
from appliance.recordings.store import Store, _write_parquet
from appliance.recordings.verify import FAILURE, verify_store

# The catalog layout of schema version 1, frozen here as the first appliance wrote it.
V1_SESSION_INDEX = (
    "CREATE TABLE session_index (session_id VARCHAR PRIMARY KEY, date VARCHAR, file VARCHAR, "
    "events BIGINT, status VARCHAR, last_hash VARCHAR, file_sha256 VARCHAR, "
    "sealed_at TIMESTAMP)")


def v1_events(session_id: str) -> list[dict[str, object]]:
    previous = genesis_hash(session_id)
    events = []
    for seq, kind in enumerate(["session_start", "request", "session_end"]):
        event = {"kind": kind, "session_id": session_id, "seq": seq,
                 "ts_ns": 1_700_000_000_000_000_000 + seq, "prev_hash": previous}
        event["hash"] = previous = event_hash(event)
        events.append(event)
    return events


def make_v1_store(root: Path, session_ids: list[str]) -> None:
    """Write a version 1 store: Parquet files and a catalog, no digests, no key."""
    (root / "journal").mkdir(parents=True)
    connection = duckdb.connect(str(root / "catalog.duckdb"))
    try:
        connection.execute("CREATE TABLE store_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        connection.execute("INSERT INTO store_meta VALUES ('schema_version', '1')")
        connection.execute(V1_SESSION_INDEX)
        for sid in session_ids:
            file = f"sessions/date=2023-11-14/{sid}.parquet"
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            events = v1_events(sid)
            _write_parquet(events, root / file)
            connection.execute(
                "INSERT INTO session_index VALUES (?, '2023-11-14', ?, 3, 'completed', ?, ?, "
                "now())", [sid, file, events[-1]["hash"], digests.sha256_file(root / file)])
    finally:
        connection.close()


@pytest.fixture
def v1_store(tmp_path: Path) -> Store:
    make_v1_store(tmp_path / "store", ["sess-old-a", "sess-old-b"])
    return Store(tmp_path / "store", signing_key=tmp_path / "signing-key.pem")


def test_v1_catalog_migrated_to_current(v1_store: Store) -> None:
    with v1_store.catalog(write=True) as connection:
        version = recorded_version(connection)
        unsigned = connection.execute(
            "SELECT count(*) FROM session_index WHERE digest_hash IS NULL").fetchone()

    assert version == SCHEMA_VERSION
    assert unsigned == (0,)


def test_v1_sessions_signed_as_migrated(v1_store: Store) -> None:
    with v1_store.catalog(write=True):
        pass

    entries = digests.read(v1_store.digests_path).entries

    assert [e["session_id"] for e in entries] == ["sess-old-a", "sess-old-b"]
    assert {e["origin"] for e in entries} == {"migration"}
    assert {e["schema_version"] for e in entries} == {1}


def test_migrated_store_verifies(v1_store: Store) -> None:
    with v1_store.catalog(write=True):
        pass

    report = verify_store(v1_store.root, load_public_key(v1_store.public_key_path), "test")

    assert report.ok
    assert len(report.sessions) == 2


def test_tampered_v1_session_left_unsigned(v1_store: Store) -> None:
    path = v1_store.root / "sessions/date=2023-11-14/sess-old-b.parquet"
    connection = duckdb.connect(":memory:")
    connection.execute(f"CREATE TABLE t AS SELECT * FROM read_parquet('{path}')")
    connection.execute("UPDATE t SET record = replace(record, 'request', 'response') "
                       "WHERE seq = 1")
    connection.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    connection.close()

    with v1_store.catalog(write=True):
        pass
    report = verify_store(v1_store.root, load_public_key(v1_store.public_key_path), "test")
    failures = {(f.kind, f.session_id) for s in report.sessions for f in s.findings
                if f.severity == FAILURE}

    assert [e["session_id"] for e in digests.read(v1_store.digests_path).entries] == \
        ["sess-old-a"]
    assert failures == {("file_unsigned", "sess-old-b")}


def test_migration_runs_once(v1_store: Store) -> None:
    for _ in range(2):
        with v1_store.catalog(write=True):
            pass

    assert len(digests.read(v1_store.digests_path).entries) == 2


def test_v1_store_readable_before_migration(v1_store: Store) -> None:
    with v1_store.catalog() as connection:
        rows = connection.execute("SELECT session_id FROM session_index ORDER BY 1").fetchall()

    assert rows == [("sess-old-a",), ("sess-old-b",)]
