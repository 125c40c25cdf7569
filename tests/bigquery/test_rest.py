"""Tests for the BigQuery REST v2 decoder, driven by captured and hand-edited traffic.

Each fixture in ``fixtures/`` is one request/response pair. Those with ``"source": "captured"``
were recorded by ``capture_fixtures.py`` from google-cloud-bigquery talking to local-bigquery;
``handedited-*`` fixtures add fields that local-bigquery does not return. The expectations below
list every field that is not None, so a field decoded by mistake fails a test as well.
"""

from __future__ import annotations

import base64
import gzip
import json
import pathlib
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.bigquery import rest
from appliance.bigquery.rest import (
    RequestInfo,
    ResponseInfo,
    decode_request,
    decode_response,
    is_bigquery_host,
    split_job_id,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
JSON_HEADERS = {"Content-Type": "application/json"}
QUERIES_URL = "https://bigquery.googleapis.com/bigquery/v2/projects/p/queries"
JOBS_URL = "https://bigquery.googleapis.com/bigquery/v2/projects/p/jobs"


def load_fixture(name: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return fixture


def body_bytes(message: dict[str, Any]) -> bytes:
    if "body_base64" in message:
        return base64.b64decode(message["body_base64"])
    body: str = message["body"]
    return body.encode("utf-8")


def decode_fixture(name: str) -> tuple[RequestInfo, ResponseInfo]:
    fixture = load_fixture(name)
    request, response = fixture["request"], fixture["response"]
    request_info = decode_request(
        request["method"], request["url"], request["headers"], body_bytes(request)
    )
    response_info = decode_response(
        request_info, response["status"], response["headers"], body_bytes(response)
    )
    return request_info, response_info


def present(info: RequestInfo | ResponseInfo) -> dict[str, Any]:
    return {key: value for key, value in info.as_record().items() if value is not None}


def bq(api_method: str, **fields: Any) -> dict[str, Any]:
    return {"api": "bigquery.v2", "api_method": api_method, "starts_statement": False} | fields



# fixture name -> (expected non-None request fields, expected non-None response fields)
EXPECTED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "bq_session-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_session_1",
            sql="SELECT 1 AS one",
            use_legacy_sql=False,
            job_type="QUERY",
            create_session=True,
            session_action="create",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_session_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
            "bq_session_id": "z_algty_TUCWfD5XLDcDAA",
        },
    ),
    "bq_session-02.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_session_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_session_1",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "rows_returned": 0,
            "total_rows": 1,
            "cache_hit": False,
        },
    ),
    "bq_session-03.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="SELECT 2 AS two",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="400cb70f-964e-43c0-b4a3-165de1ab3e01",
            bq_session_id="z_algty_TUCWfD5XLDcDAA",
            session_action="use",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "400cb70f-964e-43c0-b4a3-165de1ab3e01",
            "query_id": "400cb70f-964e-43c0-b4a3-165de1ab3e01",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_returned": 1,
            "total_rows": 1,
            "cache_hit": False,
            "slot_ms": 0,
            "bq_session_id": "z_algty_TUCWfD5XLDcDAA",
        },
    ),
    "bq_session-04.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="CALL BQ.ABORT_SESSION()",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="83d8e92d-f2ad-4c0e-a683-acdf2060d7c4",
            bq_session_id="z_algty_TUCWfD5XLDcDAA",
            session_action="abort",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "83d8e92d-f2ad-4c0e-a683-acdf2060d7c4",
            "query_id": "83d8e92d-f2ad-4c0e-a683-acdf2060d7c4",
            "job_complete": True,
            "outcome": "done",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_returned": 0,
            "total_rows": 0,
            "cache_hit": False,
            "slot_ms": 0,
            "bq_session_id": "z_algty_TUCWfD5XLDcDAA",
        },
    ),
    "copy_tables-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_copy_1",
            dataset_id="agent_ds",
            table_id="people_copy",
            job_type="COPY",
            source_tables=["local.agent_ds.people"],
            write_disposition="WRITE_TRUNCATE",
            destructive=True,
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_copy_1",
            "state": "DONE",
            "outcome": "done",
            "bytes_processed": 0,
            "rows_affected": 6,
            "job_type": "COPY",
            "job_statistics": {"copied_rows": 6, "copied_bytes": 0},
        },
    ),
    "datasets_delete-01.json": (
        bq(
            "datasets.delete",
            project="local",
            dataset_id="agent_ds",
            delete_contents=True,
            destructive=True,
            starts_statement=True,
        ),
        {"outcome": "done"},
    ),
    "datasets_insert-01.json": (
        bq(
            "datasets.insert",
            project="local",
            dataset_id="agent_ds",
            labels={"team": "agents"},
            starts_statement=True,
        ),
        {"outcome": "done"},
    ),
    "ddl_drop-01.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="CREATE OR REPLACE TABLE `local.agent_ds.doomed` AS SELECT 1 AS x",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="428474c1-5e9e-4ba7-a6a8-6bd5a7550d23",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "428474c1-5e9e-4ba7-a6a8-6bd5a7550d23",
            "query_id": "428474c1-5e9e-4ba7-a6a8-6bd5a7550d23",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "CREATE_TABLE_AS_SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_returned": 0,
            "total_rows": 0,
            "cache_hit": False,
            "slot_ms": 0,
        },
    ),
    "ddl_drop-02.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_drop_1",
            sql="DROP TABLE `local.agent_ds.doomed`",
            use_legacy_sql=False,
            job_type="QUERY",
            destructive=True,
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_drop_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "DROP_TABLE",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
            "ddl_operation": "DROP",
            "ddl_target": "local.agent_ds.doomed",
            "destructive": True,
        },
    ),
    "ddl_drop-03.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_drop_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_drop_1",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "DROP_TABLE",
            "bytes_processed": 0,
            "rows_returned": 0,
            "total_rows": 0,
            "cache_hit": False,
            "destructive": True,
        },
    ),
    "ddl_drop-04.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="TRUNCATE TABLE `local.agent_ds.people`",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="94a2de50-ff54-4939-a9d6-bd800bc49874",
            destructive=True,
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "94a2de50-ff54-4939-a9d6-bd800bc49874",
            "query_id": "94a2de50-ff54-4939-a9d6-bd800bc49874",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "TRUNCATE_TABLE",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_affected": 10,
            "rows_returned": 0,
            "total_rows": 0,
            "cache_hit": False,
            "slot_ms": 0,
            "destructive": True,
        },
    ),
    "dml_update-01.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="UPDATE `local.agent_ds.people` SET score = score + 1 WHERE id > 20",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="cfc2ffe4-ed22-41f1-ad33-ce50dcfe4bcc",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "cfc2ffe4-ed22-41f1-ad33-ce50dcfe4bcc",
            "query_id": "cfc2ffe4-ed22-41f1-ad33-ce50dcfe4bcc",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "UPDATE",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_affected": 5,
            "rows_returned": 0,
            "total_rows": 0,
            "cache_hit": False,
            "slot_ms": 0,
            "dml_stats": {"inserted_rows": None, "deleted_rows": None, "updated_rows": 5},
        },
    ),
    "dry_run-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="3f0279a1-abe7-420e-89e0-b9583a589e65",
            sql="SELECT name FROM `local.agent_ds.people` WHERE id = 7",
            dry_run=True,
            use_legacy_sql=False,
            job_type="QUERY",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
        },
    ),
    "extract_gcs-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_extract_1",
            dataset_id="agent_ds",
            table_id="people",
            job_type="EXTRACT",
            destination_uris=["gs://agent-bucket/people-*.csv"],
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_extract_1",
            "state": "DONE",
            "outcome": "done",
            "bytes_processed": 0,
            "job_type": "EXTRACT",
            "job_statistics": {"input_bytes": 0, "file_counts": [1]},
        },
    ),
    "handedited-getqueryresults_not_found.json": (
        bq("jobs.getQueryResults", project="agent-project", location="EU", job_id="job_missing"),
        {
            "outcome": "error",
            "error_reason": "notFound",
            "error_message": "Not found: Job agent-project:EU.job_missing",
        },
    ),
    "handedited-insertall_row_errors.json": (
        bq(
            "tabledata.insertAll",
            project="local",
            dataset_id="agent_ds",
            table_id="people",
            row_count=2,
            insert_id_count=2,
            starts_statement=True,
        ),
        {
            "outcome": "error",
            "error_reason": "invalid",
            "error_message": "1 rows were rejected: Cannot convert value to integer (bad value): not a number",
        },
    ),
    "handedited-job_creation_optional_no_job.json": (
        bq(
            "jobs.query",
            project="agent-project",
            location="EU",
            sql="SELECT 17 AS answer",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="26b8e5ba-2d10-49f2-a2f5-6763d5236ac1",
            job_creation_mode="JOB_CREATION_OPTIONAL",
            starts_statement=True,
        ),
        {
            "location": "EU",
            "query_id": "AKuT0d7ZQ3xL2-uG9vYdWxN1sRk_",
            "job_complete": True,
            "outcome": "done",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_returned": 1,
            "total_rows": 1,
            "cache_hit": False,
            "slot_ms": 3,
        },
    ),
    "handedited-jobs_get_dml_statistics.json": (
        bq("jobs.get", project="example.com:agent-project", location="EU", job_id="job_dml_1"),
        {
            "project": "example.com:agent-project",
            "location": "EU",
            "job_id": "job_dml_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "DELETE",
            "bytes_processed": 1048576,
            "bytes_billed": 10485760,
            "rows_affected": 42,
            "cache_hit": False,
            "job_type": "QUERY",
            "slot_ms": 2210,
            "dml_stats": {"inserted_rows": None, "deleted_rows": 42, "updated_rows": None},
        },
    ),
    "job_error-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_error_1",
            sql="SELECT * FROM `local.agent_ds.missing_table`",
            use_legacy_sql=False,
            job_type="QUERY",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_error_1",
            "state": "DONE",
            "outcome": "error",
            "error_reason": "notFound",
            "error_message": "Not found: Table local:agent_ds.missing_table was not found in location US",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
        },
    ),
    "job_incomplete-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_slow_1",
            sql="SELECT SUM(MOD(a * b, 7)) AS s FROM UNNEST(GENERATE_ARRAY(1, 60000)) AS a, UNNEST(GENERATE_ARRAY(1, 60000)) AS b",
            use_legacy_sql=False,
            job_type="QUERY",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_slow_1",
            "state": "RUNNING",
            "outcome": "running",
            "job_type": "QUERY",
        },
    ),
    "job_incomplete-02.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_slow_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_slow_1",
            "job_complete": False,
            "outcome": "running",
        },
    ),
    "job_incomplete-03.json": (
        bq("jobs.get", project="local", location="US", job_id="capture_slow_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_slow_1",
            "state": "RUNNING",
            "outcome": "running",
            "job_type": "QUERY",
        },
    ),
    "jobs_cancel-01.json": (
        bq(
            "jobs.cancel",
            project="local",
            location="US",
            job_id="capture_slow_1",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_slow_1",
            "state": "DONE",
            "outcome": "error",
            "error_reason": "stopped",
            "error_message": "Job execution was cancelled: User requested cancellation",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
        },
    ),
    "jobs_get-01.json": (
        bq("jobs.get", project="local", location="US", job_id="capture_select_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_select_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
        },
    ),
    "jobs_insert_query-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_select_1",
            sql="SELECT id, name FROM `local.agent_ds.people` WHERE id <= 3 ORDER BY id",
            use_legacy_sql=False,
            job_type="QUERY",
            labels={"agent": "nightly"},
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_select_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
        },
    ),
    "jobs_insert_query-02.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_select_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_select_1",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "rows_returned": 0,
            "total_rows": 3,
            "cache_hit": False,
        },
    ),
    "jobs_list-01.json": (bq("jobs.list", project="local"), {"outcome": "done"}),
    "jobs_query-01.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="SELECT COUNT(*) AS n FROM `local.agent_ds.people`",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="17cde531-518b-48ab-af8d-8e8e32474e22",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "17cde531-518b-48ab-af8d-8e8e32474e22",
            "query_id": "17cde531-518b-48ab-af8d-8e8e32474e22",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "rows_returned": 1,
            "total_rows": 1,
            "cache_hit": False,
            "slot_ms": 0,
        },
    ),
    "load_multipart-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_load_1",
            dataset_id="agent_ds",
            table_id="loaded",
            job_type="LOAD",
            upload_type="multipart",
            upload_bytes=15,
            source_format="CSV",
            write_disposition="WRITE_TRUNCATE",
            destructive=True,
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_load_1",
            "state": "DONE",
            "outcome": "done",
            "bytes_processed": 0,
            "rows_affected": 2,
            "job_type": "LOAD",
            "job_statistics": {
                "input_files": 1,
                "input_bytes": 15,
                "output_rows": 2,
                "output_bytes": 32,
                "bad_records": 0,
            },
        },
    ),
    "load_resumable-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_resumable_1",
            dataset_id="agent_ds",
            table_id="loaded_resumable",
            job_type="LOAD",
            upload_type="resumable",
            source_format="CSV",
            starts_statement=True,
        ),
        {"outcome": "done", "upload_id": "23fda0bc-bc59-49ee-a536-170bd3f1d9ed"},
    ),
    "load_resumable-02.json": (
        bq(
            "jobs.insert",
            project="local",
            upload_type="resumable",
            upload_id="23fda0bc-bc59-49ee-a536-170bd3f1d9ed",
            upload_bytes=262144,
            content_range="bytes 0-262143/*",
        ),
        {"outcome": "running", "upload_received": 262144},
    ),
    "load_resumable-03.json": (
        bq(
            "jobs.insert",
            project="local",
            upload_type="resumable",
            upload_id="23fda0bc-bc59-49ee-a536-170bd3f1d9ed",
            upload_bytes=40749,
            upload_total=302893,
            content_range="bytes 262144-302892/302893",
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_resumable_1",
            "state": "DONE",
            "outcome": "done",
            "bytes_processed": 0,
            "rows_affected": 4000,
            "job_type": "LOAD",
            "job_statistics": {
                "input_files": 1,
                "input_bytes": 302893,
                "output_rows": 4000,
                "output_bytes": 64000,
                "bad_records": 0,
            },
        },
    ),
    "query_dry_run-01.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="SELECT name FROM `local.agent_ds.people`",
            dry_run=True,
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="167dd41a-347a-4e47-8e5a-c63a43514e2e",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "rows_returned": 0,
        },
    ),
    "query_error-01.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="SELEC 1",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="d703d5b0-62c4-4228-9e5d-4d25c8ec9feb",
            starts_statement=True,
        ),
        {
            "outcome": "error",
            "error_reason": "invalidQuery",
            "error_message": 'Syntax error: Unexpected identifier "SELEC" at [1:1]',
        },
    ),
    "query_incomplete-01.json": (
        bq(
            "jobs.query",
            project="local",
            location="US",
            sql="SELECT SUM(MOD(a * b, 7)) AS s FROM UNNEST(GENERATE_ARRAY(1, 30000)) AS a, UNNEST(GENERATE_ARRAY(1, 30000)) AS b",
            use_legacy_sql=False,
            job_type="QUERY",
            request_id="c8bd8770-d23a-42d9-bd31-09bf6bd33d83",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "c8bd8770-d23a-42d9-bd31-09bf6bd33d83",
            "query_id": "c8bd8770-d23a-42d9-bd31-09bf6bd33d83",
            "job_complete": False,
            "outcome": "running",
            "bytes_billed": 0,
            "slot_ms": 0,
        },
    ),
    "query_paging-03.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_paging_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_paging_1",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "rows_returned": 10,
            "total_rows": 25,
            "cache_hit": False,
        },
    ),
    "query_paging-04.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_paging_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_paging_1",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "rows_returned": 5,
            "total_rows": 25,
            "cache_hit": False,
        },
    ),
    "script_children-01.json": (
        bq(
            "jobs.insert",
            project="local",
            location="US",
            job_id="capture_script_1",
            sql="DECLARE n INT64 DEFAULT 2;\nCREATE TABLE `local.agent_ds.scratch` AS SELECT id FROM `local.agent_ds.people` WHERE id <= n;\nSELECT COUNT(*) AS c FROM `local.agent_ds.scratch`;",
            use_legacy_sql=False,
            job_type="QUERY",
            starts_statement=True,
        ),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_script_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "SCRIPT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
            "num_child_jobs": 2,
        },
    ),
    "script_children-02.json": (
        bq("jobs.getQueryResults", project="local", location="US", job_id="capture_script_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "capture_script_1",
            "job_complete": True,
            "outcome": "done",
            "statement_type": "SCRIPT",
            "bytes_processed": 0,
            "rows_returned": 0,
            "total_rows": 1,
            "cache_hit": False,
        },
    ),
    "script_children-03.json": (
        bq("jobs.list", project="local", parent_job_id="capture_script_1"),
        {
            "outcome": "done",
            "child_jobs": [
                {
                    "job_id": "script_job_capture_script_1_1",
                    "location": "US",
                    "state": "DONE",
                    "statement_type": "SELECT",
                    "ddl_operation": None,
                    "ddl_target": None,
                    "rows_affected": None,
                },
                {
                    "job_id": "script_job_capture_script_1_0",
                    "location": "US",
                    "state": "DONE",
                    "statement_type": "CREATE_TABLE_AS_SELECT",
                    "ddl_operation": "CREATE",
                    "ddl_target": "local.agent_ds.scratch",
                    "rows_affected": None,
                },
            ],
        },
    ),
    "script_children-04.json": (
        bq("jobs.get", project="local", location="US", job_id="script_job_capture_script_1_1"),
        {
            "project": "local",
            "location": "US",
            "job_id": "script_job_capture_script_1_1",
            "state": "DONE",
            "outcome": "done",
            "statement_type": "SELECT",
            "bytes_processed": 0,
            "bytes_billed": 0,
            "cache_hit": False,
            "job_type": "QUERY",
            "parent_job_id": "capture_script_1",
        },
    ),
    "tabledata_insertall-01.json": (
        bq(
            "tabledata.insertAll",
            project="local",
            dataset_id="agent_ds",
            table_id="people",
            row_count=25,
            insert_id_count=25,
            starts_statement=True,
        ),
        {"outcome": "done"},
    ),
    "tabledata_list-01.json": (
        bq("tables.get", project="local", dataset_id="agent_ds", table_id="people"),
        {"outcome": "done"},
    ),
    "tabledata_list-03.json": (
        bq(
            "tabledata.list",
            project="local",
            dataset_id="agent_ds",
            table_id="people",
            starts_statement=True,
        ),
        {"outcome": "done", "rows_returned": 5, "total_rows": 25},
    ),
    "tables_delete-01.json": (
        bq(
            "tables.delete",
            project="local",
            dataset_id="agent_ds",
            table_id="loaded",
            destructive=True,
            starts_statement=True,
        ),
        {"outcome": "done"},
    ),
    "tables_insert-01.json": (
        bq(
            "tables.insert",
            project="local",
            dataset_id="agent_ds",
            table_id="people",
            labels={},
            starts_statement=True,
        ),
        {"outcome": "done"},
    ),
    "tables_patch-02.json": (
        bq(
            "tables.patch",
            project="local",
            dataset_id="agent_ds",
            table_id="people",
            starts_statement=True,
        ),
        {"outcome": "done"},
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_decodes_to_expected_fields(name: str) -> None:
    expected_request, expected_response = EXPECTED[name]
    request_info, response_info = decode_fixture(name)
    assert present(request_info) == expected_request
    assert present(response_info) == expected_response


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*.json")))
def test_every_fixture_decodes_without_error(name: str) -> None:
    request_info, response_info = decode_fixture(name)
    assert request_info.api == "bigquery.v2"
    assert request_info.api_method != rest.OTHER_METHOD
    assert request_info.decode_error is None
    assert response_info.decode_error is None
    json.dumps(request_info.as_record(), allow_nan=False)
    json.dumps(response_info.as_record(), allow_nan=False)


def test_named_parameters_are_kept_as_sent() -> None:
    fixture = load_fixture("params_named-01.json")
    sent = json.loads(fixture["request"]["body"])
    request_info, _ = decode_fixture("params_named-01.json")
    assert request_info.parameters == sent["queryParameters"]
    assert request_info.parameter_mode == "NAMED"
    assert request_info.sql == sent["query"]
    assert "@min_id" in (request_info.sql or "")
    struct = request_info.parameters[2]
    assert struct["parameterType"]["type"] == "STRUCT"
    # google-cloud-bigquery 3.47 sends a FLOAT64 inside a STRUCT as a JSON number.
    assert struct["parameterValue"]["structValues"]["max_score"] == {"value": 9.5}


def test_positional_parameters_and_non_ascii_sql() -> None:
    request_info, _ = decode_fixture("params_positional-01.json")
    assert request_info.parameter_mode == "POSITIONAL"
    assert request_info.sql == (
        "SELECT id FROM `local.agent_ds.people` WHERE id > ? AND id IN UNNEST(?) -- ünïcode"
    )
    assert request_info.parameters == [
        {"parameterType": {"type": "INT64"}, "parameterValue": {"value": "3"}},
        {
            "parameterType": {"type": "ARRAY", "arrayType": {"type": "INT64"}},
            "parameterValue": {"arrayValues": [{"value": "1"}, {"value": "2"}, {"value": "3"}]},
        },
    ]


def test_sql_is_kept_byte_for_byte() -> None:
    sql = "SELECT '\\u00e9\\t' AS a,\r\n  \"x\"\t-- trailing spaces   \n"
    body = json.dumps({"query": sql}).encode()
    assert decode_request("POST", QUERIES_URL, JSON_HEADERS, body).sql == sql


@pytest.mark.parametrize(
    ("method", "path", "api_method", "starts_statement"),
    [
        ("GET", "projects", "projects.list", False),
        ("GET", "projects/p/serviceAccount", "projects.getServiceAccount", False),
        ("GET", "projects/p/jobs", "jobs.list", False),
        ("DELETE", "projects/p/jobs/j/delete", "jobs.delete", True),
        ("GET", "projects/p/datasets", "datasets.list", False),
        ("GET", "projects/p/datasets/d", "datasets.get", False),
        ("PATCH", "projects/p/datasets/d", "datasets.patch", True),
        ("PUT", "projects/p/datasets/d", "datasets.update", True),
        ("POST", "projects/p/datasets/d:undelete", "datasets.undelete", True),
        ("GET", "projects/p/datasets/d/tables", "tables.list", False),
        ("PUT", "projects/p/datasets/d/tables/t", "tables.update", True),
        ("POST", "projects/p/datasets/d/tables/t:getIamPolicy", "tables.getIamPolicy", False),
        ("POST", "projects/p/datasets/d/tables/t:setIamPolicy", "tables.setIamPolicy", True),
        (
            "POST",
            "projects/p/datasets/d/tables/t:testIamPermissions",
            "tables.testIamPermissions",
            False,
        ),
        (
            "POST",
            "projects/p/datasets/d/tables/t/rowAccessPolicies:batchDelete",
            "rowAccessPolicies.batchDelete",
            True,
        ),
        ("GET", "projects/p/datasets/d/routines/r", "routines.get", False),
        ("POST", "projects/p/datasets/d/routines", "routines.insert", True),
        ("DELETE", "projects/p/datasets/d/routines/r", "routines.delete", True),
        ("GET", "projects/p/datasets/d/models", "models.list", False),
        ("PATCH", "projects/p/datasets/d/models/m", "models.patch", True),
        ("DELETE", "projects/p/datasets/d/models/m", "models.delete", True),
        ("GET", "projects/p/datasets/d/tables/t/nonsense", "bigquery.other", False),
        ("POST", "projects/p/datasets/d/tables/t/nonsense", "bigquery.other", True),
        ("GET", "projects/p/queries", "bigquery.other", False),
        ("DELETE", "projects/p/jobs/j", "bigquery.other", True),
    ],
)
def test_path_and_method_name_the_api_method(
    method: str, path: str, api_method: str, starts_statement: bool
) -> None:
    url = f"https://bigquery.googleapis.com/bigquery/v2/{path}"
    info = decode_request(method, url, {}, b"")
    assert (info.api_method, info.starts_statement) == (api_method, starts_statement)


def test_path_segments_are_percent_decoded() -> None:
    url = (
        "https://bigquery.googleapis.com/bigquery/v2/projects/example.com%3Aproj/datasets/d/"
        "routines/my%5Froutine"
    )
    info = decode_request("DELETE", url, {}, b"")
    assert (info.project, info.dataset_id, info.routine_id) == (
        "example.com:proj",
        "d",
        "my_routine",
    )


def test_method_override_header_chooses_the_route() -> None:
    url = "https://bigquery.googleapis.com/bigquery/v2/projects/p/datasets/d/tables/t"
    info = decode_request("POST", url, {"X-HTTP-Method-Override": "DELETE"}, b"")
    assert info.api_method == "tables.delete"
    assert info.starts_statement is True


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("bigquery.googleapis.com", "/bigquery/v2/projects", True),
        ("BigQuery.GoogleAPIs.com.", "/bigquery/v2/projects", True),
        ("bigquery.googleapis.com:443", "/anything", True),
        ("bigquery.mtls.googleapis.com", "/bigquery/v2/projects", True),
        ("bigquery.us-east4.rep.googleapis.com", "/bigquery/v2/projects", True),
        ("bigquery-myendpoint.p.googleapis.com", "/bigquery/v2/projects", True),
        ("www.googleapis.com", "/bigquery/v2/projects/p/jobs", True),
        ("www.googleapis.com", "/upload/bigquery/v2/projects/p/jobs", True),
        ("www.googleapis.com", "/bigquery/v2x/projects", False),
        ("www.googleapis.com", "/storage/v1/b", False),
        ("bigquerystorage.googleapis.com", "/bigquery/v2/projects", False),
        ("bigquery.googleapis.com.evil.example", "/bigquery/v2/projects", False),
        ("oauth2.googleapis.com", "/token", False),
    ],
)
def test_bigquery_hosts(host: str, path: str, expected: bool) -> None:
    assert is_bigquery_host(host, path) is expected


