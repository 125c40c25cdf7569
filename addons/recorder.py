"""Record every flow into its session's journal, durably, before it is forwarded.

The `request` hook is the last of the chain: it waits until the request event is fsynced, and
if that fails it answers the agent with a 503 in Google's JSON error format instead of letting
the request go upstream (fail closed). Responses, flow errors and refused flows are recorded too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from mitmproxy import http, tcp, tls

from appliance.addons.common import (
    RECORDED_HEADERS,
    address,
    credential_of,
    flow_state,
    redacted_path,
    session_of,
    to_json,
)
from appliance.bigquery import pages, rest
from appliance.context import Registry
from appliance.errors import RecordingFailed
from appliance.recordings.schema import BLOCKED, CONNECTION, FLOW_ERROR, REQUEST, RESPONSE

logger = logging.getLogger(__name__)

# RequestInfo and ResponseInfo fields that have a column of their own.
_REQUEST_COLUMNS = ("api", "api_method", "project", "location", "job_id", "dataset_id",
                    "table_id", "sql", "dry_run", "job_type", "parent_job_id", "bq_session_id",
                    "source_format", "write_disposition", "upload_bytes", "destructive")
_RESPONSE_COLUMNS = ("project", "location", "job_id", "statement_type", "outcome",
                     "error_reason", "error_message", "bytes_processed", "rows_affected",
                     "rows_returned", "job_type", "parent_job_id", "bq_session_id",
                     "ddl_operation", "ddl_target", "bytes_billed", "slot_ms", "cache_hit",
                     "destructive")
# Fields holding lists or objects, written to their column as JSON text.
_REQUEST_JSON_COLUMNS = ("parameters", "source_uris", "destination_uris", "source_tables")
_RESPONSE_JSON_COLUMNS = ("dml_stats",)


def _nanoseconds(timestamp: float | None) -> int | None:
    return None if timestamp is None else int(timestamp * 1_000_000) * 1000


def request_event(flow: http.HTTPFlow) -> dict[str, Any]:
    """Build the journal row for a request from the flow and its decoded information."""
    state = flow_state(flow)
    request = flow.request
    event: dict[str, Any] = {
        "kind": BLOCKED if state.get("blocked") else REQUEST,
        "ts_ns": _nanoseconds(request.timestamp_start),
        "flow_id": flow.id,
        "statement_id": state.get("statement_id"),
        "client": address(flow.client_conn.peername),
        "server": address(flow.server_conn.address),
        "host": request.pretty_host,
        "method": request.method,
        "path": redacted_path(request.path),
        "request_bytes": _request_bytes(request, state),
        "credential": credential_of(request),
    }
    detail: dict[str, Any] = {
        "sni": flow.client_conn.sni,
        "http_version": request.http_version,
        "headers": {name: request.headers[name] for name in RECORDED_HEADERS
                    if name in request.headers},
    }
    if state.get("blocked"):
        detail["reason"] = state["blocked"]
    if state.get("process") is not None:
        detail["process"] = state["process"]  # Found by the attribution addon.
    if state.get("local"):
        event["api"] = "gce.metadata"
    info = state.get("request_info")
    if isinstance(info, rest.RequestInfo) and info.api is not None:
        fields = info.as_record()
        for column in _REQUEST_COLUMNS:
            event[column] = fields.pop(column, None)
        for column in _REQUEST_JSON_COLUMNS:
            event[column] = to_json(fields.pop(column, None))
        event["parent_job_id"] = state.get("child_of") or event["parent_job_id"]
        detail["bigquery"] = {key: value for key, value in fields.items() if value is not None}
        if state.get("job_label"):
            detail["job_label_added"] = state["job_label"]
    event["detail"] = json.dumps(detail, sort_keys=True, ensure_ascii=False)
    return event


def _request_bytes(request: http.Request, state: dict[str, Any]) -> int | None:
    """Return the body size; a streamed chunk is recorded before its body, from its headers."""
    if "streamed_request" not in state:
        return len(request.raw_content or b"")
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def response_event(flow: http.HTTPFlow) -> dict[str, Any]:
    """Build the journal row for a response."""
    assert flow.response is not None
    state = flow_state(flow)
    response = flow.response
    event: dict[str, Any] = {
        "kind": RESPONSE,
        "ts_ns": _nanoseconds(response.timestamp_end or response.timestamp_start),
        "flow_id": flow.id,
        "statement_id": state.get("statement_id"),
        "client": address(flow.client_conn.peername),
        "server": address(flow.server_conn.address),
        "host": flow.request.pretty_host,
        "method": flow.request.method,
        "path": redacted_path(flow.request.path),
        "status": response.status_code,
        "response_bytes": len(response.raw_content or b""),
    }
    detail: dict[str, Any] = {"content_type": response.headers.get("content-type")}
    info = state.get("response_info")
    request_info = state.get("request_info")
    if isinstance(request_info, rest.RequestInfo) and request_info.api is not None:
        event["api"] = request_info.api
        event["api_method"] = request_info.api_method
    if state.get("local"):
        event["api"] = "gce.metadata"
    if isinstance(info, rest.ResponseInfo):
        fields = dataclasses.asdict(info)
        for column in _RESPONSE_COLUMNS:
            event[column] = fields.pop(column, None)
        for column in _RESPONSE_JSON_COLUMNS:
            event[column] = to_json(fields.pop(column, None))
        rows = fields.pop("rows", None)
        if isinstance(request_info, rest.RequestInfo):
            event["parent_job_id"] = (state.get("child_of") or event["parent_job_id"]
                                      or request_info.parent_job_id)
        detail["bigquery"] = {key: value for key, value in fields.items() if value is not None}
        if rows is not None:
            # Only with the profile's record_result_rows option; off by default.
            detail["result_rows"] = rows
    _add_transfer_fields(event, detail, state)
    event["detail"] = json.dumps(detail, sort_keys=True, ensure_ascii=False)
    return event


def _add_transfer_fields(event: dict[str, Any], detail: dict[str, Any],
                         state: dict[str, Any]) -> None:
    """Add what was counted while the body streamed: result page digest and sizes, upload size."""
    page = state.get("page")
    if isinstance(page, pages.PageSummary):
        if "page_digest" in state:
            event["response_bytes"] = page.wire_bytes
        event["result_bytes"] = page.body_bytes
        event["result_digest"] = page.digest
        detail["result_digest_of"] = page.digest_of
        detail["streamed"] = "page_digest" in state
        if page.error:
            detail["page_error"] = page.error
    counter = state.get("streamed_request")
    if counter is not None:
        detail["upload_bytes_streamed"] = getattr(counter, "count", None)
    if state.get("transient"):
        event["transient"] = True


def _fail_closed(flow: http.HTTPFlow, error: RecordingFailed) -> None:
    flow.response = http.Response.make(
        503,
        json.dumps({"error": {"code": 503, "status": "UNAVAILABLE",
                              "message": "The session recorder could not record this request, "
                                         "so it was not sent. " + str(error),
                              "errors": [{"reason": "recordingFailed", "domain": "appliance",
                                          "message": str(error)}]}}).encode(),
        {"Content-Type": "application/json; charset=UTF-8"},
    )


class Recorder:
    """Writes request, response, error and connection events to the session's journal."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Record a streamed request (a resumable upload chunk) before its body is forwarded."""
        state = flow_state(flow)
        if "streamed_request" not in state or flow.response is not None:
            return
        await self.request(flow)
        state["recorded_early"] = True
        if state.get("unrecorded"):
            flow.request.stream = False

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow_state(flow).get("recorded_by"):
            return  # The addon named there records this flow itself (addons/storage.py).
        context = session_of(self.registry, flow.client_conn)
        if context is None or flow_state(flow).get("recorded_early"):
            return
        try:
            await context.journal.append(request_event(flow))
        except RecordingFailed as error:
            logger.error("Session %s flow %s: not forwarded because recording failed: %s",
                         context.session_id, flow.id, error)
            _fail_closed(flow, error)
            flow_state(flow)["unrecorded"] = True

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow_state(flow).get("recorded_by"):
            return  # The addon named there records this flow itself (addons/storage.py).
        context = session_of(self.registry, flow.client_conn)
        state = flow_state(flow)
        if context is None or flow.response is None or state.get("blocked") \
                or state.get("unrecorded"):
            return
        try:
            await context.journal.append(response_event(flow))
        except RecordingFailed as error:
            logger.error("Session %s flow %s: response not recorded: %s", context.session_id,
                         flow.id, error)

    async def error(self, flow: http.HTTPFlow) -> None:
        if flow_state(flow).get("recorded_by"):
            return  # The addon named there records this flow itself (addons/storage.py).
        context = session_of(self.registry, flow.client_conn)
        if context is None or flow.error is None:
            return
        await self._append_quietly(context.session_id, context.journal, {
            "kind": FLOW_ERROR,
            "flow_id": flow.id,
            "statement_id": flow_state(flow).get("statement_id"),
            "client": address(flow.client_conn.peername),
            "server": address(flow.server_conn.address),
            "host": flow.request.pretty_host,
            "method": flow.request.method,
            "path": redacted_path(flow.request.path),
            "detail": json.dumps({"error": flow.error.msg}),
        })

    async def tls_failed_client(self, data: tls.TlsData) -> None:
        context = session_of(self.registry, data.context.client)
        if context is None:
            return
        await self._append_quietly(context.session_id, context.journal, {
            "kind": FLOW_ERROR,
            "client": address(data.context.client.peername),
            "server": address(data.context.server.address),
            "host": data.context.client.sni,
            "detail": json.dumps({"error": "TLS handshake with the agent failed",
                                  "tls_error": str(data.conn.error)}),
        })

    async def tcp_end(self, flow: tcp.TCPFlow) -> None:
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        sent = sum(len(m.content) for m in flow.messages if m.from_client)
        received = sum(len(m.content) for m in flow.messages if not m.from_client)
        await self._append_quietly(context.session_id, context.journal, {
            "kind": CONNECTION,
            "flow_id": flow.id,
            "client": address(flow.client_conn.peername),
            "server": address(flow.server_conn.address),
            "host": flow.client_conn.sni,
            "request_bytes": sent,
            "response_bytes": received,
            "detail": json.dumps({"error": flow.error.msg if flow.error else None,
                                  "process": flow.metadata.get("appliance", {}).get("process")},
                                 sort_keys=True),
        })

    @staticmethod
    async def _append_quietly(session_id: str, journal: Any, event: dict[str, Any]) -> None:
        try:
            await journal.append(event)
        except RecordingFailed as error:
            logger.error("Session %s: event %s not recorded: %s", session_id, event["kind"],
                         error)
