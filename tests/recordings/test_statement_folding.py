"""Tests for how the `statements` view folds BigQuery job events: scripts and their child jobs,
dry runs, transient errors, uploads, result digests and destructive statements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.recordings.replay import run_query
from appliance.recordings.store import Store

WriteSession = Callable[..., Any]
SESSION_ID = "sess-folding-test"


def folded(store: Store, write_session: WriteSession,
           events: list[dict[str, Any]]) -> dict[str, Any]:
    write_session(SESSION_ID, events)
    rows = run_query(store, "SELECT * FROM statements").records()
    assert len(rows) == 1
    return rows[0]


SCRIPT = [
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.insert",
     "job_id": "script_1", "sql": "CREATE TABLE d.t AS SELECT 1; DROP TABLE d.u;"},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "done",
     "job_id": "script_1", "statement_type": "SCRIPT", "bytes_processed": 100,
     "rows_returned": 0},
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.list",
     "parent_job_id": "script_1"},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "done",
     "parent_job_id": "script_1", "destructive": True,
     "detail": '{"bigquery": {"child_jobs": [{"job_id": "c0"}, {"job_id": "c1"}]}}'},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "done",
     "job_id": "c1", "parent_job_id": "script_1", "statement_type": "DROP_TABLE",
     "bytes_processed": 60, "destructive": True},
]


def test_script_counts_its_bytes_once(store: Store, write_session: WriteSession) -> None:
    row = folded(store, write_session, SCRIPT)
    assert (row["statement_type"], row["job_id"], row["bytes_processed"]) == \
        ("SCRIPT", "script_1", 100)


def test_script_lists_child_jobs(store: Store, write_session: WriteSession) -> None:
    row = folded(store, write_session, SCRIPT)
    assert sorted(row["child_job_ids"]) == ["c0", "c1"]


def test_destructive_child_marks_script(store: Store, write_session: WriteSession) -> None:
    assert folded(store, write_session, SCRIPT)["destructive"] is True


DRY_RUN = [
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.query",
     "sql": "DROP TABLE d.t", "dry_run": True, "destructive": True},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "done",
     "statement_type": "DROP_TABLE", "bytes_processed": 0, "destructive": True},
]


def test_dry_run_is_an_estimate_only(store: Store, write_session: WriteSession) -> None:
    row = folded(store, write_session, DRY_RUN)
    assert (row["bytes_processed"], row["estimated_bytes"], row["destructive"]) == \
        (None, 0, False)


TRANSIENT = [
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.insert",
     "job_id": "j", "sql": "SELECT 1"},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "running",
     "job_id": "j"},
    {"kind": "response", "statement_id": "st-000001", "status": 404, "transient": True,
     "error_reason": "notFound"},
    {"kind": "response", "statement_id": "st-000001", "status": 200, "outcome": "done",
     "job_id": "j", "result_digest": "sha256:aa", "result_bytes": 10},
    {"kind": "response", "statement_id": "st-000001", "status": 409, "transient": True,
     "error_reason": "duplicate"},
]


def test_transient_errors_do_not_fail(store: Store, write_session: WriteSession) -> None:
    row = folded(store, write_session, TRANSIENT)
    assert (row["outcome"], row["error_reason"], row["transient_errors"]) == ("done", None, 2)


def test_result_digests_listed(store: Store, write_session: WriteSession) -> None:
    row = folded(store, write_session, TRANSIENT)
    assert (row["result_digests"], row["result_bytes"]) == (["sha256:aa"], 10)


UPLOAD = [
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.insert",
     "job_type": "LOAD", "source_format": "CSV", "write_disposition": "WRITE_APPEND"},
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.insert",
     "upload_bytes": 262144},
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.insert",
     "upload_bytes": 262144},
    {"kind": "request", "statement_id": "st-000001", "api_method": "jobs.insert",
     "upload_bytes": 1000, "detail": '{"bigquery": {"upload_total": 525288}}'},
]


def test_upload_bytes_from_declared_total(store: Store, write_session: WriteSession) -> None:
    row = folded(store, write_session, UPLOAD)
    assert (row["job_type"], row["upload_bytes"], row["requests"]) == ("LOAD", 525288, 4)
