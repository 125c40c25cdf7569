"""Tests for the StorageApi addon: record before forward, streaming taps, linking, outcomes.

Flows are mitmproxy test flows carrying real serialized Storage API messages; the hooks run
in a mitmproxy test context against a real journal, and the stream callables are fed the
body in chunks as mitmproxy's HTTP/2 layer would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from appliance.addons.common import flow_state
from appliance.addons.recorder import Recorder
from appliance.addons.storage import StorageApi
from appliance.bigquery import storage
from appliance.context import Registry, SessionContext, fingerprint
from appliance.recordings.journal import read
from tests.bigquery.test_storage import (
    READ,
    SESSION,
    STREAM,
    TABLE,
    WRITE,
    append_request,
    create_read_session_request,
    read_rows_response,
    read_session,
    serialized,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

SECRET = "ya29.a-secret-bearer-token"
WRITE_STREAM = f"{TABLE}/streams/s1"
Step = Callable[[], Any]


def grpc_flow(context: SessionContext, path: str, body: bytes = b"",
              host: str = "bigquerystorage.googleapis.com",
              content_type: bytes = b"application/grpc",
              extra: tuple[tuple[bytes, bytes], ...] = ()) -> http.HTTPFlow:
    request = tutils.treq(
        host=host, port=443, scheme=b"https", method=b"POST", path=path.encode(),
        http_version=b"HTTP/2.0", content=body,
        headers=http.Headers(((b"content-type", content_type), (b"te", b"trailers"),
                              (b"authorization", f"Bearer {SECRET}".encode()), *extra)))
    created = tflow.tflow(req=request)
    created.client_conn.peername = (context.agent_address, 40000)
    created.client_conn.sni = host
    created.server_conn.address = ("198.18.100.12", 443)
    return created


def grpc_response(headers: tuple[tuple[bytes, bytes], ...] = ()) -> http.Response:
    return tutils.tresp(http_version=b"HTTP/2.0", content=None,
                        headers=http.Headers(((b"content-type", b"application/grpc"),
                                              *headers)))


def run(addon: StorageApi, *steps: Step) -> None:
    """Run hook calls and stream feeds in order, in one mitmproxy test context."""
    async def invoke() -> None:
        with taddons.context(addon) as context:  # type: ignore[no-untyped-call]
            try:
                for step in steps:
                    result = step()
                    if asyncio.iscoroutine(result):
                        await result
            finally:
                context.master._legacy_log_events.uninstall()

    asyncio.run(invoke())


def unary_call(addon: StorageApi, flow: http.HTTPFlow, response_body: bytes,
               chunk: int = 7) -> list[Step]:
    """The hook sequence of one unary or server-streaming call that ends with OK."""
    def respond() -> None:
        flow.response = grpc_response()

    def stream() -> None:
        assert flow.response is not None and callable(flow.response.stream)
        for start in range(0, len(response_body), chunk):
            passed = flow.response.stream(response_body[start:start + chunk])
            assert passed == response_body[start:start + chunk]

    def trailers() -> None:
        assert flow.response is not None
        flow.response.trailers = http.Headers(((b"grpc-status", b"0"),))

    return [lambda: addon.requestheaders(flow), lambda: addon.request(flow), respond,
            lambda: addon.responseheaders(flow), stream, trailers,
            lambda: addon.response(flow)]


def journal_events(context: SessionContext) -> list[dict[str, Any]]:
    return read(context.journal.path).events


def detail(event: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(event["detail"])
    assert isinstance(value, dict)
    return value


def create_session_flow(context: SessionContext) -> http.HTTPFlow:
    return grpc_flow(context, READ + "CreateReadSession",
                     storage.frame(serialized(create_read_session_request())))


def read_rows_flow(context: SessionContext, offset: int = 0) -> http.HTTPFlow:
    request = storage.types.ReadRowsRequest(read_stream=STREAM, offset=offset)
    return grpc_flow(context, READ + "ReadRows", storage.frame(serialized(request)))


def rows_body(*rows: int) -> bytes:
    return b"".join(storage.frame(serialized(read_rows_response(n))) for n in rows)


# Unary calls.

def test_unary_request_recorded_before_forward(context: SessionContext,
                                               registry: Registry) -> None:
    addon, flow = StorageApi(registry), create_session_flow(context)
    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow))

    (event,) = journal_events(context)
    assert (event["kind"], event["statement_id"], event["api_method"], event["table_id"]) == (
        "request", "st-000001", "BigQueryRead.CreateReadSession", "orders")
    assert detail(event)["storage"]["row_restriction"] == "amount > 100"
    assert event["credential"] == f"bearer:{fingerprint(SECRET)}"
    assert flow.response is None


def test_unary_request_not_streamed(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), create_session_flow(context)
    run(addon, lambda: addon.requestheaders(flow))
    assert flow.request.stream is False


def test_recorder_skips_storage_flows(context: SessionContext, registry: Registry) -> None:
    addon, recorder = StorageApi(registry), Recorder(registry)
    flow = create_session_flow(context)
    body = storage.frame(serialized(read_session()))
    run(addon, *unary_call(addon, flow, body), lambda: recorder.request(flow),
        lambda: recorder.response(flow))
    assert [e["kind"] for e in journal_events(context)] == ["request", "response"]


def test_response_outcome_recorded(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), create_session_flow(context)
    body = storage.frame(serialized(read_session()))
    run(addon, *unary_call(addon, flow, body))

    outcome = journal_events(context)[-1]
    assert (outcome["kind"], outcome["outcome"], outcome["statement_type"],
            outcome["response_bytes"]) == ("response", "done", "STORAGE_READ", len(body))
    assert detail(outcome)["response_stream"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert detail(outcome)["storage"]["streams"] == [STREAM, f"{SESSION}/streams/b"]


def test_read_rows_attach_to_read_session(context: SessionContext, registry: Registry) -> None:
    addon = StorageApi(registry)
    first, second = create_session_flow(context), read_rows_flow(context)
    run(addon, *unary_call(addon, first, storage.frame(serialized(read_session()))),
        *unary_call(addon, second, rows_body(3, 4)))

    outcome = journal_events(context)[-1]
    assert (outcome["statement_id"], outcome["rows_returned"], outcome["table_id"]) == (
        "st-000001", 7, "orders")


def test_resumed_read_rows_not_double_counted(context: SessionContext,
                                              registry: Registry) -> None:
    addon = StorageApi(registry)
    flows = [create_session_flow(context), read_rows_flow(context), read_rows_flow(context, 5)]
    run(addon, *unary_call(addon, flows[0], storage.frame(serialized(read_session()))),
        *unary_call(addon, flows[1], rows_body(3, 4)),
        *unary_call(addon, flows[2], rows_body(2, 2)))

    outcomes = [e for e in journal_events(context) if e["api_method"] == "BigQueryRead.ReadRows"
                and e["kind"] == "response"]
    assert [e["rows_returned"] for e in outcomes] == [7, 2]
    assert detail(outcomes[1])["storage"]["rows_repeated"] == 2


def test_read_of_unknown_stream_starts_statement(context: SessionContext,
                                                 registry: Registry) -> None:
    addon, flow = StorageApi(registry), read_rows_flow(context)
    run(addon, *unary_call(addon, flow, rows_body(1)))
    assert {e["statement_id"] for e in journal_events(context)} == {"st-000001"}


def test_trailers_only_error_recorded(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), create_session_flow(context)
    headers = ((b"grpc-status", b"7"), (b"grpc-message", b"Access%20Denied%3A%20orders"))

    def respond() -> None:
        flow.response = grpc_response(headers)

    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow), respond,
        lambda: addon.responseheaders(flow), lambda: addon.response(flow))

    outcome = journal_events(context)[-1]
    assert (outcome["outcome"], outcome["error_reason"], outcome["error_message"]) == (
        "error", "PERMISSION_DENIED", "Access Denied: orders")
    assert detail(outcome)["trailers_only"] is True


def test_error_response_passes_unchanged(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), create_session_flow(context)
    headers = ((b"grpc-status", b"7"), (b"grpc-message", b"Access%20Denied"))

    def respond() -> None:
        flow.response = grpc_response(headers)

    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow), respond,
        lambda: addon.responseheaders(flow), lambda: addon.response(flow))
    assert flow.response is not None
    assert flow.response.headers.fields == grpc_response(headers).headers.fields


def test_malformed_request_recorded_as_decode_failure(context: SessionContext,
                                                      registry: Registry) -> None:
    addon = StorageApi(registry)
    flow = grpc_flow(context, READ + "CreateReadSession", storage.frame(b"\xff\xff\xff"))
    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow))

    (event,) = journal_events(context)
    assert "not a valid CreateReadSessionRequest" in \
        detail(event)["request_stream"]["decode_error"]


@pytest.mark.parametrize(("host", "content_type"), [
    ("bigquery.googleapis.com", b"application/grpc"),
    ("bigquerystorage.googleapis.com", b"application/grpc-web"),
    ("bigquerystorage.googleapis.com", b"application/json"),
])
def test_other_traffic_left_alone(context: SessionContext, registry: Registry, host: str,
                                  content_type: bytes) -> None:
    addon = StorageApi(registry)
    flow = grpc_flow(context, READ + "CreateReadSession", b"", host, content_type)
    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow))
    assert "recorded_by" not in flow_state(flow)


def test_blocked_flow_left_alone(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), create_session_flow(context)
    flow_state(flow)["blocked"] = "not allowed"
    run(addon, lambda: addon.requestheaders(flow))
    assert journal_events(context) == []


# AppendRows: streamed request.

def append_flow(context: SessionContext, routed: bool = True) -> http.HTTPFlow:
    routing = ((b"x-goog-request-params", b""),)
    if routed:
        routing = ((b"x-goog-request-params",
                    f"write_stream={WRITE_STREAM.replace('/', '%2F')}".encode()), *routing)
    return grpc_flow(context, WRITE + "AppendRows", extra=routing)


def append_call(addon: StorageApi, flow: http.HTTPFlow, requests: list[bytes],
                responses: list[bytes], ending: str = "trailers") -> list[Step]:
    """Open the call, then alternate: one request message, split in two chunks, then its
    acknowledgement, as a client that waits for each result does."""
    def send(message: bytes) -> Step:
        def feed() -> None:
            assert callable(flow.request.stream)
            middle = len(message) // 2
            for part in (message[:middle], message[middle:]):
                assert flow.request.stream(part) == part
        return feed

    def acknowledge(message: bytes) -> Step:
        def feed() -> None:
            if flow.response is None:
                flow.response = grpc_response()
                addon.responseheaders(flow)
            assert flow.response is not None and callable(flow.response.stream)
            assert flow.response.stream(message) == message
        return feed

    def end() -> Any:
        if ending == "cancel":
            flow.error = mflow.Error("client disconnected")
            return addon.error(flow)
        assert flow.response is not None
        flow.response.trailers = http.Headers(((b"grpc-status", b"0"),))
        return addon.response(flow)

    steps: list[Step] = [lambda: addon.requestheaders(flow)]
    for request, response in zip(requests, responses, strict=True):
        steps += [send(request), acknowledge(response)]
    return [*steps, end]


def appends() -> tuple[list[bytes], list[bytes]]:
    requests = [storage.frame(serialized(append_request(2, 0))),
                storage.frame(serialized(append_request(3, 2, first=False)))]
    responses = [storage.frame(serialized(storage.types.AppendRowsResponse(
        append_result=storage.types.AppendRowsResponse.AppendResult(offset=offset))))
        for offset in (0, 2)]
    return requests, responses


def test_append_call_recorded_before_streaming(context: SessionContext,
                                               registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context)
    run(addon, lambda: addon.requestheaders(flow))

    (event,) = journal_events(context)
    assert (event["kind"], event["statement_id"], event["table_id"]) == (
        "request", "st-000001", "orders")
    assert callable(flow.request.stream)


def test_each_append_recorded(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context)
    requests, responses = appends()
    run(addon, *append_call(addon, flow, requests, responses))

    sent = [detail(e) for e in journal_events(context) if e["kind"] == "stream_message"
            and detail(e)["direction"] == "request"]
    assert [(d["storage"]["rows"], d["storage"]["offset"]) for d in sent] == [(2, 0), (3, 2)]
    assert [d["sha256"] for d in sent] == [hashlib.sha256(r[5:]).hexdigest() for r in requests]


def test_each_acknowledgement_recorded(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context)
    run(addon, *append_call(addon, flow, *appends()))

    acknowledged = [detail(e)["storage"] for e in journal_events(context)
                    if e["kind"] == "stream_message" and detail(e)["direction"] == "response"]
    assert [a["offset"] for a in acknowledged] == [0, 2]


def test_append_outcome_counts_rows(context: SessionContext, registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context)
    run(addon, *append_call(addon, flow, *appends()))

    outcome = journal_events(context)[-1]
    assert (outcome["kind"], outcome["outcome"], outcome["rows_affected"]) == (
        "response", "done", 5)
    assert detail(outcome)["appends"]["rows_acknowledged"] == 5


def test_cancelled_append_call_done_when_acknowledged(context: SessionContext,
                                                     registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context)
    run(addon, *append_call(addon, flow, *appends(), ending="cancel"))
    outcome = journal_events(context)[-1]
    assert (outcome["outcome"], outcome["error_reason"]) == ("done", None)


def test_refused_append_makes_call_an_error(context: SessionContext,
                                            registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context)
    requests, responses = appends()
    responses[1] = storage.frame(serialized(storage.types.AppendRowsResponse(
        error={"code": 6, "message": "offset 2 exists"})))
    run(addon, *append_call(addon, flow, requests, responses))

    outcome = journal_events(context)[-1]
    assert (outcome["outcome"], outcome["error_reason"], outcome["rows_affected"]) == (
        "error", "ALREADY_EXISTS", 2)


def test_unrouted_append_linked_by_first_message(context: SessionContext,
                                                 registry: Registry) -> None:
    addon, flow = StorageApi(registry), append_flow(context, routed=False)
    run(addon, *append_call(addon, flow, *appends()))

    events = journal_events(context)
    assert events[0]["statement_id"] is None
    assert {e["statement_id"] for e in events[1:]} == {"st-000001"}


def test_append_attaches_to_created_stream(context: SessionContext, registry: Registry) -> None:
    addon = StorageApi(registry)
    create = grpc_flow(context, WRITE + "CreateWriteStream", storage.frame(serialized(
        storage.types.CreateWriteStreamRequest(parent=TABLE))))
    created = storage.frame(serialized(storage.types.WriteStream(name=WRITE_STREAM)))
    flow = append_flow(context)
    run(addon, *unary_call(addon, create, created), *append_call(addon, flow, *appends()))
    assert {e["statement_id"] for e in journal_events(context)} == {"st-000001"}


# Linking a read session to the query that wrote its table.

def test_read_session_linked_to_query(context: SessionContext, registry: Registry) -> None:
    addon = StorageApi(registry)
    job = tflow.tflow(req=tutils.treq(host="bigquery.googleapis.com", port=443, scheme=b"https",
                                      path=b"/bigquery/v2/projects/proj/jobs/job1",
                                      content=b""),
                      resp=tutils.tresp(content=json.dumps({"configuration": {"query": {
                          "destinationTable": {"projectId": "proj", "datasetId": "sales",
                                               "tableId": "orders"}}}}).encode()))
    job.client_conn.peername = (context.agent_address, 40001)
    flow_state(job)["statement_id"] = "st-000009"
    flow = create_session_flow(context)
    run(addon, lambda: addon.response(job), lambda: addon.requestheaders(flow),
        lambda: addon.request(flow))

    (event,) = journal_events(context)
    assert detail(event)["storage"]["source_statement_id"] == "st-000009"


# Fail closed.

@needs_root
def test_unary_call_refused_when_journal_fails(full_disk_context: SessionContext) -> None:
    registry = Registry()
    registry.add(full_disk_context)
    addon, flow = StorageApi(registry), create_session_flow(full_disk_context)
    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow))

    assert flow.response is not None
    assert (flow.response.headers["grpc-status"], flow.response.raw_content) == ("14", b"")


@needs_root
def test_append_call_reset_when_journal_fails(full_disk_context: SessionContext) -> None:
    registry = Registry()
    registry.add(full_disk_context)
    addon, flow = StorageApi(registry), append_flow(full_disk_context)
    run(addon, lambda: addon.requestheaders(flow))

    assert flow.error is not None and flow.request.stream is False


# Memory.

def test_long_read_stream_memory_flat(context: SessionContext, registry: Registry) -> None:
    """40 MB of ReadRows responses pass in 16 KiB chunks while at most one 40 KB message is
    buffered: the traced peak stays far below the stream's size."""
    import tracemalloc

    addon, flow = StorageApi(registry), read_rows_flow(context)
    message = storage.frame(serialized(storage.types.ReadRowsResponse(
        row_count=1000, avro_rows=storage.types.AvroRows(serialized_binary_rows=b"r" * 40_000))))
    chunk, count = 16 * 1024, 1000
    body = message * 20  # Twenty messages, cut across message boundaries, fed 50 times.
    peaks: list[int] = []

    def stream() -> None:
        assert flow.response is not None and callable(flow.response.stream)
        tracemalloc.start()
        try:
            for _ in range(count // 20):
                for start in range(0, len(body), chunk):
                    flow.response.stream(body[start:start + chunk])
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()

    def respond() -> None:
        flow.response = grpc_response()

    def trailers() -> None:
        assert flow.response is not None
        flow.response.trailers = http.Headers(((b"grpc-status", b"0"),))

    run(addon, lambda: addon.requestheaders(flow), lambda: addon.request(flow), respond,
        lambda: addon.responseheaders(flow), stream, trailers, lambda: addon.response(flow))

    outcome = journal_events(context)[-1]
    assert (outcome["rows_returned"], outcome["response_bytes"]) == (
        count * 1000, count * len(message))
    assert peaks[0] < 1_000_000
