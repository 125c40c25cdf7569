"""Tests for the `sessions`, `statements` and `events` views over sealed and live sessions."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest

from appliance.recordings.replay import run_query
from appliance.recordings.schema import EVENT_COLUMNS
from appliance.recordings.store import Store

WriteSession = Callable[..., Any]
SESSION_ID = "sess-views-test"
MILLISECOND = datetime.timedelta(milliseconds=1)
# The session start time the `write_session` fixture records (2024-02-29T12:00:00Z).
STARTED_AT = datetime.datetime(2024, 2, 29, 12, 0, 0)

SESSIONS_COLUMNS = ["session_id", "agent", "principal", "unix_user", "operator", "project",
                    "command", "started_at", "ended_at", "status", "exit_code", "statements",
                    "events"]
STATEMENTS_COLUMNS = ["session_id", "statement_index", "statement_id", "agent", "principal",
                      "unix_user", "operator", "api_method", "sql", "parameters", "project",
                      "location", "job_id", "dataset_id", "table_id", "statement_type",
                      "dry_run", "outcome", "error_reason", "error_message", "bytes_processed",
                      "rows_affected", "rows_returned", "requested_at", "responded_at",
                      "requests", "first_seq"]

# One query statement that needed a poll and a second page, then a failed DML statement and a
# blocked request that belongs to no statement. Events get seq 1.. and ts START + seq ms.
QUERY = "st-000001"
DML = "st-000002"
STATEMENT_EVENTS: list[dict[str, Any]] = [
    {"kind": "request", "statement_id": QUERY, "api_method": "jobs.query", "project": "proj",
     "sql": "SELECT name FROM ds.people", "parameters": '[{"name": "x"}]'},
    {"kind": "response", "statement_id": QUERY, "status": 200, "outcome": "running",
     "job_id": "job_1", "location": "EU", "rows_returned": 0},
    {"kind": "request", "statement_id": QUERY, "api_method": "jobs.getQueryResults",
     "job_id": "job_1"},
    {"kind": "response", "statement_id": QUERY, "status": 200, "outcome": "done",
     "statement_type": "SELECT", "bytes_processed": 1024, "rows_returned": 10},
    {"kind": "request", "statement_id": QUERY, "api_method": "jobs.getQueryResults",
     "job_id": "job_1", "path": "/q?pageToken=2"},
    {"kind": "response", "statement_id": QUERY, "status": 200, "rows_returned": 5},
    {"kind": "request", "statement_id": DML, "api_method": "jobs.insert", "project": "proj",
     "sql": "DELETE FROM ds.people WHERE true", "dry_run": False},
    {"kind": "response", "statement_id": DML, "status": 400, "outcome": "error",
     "error_reason": "invalidQuery", "error_message": "Table ds.people was not found"},
    {"kind": "blocked", "host": "evil.example", "detail": '{"reason": "not allowed"}'},
]


def statement_rows(store: Store) -> dict[str, dict[str, Any]]:
    result = run_query(store, "SELECT * FROM statements ORDER BY statement_index")
    return {str(row["statement_id"]): row for row in result.records()}


@pytest.mark.parametrize(("view", "expected"), [
    ("sessions", SESSIONS_COLUMNS),
    ("statements", STATEMENTS_COLUMNS),
    ("events", [*EVENT_COLUMNS, "ts"]),
])
def test_view_columns_documented(store: Store, write_session: WriteSession, view: str,
                                 expected: list[str]) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS)

    columns = run_query(store, f"SELECT * FROM {view}").columns
    missing = [column for column in expected if column not in columns]
    assert missing == []


@pytest.mark.parametrize("view", ["sessions", "statements", "events"])
def test_empty_store_empty_views(store: Store, view: str) -> None:
    result = run_query(store, f"SELECT * FROM {view}")

    assert result.rows == []
    assert result.columns != []


def test_sessions_row_for_sealed_session(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS)

    rows = run_query(store, "SELECT * FROM sessions").records()

    assert len(rows) == 1
    row = rows[0]
    assert row["session_id"] == SESSION_ID
    assert row["agent"] == "analyst"
    assert row["principal"] == "agent-analyst@proj.iam.gserviceaccount.com"
    assert row["unix_user"] == "appliance-agent"
    assert row["operator"] == "alice"
    assert row["project"] == "proj"
    assert row["command"] == "python agent.py"
    assert row["started_at"] == STARTED_AT
    assert row["ended_at"] == STARTED_AT + (len(STATEMENT_EVENTS) + 1) * MILLISECOND
    assert row["status"] == "completed"
    assert row["exit_code"] == 3
    assert row["statements"] == 2
    assert row["events"] == len(STATEMENT_EVENTS) + 2


def test_statement_folds_poll_and_pages(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS)

    row = statement_rows(store)[QUERY]

    assert row["statement_index"] == 1
    assert row["api_method"] == "jobs.query"
    assert row["sql"] == "SELECT name FROM ds.people"
    assert row["parameters"] == '[{"name": "x"}]'
    assert row["job_id"] == "job_1"
    assert row["location"] == "EU"
    assert row["statement_type"] == "SELECT"
    assert row["outcome"] == "done"
    assert row["bytes_processed"] == 1024
    assert row["rows_returned"] == 15
    assert row["requests"] == 3
    assert row["dry_run"] is False
    assert row["agent"] == "analyst"


def test_statement_request_and_response_times(store: Store,
                                              write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS)

    row = statement_rows(store)[QUERY]

    assert row["requested_at"] == STARTED_AT + 1 * MILLISECOND
    assert row["responded_at"] == STARTED_AT + 6 * MILLISECOND
    assert row["requested_at"] < row["responded_at"]


def test_statement_error_outcome(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS)

    row = statement_rows(store)[DML]

    assert row["statement_index"] == 2
    assert row["sql"] == "DELETE FROM ds.people WHERE true"
    assert row["outcome"] == "error"
    assert row["error_reason"] == "invalidQuery"
    assert row["error_message"] == "Table ds.people was not found"
    assert row["rows_returned"] is None


def test_statement_without_response_unknown(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, [{"kind": "request", "statement_id": QUERY, "sql": "SELECT 1"}])

    row = statement_rows(store)[QUERY]

    assert row["outcome"] == "unknown"
    assert row["responded_at"] is None


def test_events_include_unattached_events(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS)

    kinds = run_query(store, "SELECT kind FROM events ORDER BY seq").rows

    assert [kind for (kind,) in kinds] == [
        "session_start", *(event["kind"] for event in STATEMENT_EVENTS), "session_end"]


def test_live_session_shows_running(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS[:2], seal=False)

    rows = run_query(store, "SELECT session_id, status, events, ended_at FROM sessions").rows

    assert rows == [(SESSION_ID, "running", 3, None)]


def test_live_statement_in_view(store: Store, write_session: WriteSession) -> None:
    write_session(SESSION_ID, STATEMENT_EVENTS[:2], seal=False)

    row = statement_rows(store)[QUERY]

    assert row["sql"] == "SELECT name FROM ds.people"
    assert row["outcome"] == "running"


def test_live_torn_tail_is_skipped(store: Store, write_session: WriteSession) -> None:
    journal = write_session(SESSION_ID, [], seal=False)
    with open(journal.path, "ab") as handle:
        handle.write(b'{"kind":"request","session_id":"sess-views-test","seq":1,"st')

    rows = run_query(store, "SELECT session_id, events FROM sessions").rows

    assert rows == [(SESSION_ID, 1)]


def test_sealed_and_live_together(store: Store, write_session: WriteSession) -> None:
    write_session("sess-sealed", STATEMENT_EVENTS)
    write_session("sess-live", [], seal=False)

    rows = run_query(store, "SELECT session_id, status FROM sessions ORDER BY session_id").rows

    assert rows == [("sess-live", "running"), ("sess-sealed", "completed")]


def test_recovered_session_interrupted(store: Store, write_session: WriteSession) -> None:
    journal = write_session(SESSION_ID, STATEMENT_EVENTS[:2], seal=False)
    journal.close()
    journal.release()
    store.recover()

    rows = run_query(store, "SELECT status, ended_at IS NOT NULL FROM sessions").rows

    assert rows == [("interrupted", True)]