def test_non_bigquery_traffic_leaves_every_field_unset() -> None:
    info = decode_request("POST", "https://oauth2.googleapis.com/token", {}, b"grant_type=x")
    assert info == RequestInfo()
    assert decode_response(info, 200, {}, b"{}") == ResponseInfo()


def test_shared_host_and_unknown_path_on_bigquery_host() -> None:
    shared = decode_request(
        "GET", "https://www.googleapis.com/bigquery/v2/projects/p/jobs", {}, b""
    )
    assert (shared.api_method, shared.project) == ("jobs.list", "p")
    other = decode_request("GET", "https://bigquery.googleapis.com/$discovery/rest", {}, b"")
    assert (other.api, other.api_method) == ("bigquery.v2", "bigquery.other")


def test_regional_endpoint_supplies_the_location() -> None:
    url = "https://bigquery.europe-west3.rep.googleapis.com/bigquery/v2/projects/p/jobs/j"
    assert decode_request("GET", url, {}, b"").location == "europe-west3"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("job_1", (None, None, "job_1")),
        ("local:US.job_1", ("local", "US", "job_1")),
        ("my-project:europe-west3.abc-123", ("my-project", "europe-west3", "abc-123")),
        ("example.com:proj:EU.job_1", ("example.com:proj", "EU", "job_1")),
        ("US.job_1", (None, "US", "job_1")),
        ("proj:job_1", ("proj", None, "job_1")),
        ("a.b.c", (None, None, "a.b.c")),
        ("", (None, None, "")),
    ],
)
def test_split_job_id(value: str, expected: tuple[str | None, str | None, str]) -> None:
    assert split_job_id(value) == expected


