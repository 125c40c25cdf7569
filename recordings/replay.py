"""Read sessions back from the store: the list, one session's statements, and free SQL."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import duckdb

from appliance.errors import NotFound, StoreError
from appliance.recordings.store import Store

SESSION_COLUMNS = ("session_id", "agent", "principal", "unix_user", "operator", "project",
                   "command", "started_at", "ended_at", "status", "exit_code", "statements",
                   "events")
STATEMENT_COLUMNS = ("statement_index", "statement_id", "requested_at", "responded_at",
                     "api_method", "project", "location", "job_id", "target", "statement_type",
                     "dry_run", "outcome", "error_reason", "error_message", "bytes_processed",
                     "rows_affected", "rows_returned", "rows_inserted", "sql", "parameters",
                     "destructive", "job_type", "estimated_bytes", "bq_session_id",
                     "source_uris", "destination_uris", "source_tables", "upload_bytes",
                     "result_bytes", "child_job_ids")


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def run_query(store: Store, sql: str) -> QueryResult:
    """Run DuckDB SQL over the store's views; raise StoreError naming DuckDB's complaint."""
    with store.query_connection() as connection:
        try:
            relation = connection.execute(sql)
        except duckdb.Error as error:
            raise StoreError(f"The query failed: {error}") from error
        if relation.description is None:
            return QueryResult([], [])
        columns = [column[0] for column in relation.description]
        return QueryResult(columns, relation.fetchall())


def list_sessions(store: Store) -> QueryResult:
    return run_query(store, f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions "
                            "ORDER BY started_at, session_id")


def session_detail(store: Store, session_id: str) -> dict[str, Any]:
    """Return one session's row of the `sessions` view; NotFound when there is none."""
    escaped = session_id.replace("'", "''")
    result = run_query(store, f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions "
                              f"WHERE session_id = '{escaped}'")
    if not result.rows:
        raise NotFound(f"Session {session_id!r} is not in the store {store.root}; list the "
                       "recorded sessions with 'appliance sessions list'.")
    return result.records()[0]


def statements(store: Store, session_id: str) -> QueryResult:
    escaped = session_id.replace("'", "''")
    return run_query(store, f"SELECT {', '.join(STATEMENT_COLUMNS)} FROM statements "
                            f"WHERE session_id = '{escaped}' ORDER BY statement_index")


def other_events(store: Store, session_id: str) -> QueryResult:
    """Return the session's events that belong to no statement (blocked, errors, other hosts)."""
    escaped = session_id.replace("'", "''")
    return run_query(store, "SELECT seq, ts, kind, host, method, path, status, "
                            "json_extract_string(detail, '$.reason') AS reason "
                            f"FROM events WHERE session_id = '{escaped}' "
                            "AND statement_id IS NULL AND kind NOT IN "
                            "('session_start', 'session_end', 'response') ORDER BY seq")


def plain(value: Any) -> Any:
    """Turn a DuckDB value into one JSON can carry."""
    if isinstance(value, datetime.datetime):
        return value.isoformat(timespec="microseconds") + "Z"
    return value
