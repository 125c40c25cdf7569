"""Tests for reading sessions back: the session list, one session's statements and free SQL."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from appliance.errors import NotFound, StoreError
from appliance.recordings import replay
from appliance.recordings.schema import SCHEMA_VERSION
from appliance.recordings.store import Store

WriteSession = Callable[..., Any]
SESSION_ID = "sess-replay-test"

EVENTS: list[dict[str, Any]] = [
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.query",
     "sql": "SELECT 1"},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "done",
     "rows_returned": 1},
    {"kind": "blocked", "host": "evil.example", "method": "GET", "path": "/",
     "detail": '{"reason": "host is not in the allowlist"}'},
    {"kind": "request", "statement_id": "st-000002", "api_method": "datasets.delete"},
]


def duckdb_error_of(sql: str) -> str:
    connection = duckdb.connect(":memory:")
    try:
        connection.execute(sql)
    except duckdb.Error as error:
        return str(error)
    finally:
        connection.close()
    raise AssertionError(f"DuckDB accepted {sql!r}")


def test_run_query_invalid_sql(store: Store) -> None:
    sql = "SELEC * FROM sessions"

    with pytest.raises(StoreError) as raised:
        replay.run_query(store, sql)

    assert str(raised.value).startswith("The query failed: ")
    assert duckdb_error_of(sql) in str(raised.value)


def test_run_query_unknown_table(store: Store) -> None:
    with pytest.raises(StoreError, match="no_such_table"):
        replay.run_query(store, "SELECT * FROM no_such_table")


def test_run_query_returns_columns(store: Store) -> None:
    result = replay.run_query(store, "SELECT 1 AS one, 'a' AS letter")

    assert result.columns == ["one", "letter"]
    assert result.rows == [(1, "a")]


def test_run_query_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        replay.run_query(Store(tmp_path / "absent"), "SELECT 1")


def test_run_query_rejects_newer_schema(store: Store) -> None:
    with store.catalog(write=True):
        pass
    connection = duckdb.connect(str(store.catalog_path))
    try:
        connection.execute("UPDATE store_meta SET value = ? WHERE key = 'schema_version'",
                           [str(SCHEMA_VERSION + 1)])
    finally:
        connection.close()

    with pytest.raises(StoreError, match="newer than this appliance"):
        replay.run_query(store, "SELECT * FROM sessions")


def test_list_sessions_columns(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, EVENTS)

    result = replay.list_sessions(store)

    assert result.columns == list(replay.SESSION_COLUMNS)
    assert [row["session_id"] for row in result.records()] == [SESSION_ID]


def test_session_detail_known_session(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, EVENTS)

    detail = replay.session_detail(store, SESSION_ID)

    assert detail["status"] == "completed"
    assert detail["statements"] == 2


@pytest.mark.parametrize("session_id", ["no-such-session", "it's'; DROP TABLE x; --"])
def test_session_detail_unknown_raises(store: Store, write_session: WriteSession,
                                       session_id: str) -> None:
    write_session(SESSION_ID, EVENTS)

    with pytest.raises(NotFound, match="is not in the store"):
        replay.session_detail(store, session_id)


def test_statements_in_order(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, EVENTS)

    result = replay.statements(store, SESSION_ID)
    rows = result.records()

    assert result.columns == list(replay.STATEMENT_COLUMNS)
    assert [row["statement_id"] for row in rows] == ["st-000001", "st-000002"]
    assert [row["outcome"] for row in rows] == ["done", "unknown"]


def test_other_events_lists_blocked(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, EVENTS)

    rows = replay.other_events(store, SESSION_ID).records()

    assert [row["kind"] for row in rows] == ["blocked"]
    assert rows[0]["host"] == "evil.example"
    assert rows[0]["reason"] == "host is not in the allowlist"


@pytest.mark.parametrize(("value", "expected"), [
    (datetime.datetime(2024, 2, 29, 12, 0, 0, 5), "2024-02-29T12:00:00.000005Z"),
    (7, 7),
    (None, None),
    ("text", "text"),
])
def test_plain_converts_values(value: object, expected: object) -> None:
    assert replay.plain(value) == expected