def test_full_job_name_in_path_is_split() -> None:
    url = "https://bigquery.googleapis.com/bigquery/v2/projects/p/jobs/p:EU.job_7"
    info = decode_request("GET", url, {}, b"")
    assert (info.project, info.location, info.job_id) == ("p", "EU", "job_7")


def test_gzip_request_body_is_decompressed() -> None:
    fixture = load_fixture("dml_update-01.json")
    body = gzip.compress(body_bytes(fixture["request"]))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    info = decode_request("POST", fixture["request"]["url"], headers, body)
    assert info.decode_error is None
    assert info.sql == "UPDATE `local.agent_ds.people` SET score = score + 1 WHERE id > 20"


def test_gzip_response_body_is_decompressed() -> None:
    fixture = load_fixture("dml_update-01.json")
    request_info, expected = decode_fixture("dml_update-01.json")
    body = gzip.compress(body_bytes(fixture["response"]))
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    assert decode_response(request_info, 200, headers, body) == expected


@pytest.mark.parametrize(
    ("headers", "body", "error"),
    [
        (JSON_HEADERS, b"{not json", "invalid JSON: Expecting property name"),
        (JSON_HEADERS, b'{"query": NaN}', "invalid JSON: NaN is not valid JSON"),
        (JSON_HEADERS, b'{"query": "\xff"}', "body is not UTF-8: invalid byte at offset 11"),
        (JSON_HEADERS, b"[" * 100_000, "invalid JSON: nested too deeply"),
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            b'{"query": "SELECT 1"}',
            (
                "gzip body could not be decompressed: Error -3 while decompressing data: "
                "incorrect header check"
            ),
        ),
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            gzip.compress(b'{"query": "SELECT 1"}')[:-12],
            "gzip body is truncated",
        ),
        (
            {"Content-Type": "application/json", "Content-Encoding": "br"},
            b"\x00",
            "unsupported content encoding: 'br'",
        ),
        (JSON_HEADERS, b'"SELECT 1"', "request body is a JSON string, not an object"),
    ],
)
def test_undecodable_request_bodies_are_reported(
    headers: dict[str, str], body: bytes, error: str
) -> None:
    info = decode_request("POST", QUERIES_URL, headers, body)
    assert info.api_method == "jobs.query"
    assert info.starts_statement is True
    assert info.decode_error is not None
    assert info.decode_error.startswith(error)


