"""Record the BigQuery Storage Read and Write gRPC APIs, streaming every call both ways.

One HTTP/2 stream is one gRPC call. For a call from a session to a Storage host
(bigquerystorage.googleapis.com and its mTLS, regional and PSC forms) with a gRPC content
type, this addon records the call itself, and the Recorder skips it:

- `requestheaders`: AppendRows and unknown methods stream their request. Their request event
  is made durable here, because mitmproxy sends the headers upstream right after this hook and
  the `request` hook of a streamed request fires only when the agent ends it. The write stream
  comes from the `x-goog-request-params` routing header until the first message names it.
- `request`: unary and server-streaming calls send one small request message, which mitmproxy
  buffers; it is decoded and recorded here, before it is forwarded.
- `responseheaders`: every response body streams through a meter.
- The stream callables pass each chunk on unchanged at once. They count bytes, messages and
  rows, keep a SHA-256 of the body, and decode each message when it completes, buffering only
  the current message. Each AppendRows request and each acknowledgement is recorded as a
  `stream_message` event (rows, offset, digest) without holding the message back.
- `response` and `error`: the outcome event, with grpc-status and grpc-message from the
  trailers or from the headers of a trailers-only error, is made durable before mitmproxy
  sends the trailers on. Status, message and details pass to the agent unchanged.

If the journal cannot be written, a unary or server-streaming call is answered with a
trailers-only UNAVAILABLE error and never sent; an AppendRows call is reset before anything
is sent, and an open one stops forwarding request bytes once an append could not be recorded.

Credential substitution for these calls must happen in `requestheaders`: a streamed request's
headers leave before any `request` hook runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from appliance.addons.common import (
    RECORDED_HEADERS,
    address,
    credential_of,
    flow_state,
    redacted_path,
    session_of,
)
from appliance.bigquery import storage
from appliance.context import Registry, SessionContext
from appliance.errors import RecordingFailed
from appliance.recordings.schema import REQUEST, RESPONSE, STREAM_MESSAGE

logger = logging.getLogger(__name__)

STATE_KEY = "storage"
GRPC_HEADERS = ("x-goog-request-params", "grpc-encoding", "grpc-accept-encoding",
                "grpc-timeout")
READ_STATEMENT, WRITE_STATEMENT = "STORAGE_READ", "STORAGE_WRITE"
# REST job resources are read for their destination table only when this small.
MAX_JOB_BODY = 4 * 1024 * 1024
_JOB_PATH = re.compile(r"/(?:bigquery/v2/)?projects/[^/]+/jobs(?:/[^/?]+)?(?:\?.*)?")
_APPEND_ROWS = "/google.cloud.bigquery.storage.v1.BigQueryWrite/AppendRows"


@dataclass
class _Links:
    """Statement links learnt from one session's earlier calls, for the calls that follow."""

    read_sessions: dict[str, str] = field(default_factory=dict)
    read_streams: dict[str, str] = field(default_factory=dict)
    session_tables: dict[str, str] = field(default_factory=dict)
    read_high_water: dict[str, int] = field(default_factory=dict)
    write_streams: dict[str, str] = field(default_factory=dict)
    acknowledged_rows: dict[str, int] = field(default_factory=dict)
    finalized_rows: dict[str, int] = field(default_factory=dict)
    query_destinations: dict[str, str] = field(default_factory=dict)


@dataclass
class _Call:
    """One gRPC call in flight: its meters and what it has learnt so far."""

    context: SessionContext
    method: storage.Method
    request_stream: storage.MessageStream
    response_stream: storage.MessageStream | None = None
    statement_id: str | None = None
    table: str | None = None
    resource: storage.Resource = field(default_factory=storage.Resource)
    streamed_request: bool = False
    request_fields: storage.Summary = field(default_factory=dict)
    response_fields: storage.Summary = field(default_factory=dict)
    write_stream: str | None = None
    appends: deque[tuple[int, int | None]] = field(default_factory=deque)
    appended_rows: int = 0
    acknowledged_rows: int = 0
    append_errors: int = 0
    first_append_error: tuple[str, str] | None = None
    pending: set[asyncio.Task[bool]] = field(default_factory=set)
    record_failed: bool = False
    finished: bool = False
    notes: list[str] = field(default_factory=list)


