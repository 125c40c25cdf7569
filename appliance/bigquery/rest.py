"""Decode BigQuery REST v2 requests and responses into the fields of a recorded statement.

Everything here is a pure function over bytes, strings and dicts, so the proxy addon stays thin
and the decoding can be tested and fuzzed without a proxy. The functions never raise on traffic:
a body that cannot be decoded, or a field of the wrong type, becomes a short reason in
``decode_error`` and the fields that could be read are still returned.

Bodies are the bytes as they crossed the wire (mitmproxy's ``raw_content``), so a
``Content-Encoding: gzip`` or ``deflate`` body is decompressed here, up to ``MAX_DECODE_BYTES``.

Method names and paths follow the BigQuery v2 discovery document (revision 20260811).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

API = "bigquery.v2"
OTHER_METHOD = "bigquery.other"
BATCH_METHOD = "bigquery.batch"

MAX_DECODE_BYTES = 64 * 1024 * 1024
"""Largest body, before or after decompression, that is parsed."""

_MAX_PROBLEMS = 3
_MAX_INT64_DIGITS = 20

_GLOBAL_HOSTS = frozenset({"bigquery.googleapis.com", "bigquery.mtls.googleapis.com"})
_SHARED_HOSTS = frozenset({"www.googleapis.com", "www.mtls.googleapis.com"})
# Regional endpoints (bigquery.us-east4.rep.googleapis.com) and Private Service Connect
# endpoints (bigquery-myendpoint.p.googleapis.com).
_REGIONAL_HOST = re.compile(r"bigquery\.(?P<region>[a-z0-9-]+)\.rep(?:\.mtls)?\.googleapis\.com")
_PSC_HOST = re.compile(r"bigquery-[a-z0-9-]+\.p\.googleapis\.com")
_API_PREFIXES = ("/bigquery/v2", "/upload/bigquery/v2")
_BATCH_PREFIX = "/batch/bigquery/v2"
_CUSTOM_VERBS = frozenset(
    {"getIamPolicy", "setIamPolicy", "testIamPermissions", "undelete", "batchDelete"}
)
_JOB_TYPES = ("query", "load", "extract", "copy")
_READ_ONLY_HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Calls that destroy data or definitions whatever their body contains. datasets.delete counts only
# with deleteContents, because without it BigQuery rejects deleting a dataset that has tables.
_DESTRUCTIVE_METHODS = frozenset({"tables.delete", "models.delete", "routines.delete"})
# Statement types and DDL operations that drop or replace data.
DESTRUCTIVE_STATEMENT_TYPES = frozenset(
    {
        "TRUNCATE_TABLE",
        "DROP_TABLE",
        "DROP_SCHEMA",
        "DROP_VIEW",
        "DROP_MATERIALIZED_VIEW",
        "DROP_EXTERNAL_TABLE",
        "DROP_SNAPSHOT_TABLE",
        "DROP_MODEL",
        "DROP_FUNCTION",
        "DROP_TABLE_FUNCTION",
        "DROP_PROCEDURE",
    }
)
_DESTRUCTIVE_DDL = frozenset({"DROP", "REPLACE"})
_TRUNCATING_DISPOSITIONS = frozenset({"WRITE_TRUNCATE", "WRITE_TRUNCATE_DATA"})
# The leading keywords of SQL that drops or truncates, after comments and whitespace. The
# response's statement type is authoritative, so this only matters when no response arrives.
_DESTRUCTIVE_SQL = re.compile(
    r"(?:\s+|--[^\n]*\n?|#[^\n]*\n?|/\*.*?\*/)*(?:TRUNCATE\s+TABLE|DROP)\b",
    re.IGNORECASE | re.DOTALL,
)
_ABORT_SESSION_SQL = re.compile(
    r"\s*CALL\s+BQ\.ABORT_SESSION\s*\(\s*(?:(?P<q>['\"])(?P<id>[^'\"]*)(?P=q))?\s*\)\s*;?\s*",
    re.IGNORECASE,
)
_CONTENT_RANGE = re.compile(r"bytes (?:(?P<first>\d+)-(?P<last>\d+)|\*)/(?P<total>\d+|\*)")
_JOB_ID_FORM = re.compile(r"(?:(?P<project>.+):)?(?:(?P<location>[^.:]+)\.)?(?P<job>[^.:]*)")


@dataclass(frozen=True, slots=True)
class _Route:
    http_method: str
    segments: tuple[str, ...]
    verb: str | None
    api_method: str
    starts_statement: bool


def _route(http_method: str, pattern: str, api_method: str, starts_statement: bool) -> _Route:
    path, _, verb = pattern.partition(":")
    return _Route(http_method, tuple(path.split("/")), verb or None, api_method, starts_statement)


_P = "projects/{project}"
_D = f"{_P}/datasets/{{dataset}}"
_T = f"{_D}/tables/{{table}}"
_R = f"{_D}/routines/{{routine}}"
_M = f"{_D}/models/{{model}}"
_ROUTES = (
    _route("GET", "projects", "projects.list", False),
    _route("GET", f"{_P}/serviceAccount", "projects.getServiceAccount", False),
    _route("POST", f"{_P}/jobs", "jobs.insert", True),
    _route("GET", f"{_P}/jobs", "jobs.list", False),
    _route("GET", f"{_P}/jobs/{{job}}", "jobs.get", False),
    _route("POST", f"{_P}/jobs/{{job}}/cancel", "jobs.cancel", True),
    _route("DELETE", f"{_P}/jobs/{{job}}/delete", "jobs.delete", True),
    _route("POST", f"{_P}/queries", "jobs.query", True),
    _route("GET", f"{_P}/queries/{{job}}", "jobs.getQueryResults", False),
    _route("GET", f"{_P}/datasets", "datasets.list", False),
    _route("POST", f"{_P}/datasets", "datasets.insert", True),
    _route("GET", _D, "datasets.get", False),
    _route("PATCH", _D, "datasets.patch", True),
    _route("PUT", _D, "datasets.update", True),
    _route("DELETE", _D, "datasets.delete", True),
    _route("POST", f"{_D}:undelete", "datasets.undelete", True),
    _route("GET", f"{_D}/tables", "tables.list", False),
    _route("POST", f"{_D}/tables", "tables.insert", True),
    _route("GET", _T, "tables.get", False),
    _route("PATCH", _T, "tables.patch", True),
    _route("PUT", _T, "tables.update", True),
    _route("DELETE", _T, "tables.delete", True),
    _route("POST", f"{_T}:getIamPolicy", "tables.getIamPolicy", False),
    _route("POST", f"{_T}:setIamPolicy", "tables.setIamPolicy", True),
    _route("POST", f"{_T}:testIamPermissions", "tables.testIamPermissions", False),
    _route("GET", f"{_T}/data", "tabledata.list", True),
    _route("POST", f"{_T}/insertAll", "tabledata.insertAll", True),
    _route("GET", f"{_T}/rowAccessPolicies", "rowAccessPolicies.list", False),
    _route("POST", f"{_T}/rowAccessPolicies", "rowAccessPolicies.insert", True),
    _route("POST", f"{_T}/rowAccessPolicies:batchDelete", "rowAccessPolicies.batchDelete", True),
    _route("GET", f"{_T}/rowAccessPolicies/{{policy}}", "rowAccessPolicies.get", False),
    _route("PUT", f"{_T}/rowAccessPolicies/{{policy}}", "rowAccessPolicies.update", True),
    _route("DELETE", f"{_T}/rowAccessPolicies/{{policy}}", "rowAccessPolicies.delete", True),
    _route(
        "POST",
        f"{_T}/rowAccessPolicies/{{policy}}:getIamPolicy",
        "rowAccessPolicies.getIamPolicy",
        False,
    ),
    _route(
        "POST",
        f"{_T}/rowAccessPolicies/{{policy}}:testIamPermissions",
        "rowAccessPolicies.testIamPermissions",
        False,
    ),
    _route("GET", f"{_D}/routines", "routines.list", False),
    _route("POST", f"{_D}/routines", "routines.insert", True),
    _route("GET", _R, "routines.get", False),
    _route("PUT", _R, "routines.update", True),
    _route("DELETE", _R, "routines.delete", True),
    _route("POST", f"{_R}:getIamPolicy", "routines.getIamPolicy", False),
    _route("POST", f"{_R}:setIamPolicy", "routines.setIamPolicy", True),
    _route("POST", f"{_R}:testIamPermissions", "routines.testIamPermissions", False),
    _route("GET", f"{_D}/models", "models.list", False),
    _route("GET", _M, "models.get", False),
    _route("PATCH", _M, "models.patch", True),
    _route("DELETE", _M, "models.delete", True),
)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Fields of one BigQuery REST request; None where the request does not carry them.

    ``api`` is None for traffic that is not BigQuery REST, and then every other field is unset.
    ``dataset_id`` and ``table_id`` name the resource in the path, or for inserts the one in the
    body. For jobs.insert they name the job's target table (the destination of a query, load or
    copy, the source of an extract). ``use_legacy_sql`` is the value as sent: BigQuery treats an
    absent value as true, but it is recorded as None. ``parameters`` is the ``queryParameters``
    list as sent, never substituted into ``sql``. ``bq_session_id`` is BigQuery's own session
    id, unrelated to the recording's session. ``upload_bytes`` is the size of uploaded data,
    which is never kept. ``destructive`` is True for calls that drop, truncate or overwrite.
    """

    api: str | None = None
    api_method: str | None = None
    project: str | None = None
    location: str | None = None
    job_id: str | None = None
    dataset_id: str | None = None
    table_id: str | None = None
    routine_id: str | None = None
    model_id: str | None = None
    sql: str | None = None
    parameters: Any = None
    parameter_mode: str | None = None
    dry_run: bool | None = None
    use_legacy_sql: bool | None = None
    job_type: str | None = None
    request_id: str | None = None
    labels: Any = None
    row_count: int | None = None
    insert_id_count: int | None = None
    upload_type: str | None = None
    upload_id: str | None = None
    upload_bytes: int | None = None
    upload_total: int | None = None
    content_range: str | None = None
    job_creation_mode: str | None = None
    create_session: bool | None = None
    bq_session_id: str | None = None
    session_action: str | None = None
    parent_job_id: str | None = None
    source_uris: Any = None
    destination_uris: Any = None
    source_tables: Any = None
    source_format: str | None = None
    destination_format: str | None = None
    write_disposition: str | None = None
    create_disposition: str | None = None
    delete_contents: bool | None = None
    destructive: bool | None = None
    starts_statement: bool = False
    decode_error: str | None = None

    def as_record(self) -> dict[str, Any]:
        """Return the fields as a dict of JSON-serialisable values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    """Fields of one BigQuery REST response; None where the response does not carry them.

    ``outcome`` is "done", "error" or "running", or None when the response does not show it. Integer
    statistics arrive as JSON strings and are parsed; an absent statistic stays None.
    ``rows_returned`` counts the rows of this page of a query or tabledata.list result, and is 0
    for a complete result without a ``rows`` field, because BigQuery leaves empty lists out.
    ``query_id`` is set by jobs.query, which may finish without creating a job.
    ``parent_job_id`` is set on a script's child job; ``child_jobs`` summarises the children
    that jobs.list returns for a parent. ``rows`` is the page's rows, only with ``keep_rows``.
    """

    project: str | None = None
    location: str | None = None
    job_id: str | None = None
    query_id: str | None = None
    job_complete: bool | None = None
    state: str | None = None
    outcome: str | None = None
    statement_type: str | None = None
    error_reason: str | None = None
    error_message: str | None = None
    bytes_processed: int | None = None
    bytes_billed: int | None = None
    rows_affected: int | None = None
    rows_returned: int | None = None
    total_rows: int | None = None
    cache_hit: bool | None = None
    job_type: str | None = None
    ddl_operation: str | None = None
    ddl_target: str | None = None
    slot_ms: int | None = None
    dml_stats: Any = None
    job_statistics: Any = None
    num_child_jobs: int | None = None
    parent_job_id: str | None = None
    child_jobs: Any = None
    bq_session_id: str | None = None
    upload_id: str | None = None
    upload_received: int | None = None
    destructive: bool | None = None
    rows: Any = None
    decode_error: str | None = None

    def as_record(self) -> dict[str, Any]:
        """Return the fields as a dict of JSON-serialisable values."""
        return dataclasses.asdict(self)


class _DecodeError(Exception):
    """A body that cannot be decoded; the message goes into ``decode_error``."""


class _Fields:
    """Typed reads from decoded JSON that collect type problems instead of raising."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def get(self, value: Any, path: str) -> Any:
        for key in path.split("."):
            if value is None:
                return None
            if not isinstance(value, dict):
                self.problems.append(f"{path} is inside a {_json_type(value)}, not an object")
                return None
            value = value.get(key)
        return value

    def typed(self, value: Any, path: str, kind: type, kind_name: str) -> Any:
        found = self.get(value, path)
        if found is None or isinstance(found, kind):
            return found
        self.problems.append(f"{path} is a {_json_type(found)}, expected {kind_name}")
        return None

    def text(self, value: Any, path: str) -> str | None:
        found: str | None = self.typed(value, path, str, "a string")
        return found

    def flag(self, value: Any, path: str) -> bool | None:
        found: bool | None = self.typed(value, path, bool, "a boolean")
        return found

    def obj(self, value: Any, path: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.typed(value, path, dict, "an object")
        return found

    def array(self, value: Any, path: str) -> list[Any] | None:
        found: list[Any] | None = self.typed(value, path, list, "an array")
        return found

    def int64(self, value: Any, path: str) -> int | None:
        found = self.get(value, path)
        if found is None:
            return None
        parsed = _parse_int64(found)
        if parsed is None:
            self.problems.append(f"{path} is not an int64: {_preview(found)}")
        return parsed

    def error(self, extra: str | None = None) -> str | None:
        messages = ([extra] if extra else []) + self.problems
        if not messages:
            return None
        joined = "; ".join(messages[:_MAX_PROBLEMS])
        hidden = len(messages) - _MAX_PROBLEMS
        return f"{joined}; and {hidden} more" if hidden > 0 else joined


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_int64(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    digits = text.removeprefix("-")
    if not digits.isascii() or not digits.isdigit() or len(digits) > _MAX_INT64_DIGITS:
        return None
    return int(text)


def split_job_id(value: str) -> tuple[str | None, str | None, str]:
    """Split a ``project:LOCATION.job_id`` job name into project, location and job id.

    Either prefix may be missing: ``US.job_1`` and ``my-project:job_1`` are accepted, and a plain
    ``job_1`` returns ``(None, None, "job_1")``. Domain-scoped projects such as
    ``example.com:my-project`` keep their dot, because the project ends at the last colon.
    """
    match = _JOB_ID_FORM.fullmatch(value)
    if match is None:
        return None, None, value
    return match["project"], match["location"], match["job"]


def is_bigquery_host(host: str, path: str) -> bool:
    """Return whether a request to ``host`` and ``path`` goes to the BigQuery REST API.

    Every path on a BigQuery host counts, so unknown calls are recorded too. On the shared
    www.googleapis.com host only the BigQuery v2 paths (including uploads and batch) count.
    """
    name = _normalise_host(host)
    if name in _GLOBAL_HOSTS or _REGIONAL_HOST.fullmatch(name) or _PSC_HOST.fullmatch(name):
        return True
    if name in _SHARED_HOSTS:
        return any(_has_prefix(path, prefix) for prefix in (*_API_PREFIXES, _BATCH_PREFIX))
    return False


def _normalise_host(host: str) -> str:
    name = host.strip().lower().rstrip(".")
    if name.startswith("["):
        return name
    head, _, port = name.rpartition(":")
    return head.rstrip(".") if head and port.isdigit() else name


def _has_prefix(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def decode_request(method: str, url: str, headers: Mapping[str, str], body: bytes) -> RequestInfo:
    """Decode one HTTP request into the BigQuery call it makes.

    ``headers`` is looked up case-insensitively. Never raises: any failure becomes a
    ``decode_error`` on the returned info, with ``api`` None only for non-BigQuery traffic.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return RequestInfo()
    host = parts.netloc.rpartition("@")[2]
    path = parts.path or "/"
    if not is_bigquery_host(host, path):
        return RequestInfo()
    try:
        return _decode_request(method, host, path, parts.query, headers, body)
    except Exception as error:  # noqa: BLE001 - the proxy must never fail on traffic.
        return RequestInfo(
            api=API,
            api_method=OTHER_METHOD,
            starts_statement=True,
            decode_error=f"request decoder failed: {type(error).__name__}: {error}"[:200],
        )


def _decode_request(
    method: str, host: str, path: str, query_string: str, headers: Mapping[str, str], body: bytes
) -> RequestInfo:
    header = _header_lookup(headers)
    http_method = method.strip().upper()
    override = header("x-http-method-override")
    if http_method == "POST" and override:
        # Google front ends run the overriding method, so the route follows it too.
        http_method = override.strip().upper()
    query = parse_qs(query_string, keep_blank_values=True)
    region = _REGIONAL_HOST.fullmatch(_normalise_host(host))
    context = _RequestContext(
        http_method=http_method,
        query={name: values[-1] for name, values in query.items()},
        header=header,
        body=body,
        host_location=region["region"] if region else None,
    )
    if _has_prefix(path, _BATCH_PREFIX):
        # NOTE: the parts of a batch request are not decoded, so it is recorded as one call.
        return RequestInfo(
            api=API,
            api_method=BATCH_METHOD,
            starts_statement=True,
            decode_error="batch requests are not decoded",
        )
    for prefix in _API_PREFIXES:
        if _has_prefix(path, prefix):
            return _decode_api_call(context, path[len(prefix) :], prefix.startswith("/upload"))
    return _unknown_call(context)


@dataclass(frozen=True, slots=True)
class _RequestContext:
    http_method: str
    query: dict[str, str]
    header: Callable[[str], str | None]
    body: bytes
    host_location: str | None


def _header_lookup(headers: Mapping[str, str]) -> Callable[[str], str | None]:
    lowered = {str(name).lower(): str(value) for name, value in headers.items()}
    return lowered.get


def _unknown_call(context: _RequestContext) -> RequestInfo:
    return RequestInfo(
        api=API,
        api_method=OTHER_METHOD,
        # An unknown call that may change something is treated as a statement.
        starts_statement=context.http_method not in _READ_ONLY_HTTP_METHODS,
    )


def _match_route(http_method: str, rest: str) -> tuple[_Route, dict[str, str]] | None:
    segments = [unquote(segment) for segment in rest.strip("/").split("/") if segment]
    verb = None
    if segments:
        head, colon, tail = segments[-1].rpartition(":")
        if colon and tail in _CUSTOM_VERBS:
            segments[-1], verb = head, tail
    for route in _ROUTES:
        if route.http_method != http_method or route.verb != verb:
            continue
        if len(route.segments) != len(segments):
            continue
        captures = _match_segments(route.segments, segments)
        if captures is not None:
            return route, captures
    return None


def _match_segments(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    captures: dict[str, str] = {}
    for expected, actual in zip(pattern, segments, strict=True):
        if expected.startswith("{"):
            captures[expected.strip("{}")] = actual
        elif expected != actual:
            return None
    return captures


def _decode_api_call(context: _RequestContext, rest: str, is_upload: bool) -> RequestInfo:
    http_method = context.http_method
    if is_upload and http_method == "PUT" and "upload_id" in context.query:
        # Resumable uploads send their data chunks with PUT to the jobs.insert URL.
        http_method = "POST"
    matched = _match_route(http_method, rest)
    if matched is None:
        return _unknown_call(context)
    route, captures = matched
    info = RequestInfo(
        api=API,
        api_method=route.api_method,
        project=captures.get("project"),
        location=context.query.get("location") or context.host_location,
        dataset_id=captures.get("dataset"),
        table_id=captures.get("table"),
        routine_id=captures.get("routine"),
        model_id=captures.get("model"),
        starts_statement=route.starts_statement,
    )
    if "job" in captures:
        info = _with_path_job_id(info, captures["job"])
    info = _with_query_options(info, context.query)
    if route.api_method == "jobs.insert" and (is_upload or "uploadType" in context.query):
        return _decode_upload(info, context)
    if context.http_method in _READ_ONLY_HTTP_METHODS or context.http_method == "DELETE":
        return info
    return _decode_json_call(info, context)


def _with_query_options(info: RequestInfo, query: dict[str, str]) -> RequestInfo:
    """Add the query string's fields: a script's parent job, deleteContents, destructive deletes."""
    method = info.api_method
    if method == "jobs.list" and query.get("parentJobId"):
        project, location, job_id = split_job_id(query["parentJobId"])
        return dataclasses.replace(
            info,
            parent_job_id=job_id,
            project=info.project or project,
            location=info.location or location,
        )
    if method == "datasets.delete":
        contents = query.get("deleteContents", "").strip().lower() == "true"
        return dataclasses.replace(info, delete_contents=contents, destructive=contents or None)
    if method in _DESTRUCTIVE_METHODS:
        return dataclasses.replace(info, destructive=True)
    return info


def _with_path_job_id(info: RequestInfo, value: str) -> RequestInfo:
    project, location, job_id = split_job_id(value)
    return dataclasses.replace(
        info, job_id=job_id, project=info.project or project, location=info.location or location
    )


def _decode_json_call(info: RequestInfo, context: _RequestContext) -> RequestInfo:
    try:
        payload, warning = _decode_json_body(context.body, context.header, "request")
    except _DecodeError as error:
        return dataclasses.replace(info, decode_error=str(error))
    if payload is None:
        return info
    fields = _Fields()
    if not isinstance(payload, dict):
        fields.problems.append(f"request body is a JSON {_json_type(payload)}, not an object")
        return dataclasses.replace(info, decode_error=fields.error(warning))
    info = _BODY_DECODERS.get(info.api_method or "", _decode_resource_body)(info, payload, fields)
    return dataclasses.replace(info, decode_error=fields.error(warning))


def _decode_job_insert(info: RequestInfo, job: dict[str, Any], fields: _Fields) -> RequestInfo:
    configuration = fields.obj(job, "configuration") or {}
    job_type, config = _job_type(configuration, fields)
    target = _job_target_table(job_type, config, fields)
    query: dict[str, Any] = config if job_type == "QUERY" else {}
    sql = fields.text(query, "query")
    disposition = fields.text(config, "writeDisposition")
    info = dataclasses.replace(
        info,
        project=info.project or fields.text(job, "jobReference.projectId"),
        location=fields.text(job, "jobReference.location") or info.location,
        job_id=fields.text(job, "jobReference.jobId"),
        dataset_id=fields.text(target, "datasetId"),
        table_id=fields.text(target, "tableId"),
        sql=sql,
        parameters=fields.array(query, "queryParameters"),
        parameter_mode=fields.text(query, "parameterMode"),
        dry_run=fields.flag(configuration, "dryRun"),
        use_legacy_sql=fields.flag(query, "useLegacySql"),
        job_type=job_type,
        labels=fields.obj(configuration, "labels"),
        write_disposition=disposition,
        create_disposition=fields.text(config, "createDisposition"),
        destructive=_destructive(sql, disposition),
    )
    info = _with_session(info, query, sql, fields)
    if job_type == "LOAD":
        return dataclasses.replace(
            info,
            source_uris=_uris(fields, config, "sourceUris"),
            source_format=fields.text(config, "sourceFormat"),
        )
    if job_type == "EXTRACT":
        return dataclasses.replace(
            info,
            destination_uris=_uris(fields, config, "destinationUris", "destinationUri"),
            destination_format=fields.text(config, "destinationFormat"),
        )
    if job_type == "COPY":
        sources = fields.array(config, "sourceTables")
        if sources is None and fields.obj(config, "sourceTable") is not None:
            sources = [config["sourceTable"]]
        names = [_table_name(fields, source) for source in sources or []]
        return dataclasses.replace(info, source_tables=[n for n in names if n] or None)
    return info


def _destructive(sql: str | None, disposition: str | None) -> bool | None:
    if disposition in _TRUNCATING_DISPOSITIONS:
        return True
    if sql is not None and _DESTRUCTIVE_SQL.match(sql):
        return True
    return None


def _with_session(
    info: RequestInfo, source: dict[str, Any], sql: str | None, fields: _Fields
) -> RequestInfo:
    """Add the BigQuery session a query creates, runs in or aborts.

    This id is BigQuery's own (``connectionProperties`` key ``session_id``), unrelated to the
    recording's session id.
    """
    create = fields.flag(source, "createSession")
    session_id = None
    for prop in fields.array(source, "connectionProperties") or []:
        if isinstance(prop, dict) and prop.get("key") == "session_id":
            value = prop.get("value")
            session_id = value if isinstance(value, str) else None
    abort = _ABORT_SESSION_SQL.fullmatch(sql) if sql is not None else None
    if abort is not None:
        action: str | None = "abort"
        session_id = abort["id"] or session_id
    elif create:
        action = "create"
    else:
        action = "use" if session_id else None
    return dataclasses.replace(
        info, create_session=create, bq_session_id=session_id, session_action=action
    )


def _uris(fields: _Fields, config: dict[str, Any], key: str, single: str | None = None) -> Any:
    found = fields.array(config, key)
    if found is None and single is not None:
        one = fields.text(config, single)
        found = [one] if one is not None else None
    if found is None:
        return None
    return [uri for uri in found if isinstance(uri, str)]


def _table_name(fields: _Fields, reference: Any) -> str | None:
    if not isinstance(reference, dict):
        return None
    parts = [fields.text(reference, key) for key in ("projectId", "datasetId", "tableId")]
    return ".".join(part for part in parts if part) or None


def _job_type(configuration: dict[str, Any], fields: _Fields) -> tuple[str | None, dict[str, Any]]:
    present = [name for name in _JOB_TYPES if configuration.get(name) is not None]
    if not present:
        return None, {}
    if len(present) > 1:
        fields.problems.append(f"job configuration has several job types: {', '.join(present)}")
    return present[0].upper(), fields.obj(configuration, present[0]) or {}


def _job_target_table(
    job_type: str | None, config: dict[str, Any], fields: _Fields
) -> dict[str, Any]:
    key = "sourceTable" if job_type == "EXTRACT" else "destinationTable"
    return fields.obj(config, key) or {}


def _decode_query_request(
    info: RequestInfo, request: dict[str, Any], fields: _Fields
) -> RequestInfo:
    sql = fields.text(request, "query")
    info = dataclasses.replace(
        info,
        location=fields.text(request, "location") or info.location,
        sql=sql,
        parameters=fields.array(request, "queryParameters"),
        parameter_mode=fields.text(request, "parameterMode"),
        dry_run=fields.flag(request, "dryRun"),
        use_legacy_sql=fields.flag(request, "useLegacySql"),
        job_type="QUERY",
        request_id=fields.text(request, "requestId"),
        labels=fields.obj(request, "labels"),
        job_creation_mode=fields.text(request, "jobCreationMode"),
        destructive=_destructive(sql, None),
    )
    return _with_session(info, request, sql, fields)


def _decode_insert_all(info: RequestInfo, request: dict[str, Any], fields: _Fields) -> RequestInfo:
    rows = fields.array(request, "rows")
    if rows is None:
        return info
    insert_ids = sum(1 for row in rows if isinstance(row, dict) and row.get("insertId"))
    return dataclasses.replace(info, row_count=len(rows), insert_id_count=insert_ids)


def _decode_resource_body(
    info: RequestInfo, resource: dict[str, Any], fields: _Fields
) -> RequestInfo:
    method = info.api_method or ""
    if method.endswith(("IamPolicy", "IamPermissions")) or "." not in method:
        return info
    labels = fields.obj(resource, "labels")
    if method == "datasets.insert":
        dataset_id = fields.text(resource, "datasetReference.datasetId")
        return dataclasses.replace(info, dataset_id=dataset_id or info.dataset_id, labels=labels)
    if method == "tables.insert":
        table_id = fields.text(resource, "tableReference.tableId")
        return dataclasses.replace(info, table_id=table_id or info.table_id, labels=labels)
    if method == "routines.insert":
        routine_id = fields.text(resource, "routineReference.routineId")
        return dataclasses.replace(info, routine_id=routine_id or info.routine_id)
    if method.startswith(("datasets.", "tables.", "models.")):
        return dataclasses.replace(info, labels=labels)
    return info


_BodyDecoder = Callable[[RequestInfo, dict[str, Any], _Fields], RequestInfo]
_BODY_DECODERS: dict[str, _BodyDecoder] = {
    "jobs.insert": _decode_job_insert,
    "jobs.query": _decode_query_request,
    "tabledata.insertAll": _decode_insert_all,
}


def _decode_upload(info: RequestInfo, context: _RequestContext) -> RequestInfo:
    upload_type = context.query.get("uploadType") or None
    info = dataclasses.replace(info, upload_type=upload_type)
    if upload_type == "resumable" and "upload_id" in context.query:
        # A chunk of data for a job whose configuration came with the first request.
        return _decode_upload_chunk(info, context)
    if upload_type == "multipart":
        return _decode_multipart_upload(info, context)
    if upload_type == "resumable":
        total = _parse_int64(context.header("x-upload-content-length") or "")
        return dataclasses.replace(_decode_json_call(info, context), upload_total=total)
    return dataclasses.replace(
        info, decode_error=f"upload type {upload_type!r} carries no job configuration"
    )


def _decode_upload_chunk(info: RequestInfo, context: _RequestContext) -> RequestInfo:
    """Decode a resumable upload's PUT from its headers alone; its data is never parsed."""
    content_range = context.header("content-range")
    length = _parse_int64(context.header("content-length") or "")
    size = len(context.body) if context.body else length
    total = None
    problem = None
    if content_range is not None:
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            problem = f"upload chunk has an invalid Content-Range: {_preview(content_range)}"
        elif match["total"] != "*":
            total = int(match["total"])
    return dataclasses.replace(
        info,
        starts_statement=False,
        upload_id=context.query.get("upload_id") or None,
        upload_bytes=size,
        upload_total=total,
        content_range=content_range,
        decode_error=problem,
    )


def _decode_multipart_upload(info: RequestInfo, context: _RequestContext) -> RequestInfo:
    content_type = context.header("content-type") or ""
    boundary = _content_type_parameter(content_type, "boundary")
    if not boundary:
        return dataclasses.replace(
            info, decode_error=f"multipart upload without a boundary: {_preview(content_type)}"
        )
    try:
        body = _decode_content(context.body, context.header("content-encoding"), truncate=True)
        part_headers, part_body = _first_multipart_part(body, boundary.encode("latin-1"))
        data_size = _multipart_data_size(body, boundary.encode("latin-1"))
    except (_DecodeError, UnicodeEncodeError) as error:
        return dataclasses.replace(info, decode_error=str(error))
    part_context = dataclasses.replace(context, body=part_body, header=part_headers.get)
    return dataclasses.replace(_decode_json_call(info, part_context), upload_bytes=data_size)


def _multipart_data_size(body: bytes, boundary: bytes) -> int | None:
    """Return the size of the data part (the second part) of a multipart upload."""
    delimiter = b"--" + boundary
    first = body.find(delimiter)
    second = body.find(b"\n" + delimiter, first + len(delimiter)) if first >= 0 else -1
    if second < 0:
        return None
    start = second + 1 + len(delimiter)
    end = body.find(b"\n" + delimiter, start)
    if end < 0:
        return None
    part = body[start:end].removesuffix(b"\r")
    for separator in (b"\r\n\r\n", b"\n\n"):
        _, found, content = part.partition(separator)
        if found:
            return len(content)
    return None


def _first_multipart_part(body: bytes, boundary: bytes) -> tuple[dict[str, str], bytes]:
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0:
        raise _DecodeError("multipart upload body has no boundary line")
    start += len(delimiter)
    end = body.find(b"\n" + delimiter, start)
    if end < 0:
        raise _DecodeError("multipart upload metadata part is not terminated")
    part = body[start:end].removesuffix(b"\r").lstrip(b"\r\n")
    head, separator, content = part.partition(b"\r\n\r\n")
    if not separator:
        head, separator, content = part.partition(b"\n\n")
    if not separator:
        raise _DecodeError("multipart upload metadata part has no header end")
    part_headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            part_headers[name.strip().lower()] = value.strip()
    return part_headers, content


def _content_type_parameter(content_type: str, name: str) -> str | None:
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def _decode_json_body(
    body: bytes, header: Callable[[str], str | None], side: str
) -> tuple[Any, str | None]:
    """Return the parsed JSON body (None when empty) and a warning about its content type.

    A body whose content type is not JSON is still parsed, so the recording keeps its content,
    but the mismatch is reported.
    """
    if not body:
        return None, None
    if len(body) > MAX_DECODE_BYTES:
        raise _DecodeError(f"body too large to decode: {len(body)} bytes")
    content_type = header("content-type")
    warning = None
    if content_type is not None and not _is_json_media_type(content_type):
        warning = f"{side} content type is not JSON: {_preview(content_type)}"
    try:
        data = _decode_content(body, header("content-encoding"), truncate=False)
        return _parse_json(data), warning
    except _DuplicateKeys as error:
        return error.value, f"{warning}; {error}" if warning else str(error)
    except _DecodeError as error:
        raise _DecodeError(f"{warning}; {error}" if warning else str(error)) from None


def _is_json_media_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _decode_content(body: bytes, encoding_header: str | None, *, truncate: bool) -> bytes:
    """Undo the Content-Encoding of ``body``, applied in the order listed in the header."""
    encodings = [name.strip().lower() for name in (encoding_header or "").split(",")]
    for encoding in reversed([name for name in encodings if name and name != "identity"]):
        if encoding in ("gzip", "x-gzip"):
            body = _inflate(body, zlib.MAX_WBITS | 16, encoding, truncate)
        elif encoding == "deflate":
            body = _inflate(body, zlib.MAX_WBITS, encoding, truncate)
        else:
            raise _DecodeError(f"unsupported content encoding: {_preview(encoding)}")
    return body


def _inflate(body: bytes, window_bits: int, encoding: str, truncate: bool) -> bytes:
    decompressor = zlib.decompressobj(window_bits)
    try:
        data = decompressor.decompress(body, MAX_DECODE_BYTES)
    except zlib.error as error:
        raise _DecodeError(f"{encoding} body could not be decompressed: {error}") from None
    if decompressor.unconsumed_tail and not truncate:
        raise _DecodeError(
            f"body too large to decode: over {MAX_DECODE_BYTES} bytes after {encoding}"
        )
    if not decompressor.eof and not truncate:
        raise _DecodeError(f"{encoding} body is truncated")
    return data


def _parse_json(data: bytes) -> Any:
    duplicates: list[str] = []

    def build_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                duplicates.append(key)
            result[key] = value
        return result

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=build_object, parse_constant=reject_constant)
    except UnicodeDecodeError as error:
        raise _DecodeError(f"body is not UTF-8: invalid byte at offset {error.start}") from None
    except RecursionError:
        raise _DecodeError("invalid JSON: nested too deeply") from None
    except ValueError as error:
        raise _DecodeError(f"invalid JSON: {error}") from None
    if duplicates:
        # Which duplicate BigQuery acts on is not known, so the body is flagged as ambiguous.
        raise _DuplicateKeys(value, duplicates)
    return value


class _DuplicateKeys(_DecodeError):
    """A JSON body with a repeated object key; the last value of each key was kept."""

    def __init__(self, value: Any, keys: list[str]) -> None:
        super().__init__(f"duplicate JSON keys: {', '.join(sorted(set(keys))[:5])}")
        self.value = value


def decode_response(
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    keep_rows: bool = False,
) -> ResponseInfo:
    """Decode the response to a request that ``decode_request`` decoded.

    Returns an empty info when the request was not BigQuery REST. Never raises. With
    ``keep_rows`` the ``rows`` of a result page are returned as sent; otherwise only counted.
    """
    if request.api is None:
        return ResponseInfo()
    try:
        info = _decode_response(request, status, headers, body)
        if keep_rows and request.api_method in RESULT_METHODS and info.rows_returned:
            return dataclasses.replace(info, rows=_rows_of(body, headers))
        return info
    except Exception as error:  # noqa: BLE001 - the proxy must never fail on traffic.
        return ResponseInfo(
            outcome=_status_outcome(status),
            decode_error=f"response decoder failed: {type(error).__name__}",
        )


RESULT_METHODS = frozenset({"jobs.query", "jobs.getQueryResults", "tabledata.list"})
"""Methods whose responses carry result rows to the agent."""


def _rows_of(body: bytes, headers: Mapping[str, str]) -> Any:
    try:
        payload, _ = _decode_json_body(body, _header_lookup(headers), "response")
    except _DecodeError:
        return None
    return payload.get("rows") if isinstance(payload, dict) else None


def _status_outcome(status: int) -> str | None:
    if status >= 400:
        return "error"
    if 200 <= status < 300 or status == 304:
        return "done"
    if status == 308:
        return "running"
    return None


def _decode_response(
    request: RequestInfo, status: int, headers: Mapping[str, str], body: bytes
) -> ResponseInfo:
    header = _header_lookup(headers)
    base = ResponseInfo(outcome=_status_outcome(status))
    try:
        payload, warning = _decode_json_body(body, header, "response")
    except _DecodeError as error:
        return dataclasses.replace(base, decode_error=str(error))
    if request.upload_type == "resumable":
        base = _with_upload_progress(base, header)
    if payload is None:
        return dataclasses.replace(base, decode_error=warning or _empty_body_error(request, status))
    fields = _Fields()
    if not isinstance(payload, dict):
        fields.problems.append(f"response body is a JSON {_json_type(payload)}, not an object")
        return dataclasses.replace(base, decode_error=fields.error(warning))
    if status >= 400 or "error" in payload:
        info = _decode_error_envelope(base, payload, fields)
    else:
        info = _decode_success(request, base, payload, fields)
    return dataclasses.replace(info, decode_error=fields.error(warning))


def _with_upload_progress(base: ResponseInfo, header: Callable[[str], str | None]) -> ResponseInfo:
    """Read the upload id a resumable upload's first response hands out, and the bytes received."""
    upload_id = header("x-guploader-uploadid")
    location = header("location")
    if location:
        values = parse_qs(urlsplit(location).query).get("upload_id")
        upload_id = values[-1] if values else upload_id
    received = None
    match = re.fullmatch(r"bytes=0-(\d+)", (header("range") or "").strip())
    if match:
        received = int(match[1]) + 1
    return dataclasses.replace(base, upload_id=upload_id, upload_received=received)


def _empty_body_error(request: RequestInfo, status: int) -> str | None:
    """Return an error for an empty body where BigQuery always sends JSON."""
    method = request.api_method or OTHER_METHOD
    expected_empty = (
        status == 204
        or not 200 <= status < 300
        or method in (OTHER_METHOD, BATCH_METHOD)
        or method.endswith(".delete")
        or request.upload_type == "resumable"
    )
    return None if expected_empty else "response body is empty"


def _decode_error_envelope(
    base: ResponseInfo, payload: dict[str, Any], fields: _Fields
) -> ResponseInfo:
    error = fields.obj(payload, "error") or {}
    details = fields.array(error, "errors") or []
    first = details[0] if details and isinstance(details[0], dict) else {}
    return dataclasses.replace(
        base,
        outcome="error",
        error_reason=fields.text(first, "reason") or fields.text(error, "status"),
        error_message=fields.text(error, "message") or fields.text(first, "message"),
    )


def _decode_success(
    request: RequestInfo, base: ResponseInfo, payload: dict[str, Any], fields: _Fields
) -> ResponseInfo:
    method = request.api_method
    if method in ("jobs.insert", "jobs.get"):
        return _decode_job(base, payload, fields)
    if method == "jobs.list" and request.parent_job_id:
        return _decode_child_jobs(base, payload, fields)
    if method == "jobs.cancel":
        return _decode_job(base, fields.obj(payload, "job") or {}, fields)
    if method in ("jobs.query", "jobs.getQueryResults"):
        return _decode_query_response(base, payload, fields)
    if method == "tabledata.list":
        rows = fields.array(payload, "rows")
        return dataclasses.replace(
            base,
            total_rows=fields.int64(payload, "totalRows"),
            rows_returned=0 if rows is None else len(rows),
        )
    if method == "tabledata.insertAll":
        return _decode_insert_all_response(base, payload, fields)
    return base


def _decode_job(base: ResponseInfo, job: dict[str, Any], fields: _Fields) -> ResponseInfo:
    reference = fields.obj(job, "jobReference") or {}
    state = fields.text(job, "status.state")
    error_result = fields.obj(job, "status.errorResult")
    statistics = fields.obj(job, "statistics") or {}
    query = fields.obj(statistics, "query") or {}
    if error_result:
        outcome: str | None = "error"
    elif state == "DONE":
        outcome = "done"
    elif state in ("RUNNING", "PENDING"):
        outcome = "running"
    else:
        outcome = base.outcome
    job_type, _ = _job_type(fields.obj(job, "configuration") or {}, fields)
    statement_type = fields.text(query, "statementType")
    ddl_operation = fields.text(query, "ddlOperationPerformed")
    transfer = _transfer_statistics(statistics, fields)
    rows = fields.int64(query, "numDmlAffectedRows")
    if rows is None and transfer is not None:
        rows = transfer.get("output_rows", transfer.get("copied_rows"))
    return dataclasses.replace(
        base,
        project=fields.text(reference, "projectId"),
        location=fields.text(reference, "location"),
        job_id=fields.text(reference, "jobId"),
        state=state,
        outcome=outcome,
        statement_type=statement_type,
        error_reason=fields.text(error_result, "reason"),
        error_message=fields.text(error_result, "message"),
        bytes_processed=_first_int64(fields, (query, statistics), "totalBytesProcessed"),
        bytes_billed=fields.int64(query, "totalBytesBilled"),
        rows_affected=rows,
        cache_hit=fields.flag(query, "cacheHit"),
        job_type=job_type or fields.text(job, "configuration.jobType"),
        ddl_operation=ddl_operation,
        ddl_target=_ddl_target(query, fields),
        slot_ms=_first_int64(fields, (statistics, query), "totalSlotMs"),
        dml_stats=_dml_stats(query, fields),
        job_statistics=transfer,
        num_child_jobs=fields.int64(statistics, "numChildJobs"),
        parent_job_id=fields.text(statistics, "parentJobId"),
        bq_session_id=fields.text(statistics, "sessionInfo.sessionId"),
        destructive=_destructive_outcome(statement_type, ddl_operation),
    )


def _destructive_outcome(statement_type: str | None, ddl_operation: str | None) -> bool | None:
    if statement_type in DESTRUCTIVE_STATEMENT_TYPES or ddl_operation in _DESTRUCTIVE_DDL:
        return True
    return None


def _ddl_target(query: dict[str, Any], fields: _Fields) -> str | None:
    table = fields.obj(query, "ddlTargetTable")
    if table is not None:
        return _table_name(fields, table)
    dataset = fields.obj(query, "ddlTargetDataset")
    if dataset is not None:
        parts = [fields.text(dataset, key) for key in ("projectId", "datasetId")]
        return ".".join(part for part in parts if part) or None
    routine = fields.obj(query, "ddlTargetRoutine")
    if routine is not None:
        keys = ("projectId", "datasetId", "routineId")
        return ".".join(part for part in (fields.text(routine, k) for k in keys) if part) or None
    return None


_DML_STATS = (
    ("inserted_rows", "insertedRowCount"),
    ("deleted_rows", "deletedRowCount"),
    ("updated_rows", "updatedRowCount"),
)


def _dml_stats(source: dict[str, Any], fields: _Fields) -> dict[str, int | None] | None:
    stats = fields.obj(source, "dmlStats")
    if stats is None:
        return None
    return {name: fields.int64(stats, key) for name, key in _DML_STATS}


# Job statistics of load, extract and copy jobs: recorded name -> (statistics key, path).
_TRANSFER_STATISTICS = {
    "load": (
        ("input_files", "inputFiles"),
        ("input_bytes", "inputFileBytes"),
        ("output_rows", "outputRows"),
        ("output_bytes", "outputBytes"),
        ("bad_records", "badRecords"),
    ),
    "extract": (("input_bytes", "inputBytes"),),
    "copy": (("copied_rows", "copiedRows"), ("copied_bytes", "copiedLogicalBytes")),
}


def _transfer_statistics(statistics: dict[str, Any], fields: _Fields) -> dict[str, Any] | None:
    for kind, keys in _TRANSFER_STATISTICS.items():
        source = fields.obj(statistics, kind)
        if source is None:
            continue
        found: dict[str, Any] = {name: fields.int64(source, key) for name, key in keys}
        if kind == "extract":
            counts = fields.array(source, "destinationUriFileCounts") or []
            found["file_counts"] = [_parse_int64(count) for count in counts]
        return {name: value for name, value in found.items() if value is not None}
    return None


def _decode_child_jobs(base: ResponseInfo, payload: dict[str, Any], fields: _Fields) -> ResponseInfo:
    """Summarise the child jobs of a script that jobs.list with parentJobId returns."""
    children: list[dict[str, Any]] = []
    destructive = False
    for item in fields.array(payload, "jobs") or []:
        if not isinstance(item, dict):
            continue
        query = fields.obj(item, "statistics.query") or {}
        children.append(
            {
                "job_id": fields.text(item, "jobReference.jobId"),
                "location": fields.text(item, "jobReference.location"),
                "state": fields.text(item, "state") or fields.text(item, "status.state"),
                "statement_type": fields.text(query, "statementType"),
                "ddl_operation": fields.text(query, "ddlOperationPerformed"),
                "ddl_target": _ddl_target(query, fields),
                "rows_affected": fields.int64(query, "numDmlAffectedRows"),
            }
        )
        statement_type = fields.text(query, "statementType")
        ddl_operation = fields.text(query, "ddlOperationPerformed")
        destructive = destructive or bool(_destructive_outcome(statement_type, ddl_operation))
    return dataclasses.replace(base, child_jobs=children, destructive=destructive or None)


def _first_int64(fields: _Fields, sources: tuple[dict[str, Any], ...], key: str) -> int | None:
    for source in sources:
        value = fields.int64(source, key)
        if value is not None:
            return value
    return None


def _decode_query_response(
    base: ResponseInfo, payload: dict[str, Any], fields: _Fields
) -> ResponseInfo:
    reference = fields.obj(payload, "jobReference") or {}
    complete = fields.flag(payload, "jobComplete")
    rows = fields.array(payload, "rows")
    if complete is None:
        outcome = base.outcome
    else:
        outcome = "done" if complete else "running"
    # BigQuery omits `rows` from a complete, empty result, so that counts as 0 rows returned.
    if rows is not None:
        rows_returned: int | None = len(rows)
    else:
        rows_returned = 0 if complete else None
    return dataclasses.replace(
        base,
        project=fields.text(reference, "projectId"),
        location=fields.text(reference, "location") or fields.text(payload, "location"),
        job_id=fields.text(reference, "jobId"),
        query_id=fields.text(payload, "queryId"),
        job_complete=complete,
        outcome=outcome,
        statement_type=fields.text(payload, "statementType"),
        bytes_processed=fields.int64(payload, "totalBytesProcessed"),
        bytes_billed=fields.int64(payload, "totalBytesBilled"),
        rows_affected=fields.int64(payload, "numDmlAffectedRows"),
        rows_returned=rows_returned,
        total_rows=fields.int64(payload, "totalRows"),
        cache_hit=fields.flag(payload, "cacheHit"),
        slot_ms=fields.int64(payload, "totalSlotMs"),
        dml_stats=_dml_stats(payload, fields),
        bq_session_id=fields.text(payload, "sessionInfo.sessionId"),
        destructive=_destructive_outcome(fields.text(payload, "statementType"), None),
    )


def _decode_insert_all_response(
    base: ResponseInfo, payload: dict[str, Any], fields: _Fields
) -> ResponseInfo:
    failures = fields.array(payload, "insertErrors")
    if not failures:
        return base
    first = failures[0] if isinstance(failures[0], dict) else {}
    details = fields.array(first, "errors") or []
    detail = details[0] if details and isinstance(details[0], dict) else {}
    reason = fields.text(detail, "reason")
    message = fields.text(detail, "message")
    summary = f"{len(failures)} rows were rejected"
    return dataclasses.replace(
        base,
        outcome="error",
        error_reason=reason,
        error_message=f"{summary}: {message}" if message else summary,
    )


LABELLED_METHODS = frozenset({"jobs.insert", "jobs.query"})
"""Calls whose body the proxy rewrites to add the recording's job label."""

_LABEL_VALUE_CHARACTERS = re.compile(r"[^a-z0-9_-]")


def label_value(session_id: str) -> str:
    """Return ``session_id`` in BigQuery's label value form: lowercase, at most 63 characters."""
    return _LABEL_VALUE_CHARACTERS.sub("_", session_id.lower())[:63]


def add_job_label(
    request: RequestInfo, headers: Mapping[str, str], body: bytes, key: str, value: str
) -> bytes | None:
    """Return the JSON body of a jobs.insert or jobs.query with ``key: value`` among its labels.

    The result is the decoded (not Content-Encoded) body; None means the body is left as it is:
    another call, a multipart upload, a body that does not decode to a JSON object, or labels
    that are not an object. The agent's own labels are kept, except one under ``key``.
    """
    if request.api_method not in LABELLED_METHODS or request.upload_type == "multipart":
        return None
    if request.decode_error is not None:
        return None
    try:
        payload, _ = _decode_json_body(body, _header_lookup(headers), "request")
    except _DecodeError:
        return None
    except Exception:  # noqa: BLE001 - the proxy must never fail on traffic.
        return None
    if not isinstance(payload, dict):
        return None
    holder = payload
    if request.api_method == "jobs.insert":
        configuration = payload.setdefault("configuration", {})
        if not isinstance(configuration, dict):
            return None
        holder = configuration
    labels = holder.setdefault("labels", {})
    if not isinstance(labels, dict):
        return None
    labels[key] = value
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