def test_wrong_content_type_is_reported_but_body_still_read() -> None:
    body = b'{"query": "DELETE FROM t WHERE true"}'
    info = decode_request("POST", QUERIES_URL, {"Content-Type": "text/plain"}, body)
    assert info.sql == "DELETE FROM t WHERE true"
    assert info.decode_error == "request content type is not JSON: 'text/plain'"


def test_duplicate_keys_are_reported_and_last_value_kept() -> None:
    body = b'{"query": "SELECT 1", "query": "DROP TABLE d.t"}'
    info = decode_request("POST", QUERIES_URL, JSON_HEADERS, body)
    assert info.sql == "DROP TABLE d.t"
    assert info.decode_error == "duplicate JSON keys: query"


def test_wrong_types_are_reported_and_other_fields_kept() -> None:
    body = json.dumps(
        {
            "jobReference": {"jobId": 12},
            "configuration": {"query": {"query": "SELECT 1", "useLegacySql": "false"}},
            "labels": "x",
        }
    ).encode()
    info = decode_request("POST", JOBS_URL, JSON_HEADERS, body)
    assert (info.sql, info.job_type, info.job_id, info.use_legacy_sql) == (
        "SELECT 1",
        "QUERY",
        None,
        None,
    )
    assert info.decode_error == (
        "jobReference.jobId is a number, expected a string; "
        "useLegacySql is a string, expected a boolean"
    )


