"""The documented DuckDB views over the store: `events`, `statements` and `sessions`.

`events` unions the sealed Parquet files with the journals of live sessions, so a running
session can be queried too; `live_events` holds only the journals' events, and `sessions`
shows a journal's session as `running`, or `abandoned` when its appliance process died. `statements` folds the events of one statement (its request, later
polls and pages) into one row: SQL and method from the first request, outcome and statistics
from the last response that carried them. Timestamps are UTC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb

from appliance.recordings.journal import is_live
from appliance.recordings.schema import EVENT_COLUMNS

if TYPE_CHECKING:
    from appliance.recordings.store import Store


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _list(paths: list[str]) -> str:
    return "[" + ", ".join(_literal(p) for p in paths) + "]"


def events_source(parquet_files: list[str], journals: list[str]) -> str:
    """Return a SELECT over every event of the given sealed files and live journals."""
    columns = list(EVENT_COLUMNS)
    parts = []
    if parquet_files:
        parts.append(f"SELECT {', '.join(columns)} FROM read_parquet({_list(parquet_files)}, "
                     "union_by_name = true)")
    if journals:
        typed = ", ".join(f"{_literal(name)}: {_literal(kind)}"
                          for name, kind in EVENT_COLUMNS.items() if name != "record")
        selected = ", ".join(c if c != "record" else "CAST(NULL AS VARCHAR) AS record"
                             for c in columns)
        # A torn final line of a live journal reads as an all-NULL row and is skipped.
        parts.append(f"SELECT {selected} FROM read_json({_list(journals)}, columns = {{{typed}}}, "
                     "format = 'newline_delimited', ignore_errors = true, "
                     "maximum_object_size = 1073741824) WHERE seq IS NOT NULL")
    if not parts:
        empty = ", ".join(f"CAST(NULL AS {kind}) AS {name}"
                          for name, kind in EVENT_COLUMNS.items())
        parts.append(f"SELECT {empty} WHERE false")
    return " UNION ALL ".join(parts)


SESSIONS_VIEW = """
SELECT
    session_id,
    arg_min(json_extract_string(detail, '$.agent'), seq) FILTER (kind = 'session_start') AS agent,
    arg_min(json_extract_string(detail, '$.principal'), seq) FILTER (kind = 'session_start')
        AS principal,
    arg_min(json_extract_string(detail, '$.unix_user'), seq) FILTER (kind = 'session_start')
        AS unix_user,
    arg_min(json_extract_string(detail, '$.operator'), seq) FILTER (kind = 'session_start')
        AS operator,
    arg_min(project, seq) FILTER (kind = 'session_start') AS project,
    arg_min(json_extract_string(detail, '$.command'), seq) FILTER (kind = 'session_start')
        AS command,
    make_timestamp(min(ts_ns) // 1000) AS started_at,
    make_timestamp(max(ts_ns) FILTER (kind IN ('session_end', 'session_recovered')) // 1000)
        AS ended_at,
    CASE
        WHEN count(*) FILTER (kind = 'session_recovered') > 0 THEN 'interrupted'
        WHEN count(*) FILTER (kind = 'session_end') > 0 THEN 'completed'
        ELSE 'running'
    END AS status,
    CAST(arg_max(json_extract_string(detail, '$.exit_code'), seq) FILTER (kind = 'session_end')
        AS INTEGER) AS exit_code,
    count(DISTINCT statement_id) AS statements,
    count(*) AS events
FROM events
GROUP BY session_id
"""

STATEMENTS_VIEW = """
WITH folded AS (
    SELECT
        session_id,
        statement_id,
        min(seq) AS first_seq,
        arg_min(api_method, seq) FILTER (kind = 'request') AS api_method,
        arg_min(sql, seq) FILTER (kind = 'request' AND sql IS NOT NULL) AS sql,
        arg_min(parameters, seq) FILTER (kind = 'request' AND parameters IS NOT NULL)
            AS parameters,
        arg_max(project, seq) FILTER (project IS NOT NULL) AS project,
        arg_max(location, seq) FILTER (location IS NOT NULL) AS location,
        arg_max(job_id, seq) FILTER (job_id IS NOT NULL AND parent_job_id IS NULL) AS job_id,
        arg_max(dataset_id, seq) FILTER (dataset_id IS NOT NULL) AS dataset_id,
        arg_max(table_id, seq) FILTER (table_id IS NOT NULL) AS table_id,
        coalesce(bool_or(dry_run), false) AS dry_run,
        arg_max(statement_type, seq) FILTER (statement_type IS NOT NULL
                                             AND parent_job_id IS NULL) AS statement_type,
        arg_max({'outcome': outcome, 'reason': error_reason, 'message': error_message}, seq)
            FILTER (outcome IS NOT NULL AND parent_job_id IS NULL) AS final,
        arg_max(bytes_processed, seq) FILTER (bytes_processed IS NOT NULL
                                              AND parent_job_id IS NULL) AS bytes_processed,
        arg_max(rows_affected, seq) FILTER (rows_affected IS NOT NULL
                                            AND parent_job_id IS NULL) AS rows_affected,
        -- A script's child jobs carry parent_job_id; the script's own statistics already
        -- include theirs, so only the parent's count.
        coalesce(arg_min(job_type, seq) FILTER (kind = 'request' AND job_type IS NOT NULL),
                 arg_max(job_type, seq) FILTER (job_type IS NOT NULL
                                                AND parent_job_id IS NULL)) AS job_type,
        arg_max(ddl_operation, seq) FILTER (ddl_operation IS NOT NULL
                                            AND parent_job_id IS NULL) AS ddl_operation,
        arg_max(ddl_target, seq) FILTER (ddl_target IS NOT NULL AND parent_job_id IS NULL)
            AS ddl_target,
        arg_max(bytes_billed, seq) FILTER (bytes_billed IS NOT NULL AND parent_job_id IS NULL)
            AS bytes_billed,
        arg_max(slot_ms, seq) FILTER (slot_ms IS NOT NULL AND parent_job_id IS NULL) AS slot_ms,
        arg_max(cache_hit, seq) FILTER (cache_hit IS NOT NULL AND parent_job_id IS NULL)
            AS cache_hit,
        arg_max(dml_stats, seq) FILTER (dml_stats IS NOT NULL AND parent_job_id IS NULL)
            AS dml_stats,
        arg_max(bq_session_id, seq) FILTER (bq_session_id IS NOT NULL) AS bq_session_id,
        arg_min(json_extract_string(detail, '$.bigquery.session_action'), seq)
            FILTER (kind = 'request') AS bq_session_action,
        arg_min(json_extract(detail, '$.bigquery.labels'), seq)
            FILTER (kind = 'request' AND json_extract(detail, '$.bigquery.labels') IS NOT NULL)
            AS labels,
        arg_min(source_uris, seq) FILTER (kind = 'request' AND source_uris IS NOT NULL)
            AS source_uris,
        arg_min(destination_uris, seq) FILTER (kind = 'request' AND destination_uris IS NOT NULL)
            AS destination_uris,
        arg_min(source_tables, seq) FILTER (kind = 'request' AND source_tables IS NOT NULL)
            AS source_tables,
        arg_min(source_format, seq) FILTER (kind = 'request' AND source_format IS NOT NULL)
            AS source_format,
        arg_min(write_disposition, seq) FILTER (kind = 'request' AND write_disposition IS NOT NULL)
            AS write_disposition,
        coalesce(max(CAST(json_extract(detail, '$.bigquery.upload_total') AS BIGINT))
                     FILTER (kind = 'request'),
                 sum(upload_bytes) FILTER (kind = 'request')) AS upload_bytes,
        coalesce(bool_or(destructive), false) AS destructive,
        sum(result_bytes) FILTER (kind = 'response') AS result_bytes,
        list(result_digest ORDER BY seq) FILTER (result_digest IS NOT NULL) AS result_digests,
        list_distinct(flatten(list(
            CASE WHEN parent_job_id IS NOT NULL AND job_id IS NOT NULL THEN [job_id]
                 ELSE json_extract_string(detail, '$.bigquery.child_jobs[*].job_id') END
        ))) AS child_job_ids,
        count(*) FILTER (transient) AS transient_errors,
        sum(rows_returned) FILTER (kind = 'response') AS rows_returned,
        arg_min(CAST(json_extract(detail, '$.bigquery.row_count') AS BIGINT), seq)
            FILTER (kind = 'request') AS rows_inserted,
        make_timestamp(min(ts_ns) FILTER (kind = 'request') // 1000) AS requested_at,
        make_timestamp(max(ts_ns) FILTER (kind = 'response') // 1000) AS responded_at,
        count(*) FILTER (kind = 'request') AS requests
    FROM events
    WHERE statement_id IS NOT NULL
    GROUP BY session_id, statement_id
)
SELECT
    f.session_id,
    row_number() OVER (PARTITION BY f.session_id ORDER BY f.first_seq) AS statement_index,
    f.statement_id,
    s.agent,
    s.principal,
    s.unix_user,
    s.operator,
    f.api_method,
    f.sql,
    f.parameters,
    f.project,
    f.location,
    f.job_id,
    f.dataset_id,
    f.table_id,
    nullif(concat_ws('.', f.project, f.dataset_id, f.table_id), '') AS target,
    f.statement_type,
    f.dry_run,
    coalesce(f.final.outcome, 'unknown') AS outcome,
    f.final.reason AS error_reason,
    f.final.message AS error_message,
    -- A dry run executed nothing: its bytes are an estimate, and nothing was changed.
    CASE WHEN f.dry_run THEN NULL ELSE f.bytes_processed END AS bytes_processed,
    CASE WHEN f.dry_run THEN f.bytes_processed END AS estimated_bytes,
    CASE WHEN f.dry_run THEN NULL ELSE f.rows_affected END AS rows_affected,
    f.job_type,
    f.ddl_operation,
    f.ddl_target,
    f.bytes_billed,
    f.slot_ms,
    f.cache_hit,
    f.dml_stats,
    f.bq_session_id,
    f.bq_session_action,
    f.labels,
    f.source_uris,
    f.destination_uris,
    f.source_tables,
    f.source_format,
    f.write_disposition,
    f.upload_bytes,
    f.destructive AND NOT f.dry_run AS destructive,
    f.result_bytes,
    f.result_digests,
    CASE WHEN len(f.child_job_ids) > 0 THEN f.child_job_ids END AS child_job_ids,
    f.transient_errors,
    f.rows_returned,
    f.rows_inserted,
    f.requested_at,
    f.responded_at,
    f.requests,
    f.first_seq
FROM folded AS f
LEFT JOIN sessions AS s USING (session_id)
"""


def create(connection: duckdb.DuckDBPyConnection, store: Store, persistent: bool,
           parquet_files: list[str] | None = None) -> None:
    """Create (or replace) the views in `connection` for the current contents of `store`."""
    if parquet_files is None:
        parquet_files = [str(store.root / row[0]) for row in
                         connection.execute("SELECT file FROM session_index").fetchall()]
    # Journals come and go, so only the in-memory views of a query read them.
    journal_paths = [] if persistent else store.live_journals()
    journals = [str(path) for path in journal_paths]
    scope = "VIEW" if persistent else "TEMP VIEW"
    connection.execute(
        f"CREATE OR REPLACE {scope} events AS SELECT *, make_timestamp(ts_ns // 1000) AS ts "
        f"FROM ({events_source(parquet_files, journals)})"
    )
    sessions = SESSIONS_VIEW
    if not persistent:
        connection.execute(
            "CREATE OR REPLACE TEMP VIEW live_events AS SELECT *, make_timestamp(ts_ns // 1000) "
            f"AS ts FROM ({events_source([], journals)})")
        # A journal no process holds belongs to an appliance that died; the next start
        # recovers it as interrupted, until then it shows as abandoned.
        abandoned = [path.stem for path in journal_paths if not is_live(path)]
        if abandoned:
            sessions = (f"SELECT * REPLACE (CASE WHEN status = 'running' AND session_id IN "
                        f"({', '.join(_literal(s) for s in abandoned)}) THEN 'abandoned' "
                        f"ELSE status END AS status) FROM ({SESSIONS_VIEW})")
    connection.execute(f"CREATE OR REPLACE {scope} sessions AS {sessions}")
    connection.execute(f"CREATE OR REPLACE {scope} statements AS {STATEMENTS_VIEW}")
