"""Forward migration of the store's layout, one step per schema version.

The catalog's `store_meta` table holds `schema_version`. Opening the catalog for writing runs
every step from the recorded version up to SCHEMA_VERSION, each step followed by recording its
new version, so a migration stopped half-way resumes where it stopped. A store newer than this
appliance is refused, for reading and writing alike. Steps are documented in docs/store.md.

    1 -> 2  session_index gains digest_hash, started_ns and ended_ns; every sealed session of a
            version 1 store (which had no signatures) is verified (file hash against the
            catalog, event chain, columns against records) and then signed into the digest
            chain with origin "migration". A session that fails the check is left unsigned and
            logged, so verification reports it instead of a signature vouching for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from appliance.errors import StoreError
from appliance.recordings import digests, verify
from appliance.recordings.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from appliance.recordings.store import Store

logger = logging.getLogger(__name__)

SESSION_INDEX_V2 = (
    "CREATE TABLE IF NOT EXISTS session_index (session_id VARCHAR PRIMARY KEY, date VARCHAR, "
    "file VARCHAR, events BIGINT, status VARCHAR, last_hash VARCHAR, file_sha256 VARCHAR, "
    "sealed_at TIMESTAMP, digest_hash VARCHAR, started_ns BIGINT, ended_ns BIGINT)"
)


def recorded_version(connection: duckdb.DuckDBPyConnection) -> int | None:
    """Return the store's schema version; None for a catalog without tables yet."""
    tables = {row[0] for row in connection.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
    ).fetchall()}
    if "store_meta" in tables:
        row = connection.execute(
            "SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
        if row is not None:
            return int(row[0])
    # The first appliance wrote session_index before it recorded a version.
    return 1 if "session_index" in tables else None


def check_version(connection: duckdb.DuckDBPyConnection) -> None:
    """Reject a store written by a newer appliance, whose layout this one cannot read."""
    version = recorded_version(connection)
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(f"The store has schema version {version}, newer than this appliance "
                         f"understands ({SCHEMA_VERSION}); upgrade the appliance.")


def migrate(connection: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Bring the catalog (and the store's files) up to SCHEMA_VERSION."""
    check_version(connection)
    version = recorded_version(connection)
    connection.execute("CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, "
                       "value VARCHAR)")
    if version is None:
        connection.execute(SESSION_INDEX_V2)
        _set_version(connection, SCHEMA_VERSION)
        return
    while version < SCHEMA_VERSION:
        logger.warning("Migrating the store %s from schema version %d to %d", store.root,
                       version, version + 1)
        STEPS[version](connection, store)
        version += 1
        _set_version(connection, version)


def _set_version(connection: duckdb.DuckDBPyConnection, version: int) -> None:
    connection.execute("INSERT OR REPLACE INTO store_meta VALUES ('schema_version', ?)",
                       [str(version)])


def _v1_to_v2(connection: duckdb.DuckDBPyConnection, store: Store) -> None:
    for column, kind in (("digest_hash", "VARCHAR"), ("started_ns", "BIGINT"),
                         ("ended_ns", "BIGINT")):
        connection.execute(f"ALTER TABLE session_index ADD COLUMN IF NOT EXISTS {column} {kind}")
    rows = connection.execute(
        "SELECT session_id, file, file_sha256, status FROM session_index "
        "WHERE digest_hash IS NULL ORDER BY sealed_at, session_id").fetchall()
    for session_id, file, file_sha256, status in rows:
        entry = _sign_v1_session(store, session_id, file, file_sha256, status)
        if entry is not None:
            connection.execute(
                "UPDATE session_index SET digest_hash = ?, started_ns = ?, ended_ns = ? "
                "WHERE session_id = ?",
                [entry["digest_hash"], entry["first_ts_ns"], entry["last_ts_ns"], session_id])


def _sign_v1_session(store: Store, session_id: str, file: str, file_sha256: str,
                     status: str) -> dict[str, Any] | None:
    path = store.root / file
    if not path.is_file():
        logger.error("Migration: session %s has no file %s; it stays unsigned", session_id,
                     path)
        return None
    sha = digests.sha256_file(path)
    problems = [f.line() for f in verify.check_events(path, session_id, None)
                if f.severity == verify.FAILURE]
    if sha != file_sha256:
        problems.insert(0, f"file SHA-256 {sha} differs from the catalog's {file_sha256}")
    if problems:
        logger.error("Migration: session %s does not verify, so it is not signed: %s",
                     session_id, "; ".join(problems))
        return None
    events = sealed_events(path)
    return digests.append(store.digests_path, store.signer, {
        "type": digests.SESSION,
        "origin": "migration",
        "session_id": session_id,
        "status": status,
        "file": file,
        "file_sha256": sha,
        "file_bytes": path.stat().st_size,
        **digests.session_facts(events),
        "schema_version": 1,
        "sealed_at_ns": None,
    })


def sealed_events(path: Path) -> list[dict[str, Any]]:
    """Return the events of a sealed file, decoded from `record`, in stored order."""
    connection = duckdb.connect(":memory:")
    try:
        rows = connection.execute(
            "SELECT record FROM read_parquet(?, file_row_number = true, "
            "hive_partitioning = false) ORDER BY file_row_number", [str(path)]).fetchall()
    finally:
        connection.close()
    return [json.loads(row[0]) for row in rows]


STEPS: dict[int, Callable[[duckdb.DuckDBPyConnection, Store], None]] = {1: _v1_to_v2}