def test_body_over_the_limit_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest, "MAX_DECODE_BYTES", 1024)
    body = json.dumps({"query": "SELECT '" + "x" * 2000 + "'"}).encode()
    info = decode_request("POST", QUERIES_URL, JSON_HEADERS, body)
    assert info.sql is None
    assert info.decode_error == f"body too large to decode: {len(body)} bytes"


def test_gzip_bomb_is_not_expanded_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest, "MAX_DECODE_BYTES", 1024)
    body = zlib.compress(b" " * 100_000)
    headers = {"Content-Type": "application/json", "Content-Encoding": "deflate"}
    info = decode_request("POST", QUERIES_URL, headers, body)
    assert info.decode_error == "body too large to decode: over 1024 bytes after deflate"


def test_resumable_upload_chunks_do_not_start_statements() -> None:
    url = (
        "https://bigquery.googleapis.com/upload/bigquery/v2/projects/p/jobs"
        "?uploadType=resumable&upload_id=ABC"
    )
    info = decode_request("PUT", url, {"Content-Type": "application/octet-stream"}, b"\x00\x01")
    assert (info.api_method, info.upload_type, info.starts_statement, info.decode_error) == (
        "jobs.insert",
        "resumable",
        False,
        None,
    )


def test_resumable_upload_start_carries_the_job_configuration() -> None:
    url = "https://bigquery.googleapis.com/upload/bigquery/v2/projects/p/jobs?uploadType=resumable"
    body = json.dumps(
        {"configuration": {"load": {"destinationTable": {"datasetId": "d", "tableId": "t"}}}}
    ).encode()
    info = decode_request("POST", url, JSON_HEADERS, body)
    assert (info.job_type, info.dataset_id, info.table_id, info.starts_statement) == (
        "LOAD",
        "d",
        "t",
        True,
    )
    response = decode_response(info, 200, {}, b"")
    assert (response.outcome, response.decode_error) == ("done", None)


