"""The recorded event schema: one flat row per journal event.

Each column is documented in docs/recording-schema.md; a test fails when one is missing there.
Values that do not fit a column (request headers of interest, decoder details) go into `detail`,
a JSON object. `record` is the canonical JSON line exactly as it was hashed in the journal, so
verification never depends on how a Parquet writer typed a value.
"""

from __future__ import annotations

SCHEMA_VERSION = 2  # 2: signed digest chain; migrated forward by recordings.migrations

# Column name -> DuckDB type, in table order.
EVENT_COLUMNS: dict[str, str] = {
    "session_id": "VARCHAR",
    "seq": "BIGINT",
    "ts_ns": "BIGINT",
    "kind": "VARCHAR",
    "flow_id": "VARCHAR",
    "statement_id": "VARCHAR",
    "client": "VARCHAR",
    "server": "VARCHAR",
    "host": "VARCHAR",
    "method": "VARCHAR",
    "path": "VARCHAR",
    "status": "INTEGER",
    "request_bytes": "BIGINT",
    "response_bytes": "BIGINT",
    "api": "VARCHAR",
    "api_method": "VARCHAR",
    "project": "VARCHAR",
    "location": "VARCHAR",
    "job_id": "VARCHAR",
    "dataset_id": "VARCHAR",
    "table_id": "VARCHAR",
    "sql": "VARCHAR",
    "parameters": "VARCHAR",
    "dry_run": "BOOLEAN",
    "statement_type": "VARCHAR",
    "outcome": "VARCHAR",
    "error_reason": "VARCHAR",
    "error_message": "VARCHAR",
    "bytes_processed": "BIGINT",
    "rows_affected": "BIGINT",
    "rows_returned": "BIGINT",
    # BigQuery REST statistics and job details (appliance.bigquery.rest).
    "job_type": "VARCHAR",
    "parent_job_id": "VARCHAR",
    "bq_session_id": "VARCHAR",
    "ddl_operation": "VARCHAR",
    "ddl_target": "VARCHAR",
    "bytes_billed": "BIGINT",
    "slot_ms": "BIGINT",
    "cache_hit": "BOOLEAN",
    "dml_stats": "VARCHAR",
    "source_uris": "VARCHAR",
    "destination_uris": "VARCHAR",
    "source_tables": "VARCHAR",
    "source_format": "VARCHAR",
    "write_disposition": "VARCHAR",
    "upload_bytes": "BIGINT",
    "destructive": "BOOLEAN",
    "transient": "BOOLEAN",
    "result_bytes": "BIGINT",
    "result_digest": "VARCHAR",
    "credential": "VARCHAR",
    "detail": "VARCHAR",
    "prev_hash": "VARCHAR",
    "hash": "VARCHAR",
    "record": "VARCHAR",
}

# Event kinds, as written to the `kind` column.
SESSION_START = "session_start"
SESSION_END = "session_end"
SESSION_RECOVERED = "session_recovered"
REQUEST = "request"
RESPONSE = "response"
FLOW_ERROR = "flow_error"
BLOCKED = "blocked"
CONNECTION = "connection"
# One message of a streamed gRPC call (a Storage Write append or its acknowledgement).
STREAM_MESSAGE = "stream_message"
# Containment (appliance.netns.resolver and appliance.netns.droplog): a question the session
# resolver answered or refused, packets the session's firewall refused, and its final counters.
DNS_QUERY = "dns_query"
DROPPED = "dropped"
FIREWALL_COUNTERS = "firewall_counters"