class StorageApi:
    """Meters, decodes and records every BigQuery Storage gRPC call of a session."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.links: dict[str, _Links] = {}

    def _links(self, context: SessionContext) -> _Links:
        return self.links.setdefault(context.session_id, _Links())

    # Hooks.

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.response is not None or state.get("local") or state.get("blocked"):
            return
        context = session_of(self.registry, flow.client_conn)
        host = flow.client_conn.sni or flow.request.pretty_host
        if context is None or not storage.is_storage_host(host) \
                or not storage.is_grpc(flow.request.headers.get("content-type")):
            return
        method = storage.method_of(flow.request.path)
        call = _Call(context, method, storage.MessageStream(
            method, storage.REQUEST, flow.request.headers.get("grpc-encoding"),
            digest_messages=method.path == _APPEND_ROWS))
        state[STATE_KEY] = call
        state["recorded_by"] = "storage"
        if method.kind != storage.BIDI:
            return  # Recorded in `request`, once its one message has arrived.
        call.streamed_request = True
        routed = storage.routing_parameters(
            flow.request.headers.get_all("x-goog-request-params")).get("write_stream")
        if routed:
            self._attach_write_stream(call, routed)
        if not await self._record(call, self._request_event(flow, call)):
            flow.kill()  # Nothing was sent upstream yet; the agent sees the stream reset.
            state["unrecorded"] = True
            return
        flow.request.stream = lambda data: self._tap_request(flow, call, data)

    async def request(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        call = state.get(STATE_KEY)
        if not isinstance(call, _Call) or state.get("unrecorded"):
            return
        if call.streamed_request:
            self._finish_stream(call, call.request_stream)
            return
        messages = call.request_stream.feed(flow.request.raw_content or b"")
        self._finish_stream(call, call.request_stream)
        if messages and not messages[0].error:
            call.request_fields = messages[0].fields
        self._link_request(call)
        if not await self._record(call, self._request_event(flow, call)):
            state["unrecorded"] = True
            flow.response = http.Response.make(200, b"", storage.local_error(
                "The session recorder could not record this request, so it was not sent."))
            flow.response.http_version = flow.request.http_version

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        call = state.get(STATE_KEY)
        if not isinstance(call, _Call) or state.get("unrecorded") or flow.response is None:
            return
        call.response_stream = storage.MessageStream(
            call.method, storage.RESPONSE, flow.response.headers.get("grpc-encoding"))
        flow.response.stream = lambda data: self._tap_response(flow, call, data)

    async def response(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        call = state.get(STATE_KEY)
        if not isinstance(call, _Call):
            self._learn_query_destination(flow)
            return
        if state.get("unrecorded") or call.finished or flow.response is None:
            return
        call.finished = True
        if call.response_stream is None:  # The response arrived whole, never streamed.
            call.response_stream = storage.MessageStream(
                call.method, storage.RESPONSE, flow.response.headers.get("grpc-encoding"))
            self._tap_response(flow, call, flow.response.raw_content or b"")
        self._finish_stream(call, call.response_stream)
        status = storage.grpc_status(flow.response.trailers) \
            or storage.grpc_status(flow.response.headers)
        trailers_only = not flow.response.trailers and status is not None
        await self._settle(call)
        await self._record(call, self._outcome_event(flow, call, status, trailers_only, None))

    async def error(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        call = state.get(STATE_KEY)
        if not isinstance(call, _Call) or state.get("unrecorded") or call.finished:
            return
        call.finished = True
        for meter in (call.request_stream, call.response_stream):
            if meter is not None:
                self._finish_stream(call, meter)
        await self._settle(call)
        message = flow.error.msg if flow.error else "the call broke off"
        await self._record(call, self._outcome_event(flow, call, None, False, message))

    # Stream callables: they run for every chunk and must never raise.

    def _tap_request(self, flow: http.HTTPFlow, call: _Call, data: bytes) -> bytes:
        if call.record_failed or call.context.journal.failed:
            if data and not call.record_failed:
                logger.error("Session %s flow %s: journal failed; request bytes of %s are no "
                             "longer forwarded", call.context.session_id, flow.id,
                             call.method.api_method)
            call.record_failed = True
            return b""
        try:
            for message in call.request_stream.feed(data):
                self._on_request_message(flow, call, message)
        except Exception:
            logger.exception("Session %s flow %s: metering the request failed",
                             call.context.session_id, flow.id)
            call.notes.append("request metering failed; see the appliance log")
        return data

    def _tap_response(self, flow: http.HTTPFlow, call: _Call, data: bytes) -> bytes:
        try:
            assert call.response_stream is not None
            for message in call.response_stream.feed(data):
                self._on_response_message(flow, call, message)
        except Exception:
            logger.exception("Session %s flow %s: metering the response failed",
                             call.context.session_id, flow.id)
            call.notes.append("response metering failed; see the appliance log")
        return data

    def _on_request_message(self, flow: http.HTTPFlow, call: _Call,
                            message: storage.Decoded) -> None:
        if not call.request_fields and not message.error:
            call.request_fields = message.fields
        if call.method.path != _APPEND_ROWS:
            return
        named = message.fields.get("write_stream")
        if isinstance(named, str) and named and named != call.write_stream:
            if call.write_stream and call.statement_id:
                call.notes.append(f"message {message.index} names write stream {named}, "
                                  f"the call opened on {call.write_stream}")
            self._attach_write_stream(call, named)
        rows = message.fields.get("rows") if not message.error else None
        offset = message.fields.get("offset")
        call.appends.append((rows if isinstance(rows, int) else 0,
                             offset if isinstance(offset, int) else None))
        if isinstance(rows, int):
            call.appended_rows += rows
        self._record_later(flow, call, self._message_event(flow, call, message, storage.REQUEST))

    def _on_response_message(self, flow: http.HTTPFlow, call: _Call,
                             message: storage.Decoded) -> None:
        if message.error:
            return
        if not call.response_fields:
            call.response_fields = message.fields
        path, fields = call.method.path, message.fields
        links = self._links(call.context)
        if path == _APPEND_ROWS:
            rows = call.appends.popleft()[0] if call.appends else 0
            if "error" in fields or fields.get("row_errors"):
                call.append_errors += 1
                error = fields.get("error") or {}
                call.first_append_error = call.first_append_error or (
                    str(error.get("status") or "ROW_ERRORS"), str(error.get("message") or
                                                                  "rows were refused"))
            else:
                call.acknowledged_rows += rows
                if call.write_stream:
                    links.acknowledged_rows[call.write_stream] = \
                        links.acknowledged_rows.get(call.write_stream, 0) + rows
            self._record_later(flow, call,
                               self._message_event(flow, call, message, storage.RESPONSE))
        elif call.statement_id is None:
            return
        elif path.endswith("/CreateReadSession"):
            session = fields.get("read_session")
            if isinstance(session, str) and session:
                links.read_sessions[session] = call.statement_id
                links.session_tables[session] = str(fields.get("table") or call.table or "")
            for name in fields.get("streams") or []:
                links.read_streams[name] = call.statement_id
        elif path.endswith("/SplitReadStream"):
            for key in ("primary_stream", "remainder_stream"):
                if fields.get(key):
                    links.read_streams[fields[key]] = call.statement_id
        elif path.endswith("/CreateWriteStream") and fields.get("write_stream"):
            links.write_streams[fields["write_stream"]] = call.statement_id
        elif path.endswith("/FinalizeWriteStream") and call.write_stream:
            links.finalized_rows[call.write_stream] = int(fields.get("row_count") or 0)

    # Linking calls to statements.

    def _new_statement(self, call: _Call) -> str:
        statement_id = call.context.next_statement_id()
        call.statement_id = statement_id
        return statement_id

    def _set_table(self, call: _Call, table: str | None) -> None:
        call.table = table or call.table
        call.resource = storage.parse_resource(call.table)

    def _attach_write_stream(self, call: _Call, write_stream: str) -> None:
        links = self._links(call.context)
        call.write_stream = write_stream
        self._set_table(call, storage.table_of_stream(write_stream))
        if call.statement_id is None:
            # A default stream, or one created outside this session: a write of its own.
            call.statement_id = links.write_streams.get(write_stream) \
                or self._new_statement(call)
            links.write_streams.setdefault(write_stream, call.statement_id)

    def _link_request(self, call: _Call) -> None:
        fields, links = call.request_fields, self._links(call.context)
        name = call.method.api_method.split(".", 1)[-1]
        if name in ("CreateReadSession", "CreateWriteStream"):
            self._set_table(call, fields.get("table") or None)
            self._new_statement(call)
            if name == "CreateReadSession" and call.table in links.query_destinations:
                fields["source_statement_id"] = links.query_destinations[call.table]
        elif name in ("ReadRows", "SplitReadStream"):
            stream = str(fields.get("read_stream") or "")
            session = storage.parse_resource(stream).session or ""
            self._set_table(call, links.session_tables.get(session))
            if call.resource.project is None:
                call.resource = storage.parse_resource(stream)
            call.statement_id = links.read_streams.get(stream) or links.read_sessions.get(session)
            if call.statement_id is None and name == "ReadRows":
                self._new_statement(call)  # A read of a session opened elsewhere.
        elif name == "BatchCommitWriteStreams":
            self._set_table(call, fields.get("table") or None)
            known = [links.write_streams[s] for s in fields.get("write_streams") or []
                     if s in links.write_streams]
            # NOTE: a commit of streams from several statements attaches to the first; the
            # others are listed in the request's detail as `statement_ids`.
            call.statement_id = known[0] if known else self._new_statement(call)
            if len(set(known)) > 1:
                fields["statement_ids"] = sorted(set(known))
        elif name in ("FinalizeWriteStream", "FlushRows", "GetWriteStream"):
            stream = str(fields.get("write_stream") or "")
            call.write_stream = stream or None
            self._set_table(call, storage.table_of_stream(stream))
            call.statement_id = links.write_streams.get(stream)
            if call.statement_id is None and name != "GetWriteStream":
                self._new_statement(call)

    def _learn_query_destination(self, flow: http.HTTPFlow) -> None:
        """Remember which statement's query wrote the table a later read session reads."""
        state = flow_state(flow)
        statement_id = state.get("statement_id")
        response = flow.response
        if not statement_id or response is None or response.status_code != 200 \
                or not _JOB_PATH.fullmatch(flow.request.path):
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None or response.raw_content is None \
                or len(response.raw_content) > MAX_JOB_BODY:
            return
        table = storage.query_destination(response.get_content(strict=False) or b"")
        if table:
            self._links(context).query_destinations[table] = statement_id

    # Events.

    def _base_event(self, flow: http.HTTPFlow, call: _Call, kind: str) -> dict[str, Any]:
        resource = call.resource
        return {
            "kind": kind,
            "flow_id": flow.id,
            "statement_id": call.statement_id,
            "client": address(flow.client_conn.peername),
            "server": address(flow.server_conn.address),
            "host": flow.request.pretty_host,
            "method": flow.request.method,
            "path": redacted_path(flow.request.path),
            "api": storage.API,
            "api_method": call.method.api_method,
            "project": resource.project,
            "location": resource.location,
            "dataset_id": resource.dataset_id,
            "table_id": resource.table_id,
        }

    def _request_event(self, flow: http.HTTPFlow, call: _Call) -> dict[str, Any]:
        request = flow.request
        event = self._base_event(flow, call, REQUEST)
        event["ts_ns"] = int(request.timestamp_start * 1_000_000) * 1000
        event["request_bytes"] = 0 if call.streamed_request else len(request.raw_content or b"")
        event["credential"] = credential_of(request)
        detail: dict[str, Any] = {
            "sni": flow.client_conn.sni,
            "http_version": request.http_version,
            "headers": {name: request.headers[name] for name in (*RECORDED_HEADERS,
                                                                 *GRPC_HEADERS)
                        if name in request.headers},
            "storage": call.request_fields,
        }
        if call.streamed_request:
            detail["streamed"] = True
        else:
            detail["request_stream"] = call.request_stream.summary()
        if call.notes:
            detail["notes"] = list(call.notes)
        event["detail"] = _json(detail)
        return event

    def _message_event(self, flow: http.HTTPFlow, call: _Call, message: storage.Decoded,
                       direction: str) -> dict[str, Any]:
        event = self._base_event(flow, call, STREAM_MESSAGE)
        event["request_bytes" if direction == storage.REQUEST else "response_bytes"] = \
            message.wire_bytes
        detail: dict[str, Any] = {"direction": direction, "index": message.index,
                                  "compressed": message.compressed, "storage": message.fields}
        if message.sha256:
            detail["sha256"] = message.sha256
        if message.error:
            detail["decode_error"] = message.error
        event["detail"] = _json(detail)
        return event

    def _outcome_event(self, flow: http.HTTPFlow, call: _Call,
                       status: storage.GrpcStatus | None, trailers_only: bool,
                       broke_off: str | None) -> dict[str, Any]:
        event = self._base_event(flow, call, RESPONSE)
        response = flow.response
        meter = call.response_stream
        event["status"] = response.status_code if response is not None else None
        event["response_bytes"] = meter.bytes if meter is not None else 0
        event["request_bytes"] = call.request_stream.bytes
        outcome = status.outcome if status is not None else "unknown"
        reason = status.name if status is not None and status.code else None
        message = status.message if status is not None and status.code else None
        if broke_off is not None:
            outcome, reason, message = "error", "CALL_BROKEN_OFF", broke_off
        elif response is not None and response.status_code != 200:
            outcome, reason = "error", f"HTTP {response.status_code}"
        outcome, reason, message = self._refine_outcome(call, outcome, reason, message,
                                                        broke_off is not None)
        event.update(outcome=outcome, error_reason=reason, error_message=message)
        event.update(self._counts(call))
        detail: dict[str, Any] = {
            "grpc": status.as_record() if status is not None else None,
            "trailers_only": trailers_only,
            "storage": call.response_fields,
            "request_stream": call.request_stream.summary(),
            "response_stream": meter.summary() if meter is not None else None,
        }
        if response is not None:
            detail["content_type"] = response.headers.get("content-type")
        if call.method.path == _APPEND_ROWS:
            detail["appends"] = {"sent": call.request_stream.messages,
                                 "rows_sent": call.appended_rows,
                                 "rows_acknowledged": call.acknowledged_rows,
                                 "errors": call.append_errors,
                                 "unacknowledged": len(call.appends)}
        if call.notes:
            detail["notes"] = list(call.notes)
        event["detail"] = _json(detail)
        return event

    def _refine_outcome(self, call: _Call, outcome: str, reason: str | None,
                        message: str | None, broke_off: bool) -> tuple[str, str | None,
                                                                       str | None]:
        """Adjust the transport outcome to what happened to the data.

        A client ends an AppendRows call by cancelling it, so a call whose every append was
        acknowledged is done however it closed. A commit can succeed as a call and still
        refuse streams.
        """
        if call.method.path == _APPEND_ROWS:
            if call.first_append_error is not None:
                return "error", *call.first_append_error
            if (broke_off or outcome == "cancelled") and not call.appends \
                    and call.request_stream.messages:
                return "done", None, None
        errors = call.response_fields.get("stream_errors")
        if outcome == "done" and errors:
            return "error", str(errors[0].get("code")), str(errors[0].get("message"))
        return outcome, reason, message

    def _counts(self, call: _Call) -> dict[str, Any]:
        """Rows that reached the agent (reads) or the table (writes), and the statement type."""
        name = call.method.api_method.split(".", 1)[-1]
        links = self._links(call.context)
        counts: dict[str, Any] = {}
        if name == "CreateReadSession":
            counts["statement_type"] = READ_STATEMENT
        elif name == "CreateWriteStream":
            counts["statement_type"] = WRITE_STATEMENT
        elif name == "ReadRows" and call.response_stream is not None:
            stream = str(call.request_fields.get("read_stream") or "")
            start = int(call.request_fields.get("offset") or 0)
            received = call.response_stream.rows
            high = links.read_high_water.get(stream, 0)
            # Rows below the highest offset already delivered are a resumption's repeats.
            fresh = max(0, start + received - max(start, high))
            links.read_high_water[stream] = max(high, start + received)
            counts["rows_returned"] = fresh
            call.response_fields = {"read_stream": stream, "offset": start,
                                    "rows_received": received, "rows_new": fresh,
                                    "rows_repeated": received - fresh}
        elif name == "AppendRows" and call.write_stream:
            counts["rows_affected"] = links.acknowledged_rows.get(call.write_stream, 0)
            if call.write_stream.endswith("/_default"):
                counts["statement_type"] = WRITE_STATEMENT
        elif name == "FinalizeWriteStream":
            counts["rows_affected"] = call.response_fields.get("row_count")
        elif name == "BatchCommitWriteStreams" and not call.response_fields.get("stream_errors"):
            streams = call.request_fields.get("write_streams") or []
            counts["rows_affected"] = sum(links.finalized_rows.get(s, 0) for s in streams)
        return counts

    # Journal.

    async def _record(self, call: _Call, event: dict[str, Any]) -> bool:
        try:
            await call.context.journal.append(event)
        except RecordingFailed as error:
            logger.error("Session %s flow %s: %s event of %s not recorded: %s",
                         call.context.session_id, event.get("flow_id"), event["kind"],
                         call.method.api_method, error)
            call.record_failed = True
            return False
        return True

    def _record_later(self, flow: http.HTTPFlow, call: _Call, event: dict[str, Any]) -> None:
        """Queue `event` from a stream callable, which cannot wait; order is kept, because
        tasks start in the order they were created and the journal chains on start."""
        task = asyncio.get_running_loop().create_task(self._record(call, event),
                                                      name=f"storage-{flow.id}")
        call.pending.add(task)
        task.add_done_callback(call.pending.discard)

    async def _settle(self, call: _Call) -> None:
        if call.pending:
            await asyncio.gather(*list(call.pending))

    def _finish_stream(self, call: _Call, meter: storage.MessageStream) -> None:
        truncated = meter.finish()
        if truncated:
            call.notes.append(f"{meter.direction}: {truncated}")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)