def test_non_json_error_page_is_an_error_outcome() -> None:
    info = decode_request("GET", QUERIES_URL + "/j", {}, b"")
    response = decode_response(info, 502, {"Content-Type": "text/html"}, b"<html>502</html>")
    assert response.outcome == "error"
    assert response.decode_error == (
        "response content type is not JSON: 'text/html'; invalid JSON: Expecting value: "
        "line 1 column 1 (char 0)"
    )


def test_absent_statistics_stay_none() -> None:
    info = decode_request("GET", QUERIES_URL + "/j", {}, b"")
    response = decode_response(info, 200, JSON_HEADERS, b'{"jobComplete": true}')
    assert (response.bytes_processed, response.rows_affected, response.total_rows) == (
        None,
        None,
        None,
    )
    assert response.rows_returned == 0


def test_bad_int64_is_reported() -> None:
    info = decode_request("GET", QUERIES_URL + "/j", {}, b"")
    body = b'{"jobComplete": true, "totalRows": "12x", "numDmlAffectedRows": true}'
    response = decode_response(info, 200, JSON_HEADERS, body)
    assert response.total_rows is None
    assert response.rows_affected is None
    assert response.decode_error == (
        "numDmlAffectedRows is not an int64: True; totalRows is not an int64: '12x'"
    )


