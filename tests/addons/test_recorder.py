"""Tests for the Recorder addon: record before forward, and fail closed when the journal fails."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from appliance.addons.common import flow_state
from appliance.addons.recorder import Recorder
from appliance.context import Registry, SessionContext, fingerprint
from appliance.recordings.journal import read, verify_chain

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

SECRET = "ya29.a-secret-bearer-token"


def bigquery_flow(context: SessionContext, path: str = "/bigquery/v2/projects/proj/datasets",
                  peer: str | None = None) -> http.HTTPFlow:
    request = tutils.treq(host="bigquery.googleapis.com", port=443, scheme=b"https",
                          path=path.encode(), method=b"GET", content=b"",
                          headers=http.Headers(((b"authorization", f"Bearer {SECRET}".encode()),
                                                (b"user-agent", b"test-agent/1.0"))))
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = (peer or context.agent_address, 40000)
    flow.client_conn.sni = "bigquery.googleapis.com"
    flow.server_conn.address = ("198.18.100.10", 443)
    return flow


Step = tuple[str, http.HTTPFlow] | Callable[[], object]


def run_hooks(recorder: Recorder, *steps: Step) -> None:
    """Run `(hook, flow)` calls and plain callables in order, in one mitmproxy test context."""
    async def invoke() -> None:
        with taddons.context(recorder) as context:  # type: ignore[no-untyped-call]
            try:
                for step in steps:
                    if callable(step):
                        step()
                    else:
                        hook, flow = step
                        await getattr(recorder, hook)(flow)
            finally:
                # taddons.context leaves mitmproxy's log handler, bound to this event loop, on
                # the root logger. Without this, later tests would log into a closed loop.
                context.master._legacy_log_events.uninstall()

    asyncio.run(invoke())


def test_request_event_durable_on_return(context: SessionContext, registry: Registry) -> None:
    flow = bigquery_flow(context)

    run_hooks(Recorder(registry), ("request", flow))

    events = read(context.journal.path).events
    assert len(events) == 1
    event = events[0]
    assert event["kind"] == "request"
    assert event["flow_id"] == flow.id
    assert event["client"] == f"{context.agent_address}:40000"
    assert event["server"] == "198.18.100.10:443"
    assert event["host"] == "bigquery.googleapis.com"
    assert event["method"] == "GET"
    assert event["credential"] == f"bearer:{fingerprint(SECRET)}"
    assert flow.response is None


def test_request_event_detail_headers(context: SessionContext, registry: Registry) -> None:
    run_hooks(Recorder(registry), ("request", bigquery_flow(context)))

    detail = json.loads(read(context.journal.path).events[0]["detail"])

    assert detail["sni"] == "bigquery.googleapis.com"
    assert detail["headers"] == {"user-agent": "test-agent/1.0"}


def test_journal_never_holds_secret(context: SessionContext, registry: Registry) -> None:
    flow = bigquery_flow(context, path=f"/bigquery/v2/projects/proj/datasets?access_token={SECRET}")
    flow.response = tutils.tresp()

    run_hooks(Recorder(registry), ("request", flow), ("response", flow))

    assert SECRET.encode() not in context.journal.path.read_bytes()


def test_response_event_follows_request(context: SessionContext, registry: Registry) -> None:
    flow = bigquery_flow(context)

    def respond() -> None:
        flow.response = tutils.tresp(status_code=404)

    run_hooks(Recorder(registry), ("request", flow), respond, ("response", flow))

    events = read(context.journal.path).events
    assert [event["kind"] for event in events] == ["request", "response"]
    assert events[1]["status"] == 404
    assert events[1]["flow_id"] == flow.id
    assert verify_chain(context.session_id, events) == []


def test_blocked_flow_recorded_as_blocked(context: SessionContext, registry: Registry) -> None:
    flow = bigquery_flow(context)
    flow_state(flow)["blocked"] = "host 'x' is not in the allowlist"

    run_hooks(Recorder(registry), ("request", flow))

    event = read(context.journal.path).events[0]
    assert event["kind"] == "blocked"
    assert json.loads(event["detail"])["reason"] == "host 'x' is not in the allowlist"


def test_unknown_client_not_recorded(context: SessionContext, registry: Registry) -> None:
    flow = bigquery_flow(context, peer="198.18.55.55")

    run_hooks(Recorder(registry), ("request", flow))

    assert read(context.journal.path).events == []
    assert flow.response is None


def test_flow_error_recorded(context: SessionContext, registry: Registry) -> None:
    flow = bigquery_flow(context)
    flow.error = tflow.terr("connection reset")

    run_hooks(Recorder(registry), ("error", flow))

    event = read(context.journal.path).events[0]
    assert event["kind"] == "flow_error"
    assert json.loads(event["detail"]) == {"error": "connection reset"}


@needs_root
def test_failed_journal_answers_503(full_disk_context: SessionContext) -> None:
    registry = Registry()
    registry.add(full_disk_context)
    flow = bigquery_flow(full_disk_context, path="/bigquery/v2/projects/proj/queries")
    flow.request.content = json.dumps({"query": "SELECT 1", "pad": "x" * 16384}).encode()
    request_before = flow.request.get_state()  # type: ignore[no-untyped-call]

    run_hooks(Recorder(registry), ("request", flow))

    assert full_disk_context.journal.failed
    assert flow.response is not None
    assert flow.response.status_code == 503
    assert flow.response.headers["content-type"] == "application/json; charset=UTF-8"
    assert flow.error is None
    request_after = flow.request.get_state()  # type: ignore[no-untyped-call]
    assert request_after == request_before


@needs_root
def test_failed_journal_google_error_body(full_disk_context: SessionContext) -> None:
    registry = Registry()
    registry.add(full_disk_context)
    flow = bigquery_flow(full_disk_context)
    flow.request.content = b"x" * 16384

    run_hooks(Recorder(registry), ("request", flow))

    assert flow.response is not None
    body = json.loads(flow.response.content or b"")
    assert body["error"]["code"] == 503
    assert body["error"]["status"] == "UNAVAILABLE"
    assert body["error"]["errors"][0]["reason"] == "recordingFailed"
    assert "No space left on device" in body["error"]["message"]


@needs_root
def test_failed_journal_later_flows_503(full_disk_context: SessionContext) -> None:
    registry = Registry()
    registry.add(full_disk_context)
    first = bigquery_flow(full_disk_context)
    first.request.content = b"x" * 16384
    later = bigquery_flow(full_disk_context)

    run_hooks(Recorder(registry), ("request", first), ("request", later))

    assert later.response is not None
    assert later.response.status_code == 503


@needs_root
def test_failed_request_marked_unrecorded(full_disk_context: SessionContext) -> None:
    registry = Registry()
    registry.add(full_disk_context)
    flow = bigquery_flow(full_disk_context)
    flow.request.content = b"x" * 16384

    run_hooks(Recorder(registry), ("request", flow), ("response", flow))

    assert flow_state(flow)["unrecorded"] is True
    assert flow.response is not None
    assert flow.response.status_code == 503


@pytest.mark.parametrize("mark", ["unrecorded", "blocked"])
def test_response_of_marked_flow_skipped(context: SessionContext, registry: Registry,
                                         mark: str) -> None:
    flow = bigquery_flow(context)
    flow.response = tutils.tresp()
    flow_state(flow)[mark] = True

    run_hooks(Recorder(registry), ("response", flow))

    assert read(context.journal.path).events == []