# --- property tests: no input makes the decoder raise -------------------------------------

URL_PREFIXES = [
    "https://bigquery.googleapis.com/bigquery/v2/",
    "https://www.googleapis.com/bigquery/v2/",
    "https://bigquery.googleapis.com/upload/bigquery/v2/",
    "https://bigquery.us-east4.rep.googleapis.com/",
    "https://example.com/",
    "",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "query",
                    "configuration",
                    "jobReference",
                    "jobId",
                    "rows",
                    "status",
                    "state",
                    "errorResult",
                    "statistics",
                    "error",
                    "errors",
                    "totalRows",
                    "jobComplete",
                    "queryParameters",
                    "load",
                    "labels",
                    "insertErrors",
                    "job",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)
FIXTURE_NAMES = sorted(path.name for path in FIXTURES.glob("*.json"))
HEADER_SETS = st.sampled_from(
    [
        {},
        JSON_HEADERS,
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        {"Content-Type": "multipart/related; boundary=xyz"},
        {"content-type": "text/plain", "content-encoding": "deflate, gzip"},
        {"X-HTTP-Method-Override": "PATCH"},
    ]
)


def assert_serialisable(info: RequestInfo | ResponseInfo) -> None:
    """Check the record serialises and came from the decoder, not from its last-resort guard."""
    json.dumps(info.as_record())
    assert "decoder failed" not in (info.decode_error or "")


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "get", "BREW"]),
    prefix=st.sampled_from(URL_PREFIXES),
    path=st.text(max_size=80),
    headers=HEADER_SETS,
    body=st.binary(max_size=300),
    status=st.integers(min_value=0, max_value=999),
)
def test_random_requests_never_raise(
    method: str, prefix: str, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    info = decode_request(method, prefix + path, headers, body)
    assert_serialisable(info)
    assert_serialisable(decode_response(info, status, headers, body))


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(FIXTURE_NAMES),
    payload=JSON_VALUES,
    status=st.sampled_from([200, 204, 308, 400, 404, 500]),
)
def test_random_json_on_fixture_routes_never_raises(name: str, payload: Any, status: int) -> None:
    request = load_fixture(name)["request"]
    body = json.dumps(payload).encode()
    info = decode_request(request["method"], request["url"], JSON_HEADERS, body)
    assert_serialisable(info)
    assert_serialisable(decode_response(info, status, JSON_HEADERS, body))


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(FIXTURE_NAMES),
    data=st.data(),
)
def test_mutated_fixture_bodies_never_raise(name: str, data: st.DataObject) -> None:
    fixture = load_fixture(name)
    request, response = fixture["request"], fixture["response"]
    request_body = mutate(data, body_bytes(request))
    response_body = mutate(data, body_bytes(response))
    info = decode_request(request["method"], request["url"], request["headers"], request_body)
    assert_serialisable(info)
    result = decode_response(info, response["status"], response["headers"], response_body)
    assert_serialisable(result)


def mutate(data: st.DataObject, body: bytes) -> bytes:
    """Flip, cut or splice a few bytes of ``body``."""
    if not body:
        return data.draw(st.binary(max_size=20))
    position = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if kind == "flip":
        value = data.draw(st.integers(min_value=0, max_value=255))
        return body[:position] + bytes([value]) + body[position + 1 :]
    if kind == "cut":
        return body[:position]
    return body[:position] + data.draw(st.binary(min_size=1, max_size=8)) + body[position:]


# --- statements beyond queries: destructive calls, sessions, uploads, labels ---------------


@pytest.mark.parametrize(
    ("sql", "destructive"),
    [
        ("DROP TABLE d.t", True),
        ("  -- cleanup\n/* old */ truncate table d.t", True),
        ("# legacy comment\nDROP SCHEMA d CASCADE", True),
        ("DELETE FROM d.t WHERE true", None),
        ("SELECT 'DROP TABLE d.t'", None),
        ("CREATE TABLE d.dropped AS SELECT 1", None),
    ],
)
def test_destructive_sql_flagged_before_response(sql: str, destructive: bool | None) -> None:
    body = json.dumps({"query": sql}).encode()
    assert decode_request("POST", QUERIES_URL, JSON_HEADERS, body).destructive is destructive


@pytest.mark.parametrize(
    ("method", "path", "destructive"),
    [
        ("DELETE", "projects/p/datasets/d?deleteContents=true", True),
        ("DELETE", "projects/p/datasets/d?deleteContents=false", None),
        ("DELETE", "projects/p/datasets/d", None),
        ("DELETE", "projects/p/datasets/d/tables/t", True),
        ("DELETE", "projects/p/datasets/d/models/m", True),
        ("DELETE", "projects/p/datasets/d/routines/r", True),
        ("GET", "projects/p/datasets/d/tables/t", None),
    ],
)
def test_destructive_admin_calls(method: str, path: str, destructive: bool | None) -> None:
    url = f"https://bigquery.googleapis.com/bigquery/v2/{path}"
    assert decode_request(method, url, {}, b"").destructive is destructive


@pytest.mark.parametrize(
    ("sql", "session_id"),
    [
        ("CALL BQ.ABORT_SESSION()", "from-properties"),
        ("call bq.abort_session('explicit-id');", "explicit-id"),
    ],
)
def test_abort_session_is_recorded(sql: str, session_id: str) -> None:
    body = json.dumps(
        {"query": sql, "connectionProperties": [{"key": "session_id", "value": "from-properties"}]}
    ).encode()
    info = decode_request("POST", QUERIES_URL, JSON_HEADERS, body)
    assert (info.session_action, info.bq_session_id) == ("abort", session_id)


def test_jobs_list_children_destructive() -> None:
    url = "https://bigquery.googleapis.com/bigquery/v2/projects/p/jobs?parentJobId=p:EU.script_1"
    info = decode_request("GET", url, {}, b"")
    assert (info.parent_job_id, info.location) == ("script_1", "EU")
    body = json.dumps(
        {"jobs": [{"jobReference": {"jobId": "c1"}, "statistics": {"query": {
            "statementType": "DROP_TABLE", "ddlOperationPerformed": "DROP"}}}]}
    ).encode()
    response = decode_response(info, 200, JSON_HEADERS, body)
    assert response.destructive is True
    assert response.child_jobs[0]["job_id"] == "c1"


def test_ddl_statistics_from_jobs_get() -> None:
    info = decode_request("GET", JOBS_URL + "/j", {}, b"")
    body = json.dumps(
        {
            "jobReference": {"jobId": "j"},
            "status": {"state": "DONE"},
            "statistics": {
                "totalSlotMs": "1234",
                "query": {
                    "statementType": "CREATE_TABLE_AS_SELECT",
                    "ddlOperationPerformed": "REPLACE",
                    "ddlTargetTable": {"projectId": "p", "datasetId": "d", "tableId": "t"},
                    "dmlStats": {"insertedRowCount": "5"},
                },
            },
        }
    ).encode()
    response = decode_response(info, 200, JSON_HEADERS, body)
    assert (response.ddl_operation, response.ddl_target, response.slot_ms) == (
        "REPLACE",
        "p.d.t",
        1234,
    )
    assert response.dml_stats == {"inserted_rows": 5, "deleted_rows": None, "updated_rows": None}
    assert response.destructive is True


@pytest.mark.parametrize(
    ("content_range", "total", "error"),
    [
        ("bytes 0-9/100", 100, None),
        ("bytes */100", 100, None),
        ("bytes 0-9/*", None, None),
        ("bytes=0-9", None, "upload chunk has an invalid Content-Range: 'bytes=0-9'"),
    ],
)
def test_upload_chunk_content_range(content_range: str, total: int | None, error: str | None) -> None:
    url = (
        "https://bigquery.googleapis.com/upload/bigquery/v2/projects/p/jobs"
        "?uploadType=resumable&upload_id=U1"
    )
    headers = {"Content-Range": content_range, "Content-Length": "10"}
    info = decode_request("PUT", url, headers, b"")
    assert (info.upload_id, info.upload_bytes, info.upload_total, info.decode_error) == (
        "U1",
        10,
        total,
        error,
    )


def test_insert_all_counts_insert_ids_not_values() -> None:
    body = json.dumps(
        {"rows": [{"insertId": "a", "json": {"ssn": "123"}}, {"json": {"ssn": "456"}}]}
    ).encode()
    url = "https://bigquery.googleapis.com/bigquery/v2/projects/p/datasets/d/tables/t/insertAll"
    info = decode_request("POST", url, JSON_HEADERS, body)
    assert (info.row_count, info.insert_id_count) == (2, 1)
    assert "123" not in json.dumps(info.as_record())


@pytest.mark.parametrize(
    ("fixture", "path"),
    [
        ("jobs_insert_query-01.json", ("configuration", "labels")),
        ("jobs_query-01.json", ("labels",)),
        ("load_resumable-01.json", ("configuration", "labels")),
    ],
)
def test_job_label_merged_with_agent_labels(fixture: str, path: tuple[str, ...]) -> None:
    request = load_fixture(fixture)["request"]
    body = body_bytes(request)
    info = decode_request(request["method"], request["url"], request["headers"], body)
    labelled = rest.add_job_label(info, request["headers"], body, "appliance-session", "s1")
    assert labelled is not None
    found: Any = json.loads(labelled)
    original: Any = json.loads(body)
    for key in path:
        found, original = found[key], (original or {}).get(key)
    assert found == {**(original or {}), "appliance-session": "s1"}


@pytest.mark.parametrize(
    "fixture", ["load_multipart-01.json", "tables_insert-01.json", "jobs_get-01.json"]
)
def test_job_label_only_on_json_job_calls(fixture: str) -> None:
    request = load_fixture(fixture)["request"]
    body = body_bytes(request)
    info = decode_request(request["method"], request["url"], request["headers"], body)
    assert rest.add_job_label(info, request["headers"], body, "k", "v") is None


def test_label_value_is_bigquery_form() -> None:
    assert rest.label_value("20261204T202016Z-78626f46") == "20261204t202016z-78626f46"


@settings(max_examples=300, deadline=None)
@given(payload=JSON_VALUES, method=st.sampled_from([JOBS_URL, QUERIES_URL]))
def test_random_bodies_never_break_labelling(payload: Any, method: str) -> None:
    body = json.dumps(payload).encode()
    info = decode_request("POST", method, JSON_HEADERS, body)
    labelled = rest.add_job_label(info, JSON_HEADERS, body, "k", "v")
    assert labelled is None or isinstance(json.loads(labelled), dict)
