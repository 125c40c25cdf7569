"""Tests for the BigQueryDecoder addon: one statement per job, labels, and streamed pages.

The flows are mitmproxy test flows carrying captured request/response pairs from
tests/bigquery/fixtures. The hooks run in the order mitmproxy calls them, together with the
real Recorder writing to a real journal, so the recorded events are checked too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from appliance.addons.bigquery import BigQueryDecoder
from appliance.addons.common import flow_state
from appliance.addons.recorder import Recorder
from appliance.context import Registry, SessionContext
from appliance.recordings.journal import read
from tests.bigquery.test_rest import body_bytes, load_fixture

JSON = "application/json; charset=UTF-8"


def make_flow(context: SessionContext, method: str, url: str, body: bytes = b"",
              headers: dict[str, str] | None = None) -> http.HTTPFlow:
    request = http.Request.make(method, url)
    # Set as sent: make() would encode the body and count its length itself.
    request.headers.clear()
    for name, value in (headers or {"content-type": JSON}).items():
        request.headers[name] = value
    request.raw_content = body
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = (context.agent_address, 40000)
    flow.server_conn.address = ("198.18.100.10", 443)
    flow_state(flow)["approved"] = True
    return flow


def fixture_flow(context: SessionContext, name: str) -> http.HTTPFlow:
    fixture = load_fixture(name)
    request = fixture["request"]
    return make_flow(context, request["method"], request["url"], body_bytes(request),
                     request["headers"])


def respond(flow: http.HTTPFlow, status: int, body: bytes | dict[str, Any],
            headers: dict[str, str] | None = None) -> None:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    flow.response = tutils.tresp(status_code=status, content=content,
                                 headers=http.Headers(**(headers or {"content_type": JSON})))


def fixture_response(flow: http.HTTPFlow, name: str) -> None:
    response = load_fixture(name)["response"]
    headers = http.Headers([(k.encode(), v.encode()) for k, v in response["headers"].items()])
    flow.response = tutils.tresp(status_code=response["status"], content=body_bytes(response),
                                 headers=headers)


class Proxy:
    """Runs decoder and recorder hooks on flows, the way mitmproxy orders them."""

    def __init__(self, registry: Registry) -> None:
        self.decoder = BigQueryDecoder(registry)
        self.recorder = Recorder(registry)

    def exchange(self, flow: http.HTTPFlow, answer: Any) -> http.HTTPFlow:
        asyncio.run(self._exchange(flow, answer))
        return flow

    async def _exchange(self, flow: http.HTTPFlow, answer: Any) -> None:
        with taddons.context(self.decoder, self.recorder) as context:  # type: ignore[no-untyped-call]
            try:
                self.decoder.requestheaders(flow)
                await self.recorder.requestheaders(flow)
                self.decoder.request(flow)
                await self.recorder.request(flow)
                answer(flow)
                self.decoder.responseheaders(flow)
                if callable(flow.response.stream):  # type: ignore[union-attr]
                    assert flow.response is not None
                    body = flow.response.raw_content or b""
                    for start in range(0, len(body), 7):
                        assert flow.response.stream(body[start:start + 7]) == \
                            body[start:start + 7]
                    flow.response.stream(b"")
                    flow.response.data.content = None
                self.decoder.response(flow)
                await self.recorder.response(flow)
            finally:
                context.master._legacy_log_events.uninstall()


def events(context: SessionContext, kind: str) -> list[dict[str, Any]]:
    return [e for e in read(context.journal.path).events if e["kind"] == kind]


def fixture_run(proxy: Proxy, context: SessionContext, *names: str) -> list[http.HTTPFlow]:
    return [proxy.exchange(fixture_flow(context, name),
                           lambda flow, name=name: fixture_response(flow, name))
            for name in names]


@pytest.mark.parametrize("names", [
    ("query_paging-01.json", "query_paging-02.json", "query_paging-03.json",
     "query_paging-04.json"),
    ("job_incomplete-01.json", "job_incomplete-02.json", "job_incomplete-03.json",
     "jobs_cancel-01.json"),
    ("query_incomplete-01.json", "query_incomplete-02.json", "query_incomplete-03.json",
     "query_incomplete-04.json", "query_incomplete-05.json"),
    ("load_resumable-01.json", "load_resumable-02.json", "load_resumable-03.json"),
    ("script_children-01.json", "script_children-02.json", "script_children-03.json",
     "script_children-04.json"),
    ("tabledata_list-02.json", "tabledata_list-03.json", "tabledata_list-04.json"),
])
def test_follow_ups_join_one_statement(context: SessionContext, registry: Registry,
                                       names: tuple[str, ...]) -> None:
    flows = fixture_run(Proxy(registry), context, *names)
    assert {flow_state(flow)["statement_id"] for flow in flows} == {"st-000001"}


def test_script_children_marked_with_parent(context: SessionContext,
                                            registry: Registry) -> None:
    fixture_run(Proxy(registry), context, "script_children-01.json", "script_children-02.json",
                "script_children-03.json", "script_children-04.json")
    parents = [e["parent_job_id"] for e in events(context, "response")]
    assert parents == [None, None, "capture_script_1", "capture_script_1"]


def test_child_seen_first_by_jobs_get_attaches(context: SessionContext,
                                               registry: Registry) -> None:
    flows = fixture_run(Proxy(registry), context, "script_children-01.json",
                        "script_children-04.json")
    assert flow_state(flows[1])["statement_id"] == "st-000001"
    assert flow_state(flows[1])["child_of"] == "capture_script_1"


@pytest.mark.parametrize(("status", "reason"), [(404, "notFound"), (409, "duplicate")])
def test_follow_up_error_is_transient(context: SessionContext, registry: Registry,
                                      status: int, reason: str) -> None:
    proxy = Proxy(registry)
    fixture_run(proxy, context, "jobs_insert_query-01.json")
    retry = fixture_flow(context, "jobs_insert_query-01.json")
    error = {"error": {"code": status, "message": "Already Exists: Job",
                       "errors": [{"reason": reason}]}}
    proxy.exchange(retry, lambda flow: respond(flow, status, error))
    last = events(context, "response")[-1]
    assert (last["statement_id"], last["outcome"], last["transient"]) == ("st-000001", None, True)


def test_first_request_error_is_not_transient(context: SessionContext,
                                              registry: Registry) -> None:
    proxy = Proxy(registry)
    flow = fixture_flow(context, "jobs_insert_query-01.json")
    error = {"error": {"code": 409, "message": "Already Exists", "errors": [{"reason": "x"}]}}
    proxy.exchange(flow, lambda flow: respond(flow, 409, error))
    assert events(context, "response")[-1]["outcome"] == "error"


def test_request_id_retry_joins_statement(context: SessionContext, registry: Registry) -> None:
    flows = fixture_run(Proxy(registry), context, "jobs_query-01.json", "jobs_query-01.json")
    assert [flow_state(f)["statement_id"] for f in flows] == ["st-000001", "st-000001"]


JOBS = "https://bigquery.googleapis.com/bigquery/v2/projects"


@pytest.mark.parametrize(("url", "expected"), [
    (f"{JOBS}/local/jobs/capture_select_1?location=US", "st-000001"),
    (f"{JOBS}/local/jobs/local:US.capture_select_1", "st-000001"),
    (f"{JOBS}/local/jobs/capture_select_1", "st-000001"),
    (f"{JOBS}/local/jobs/capture_select_1?location=EU", None),
    (f"{JOBS}/other/jobs/capture_select_1", None),
])
def test_job_key_includes_project_and_location(context: SessionContext, registry: Registry,
                                               url: str, expected: str | None) -> None:
    proxy = Proxy(registry)
    fixture_run(proxy, context, "jobs_insert_query-01.json")
    poll = proxy.exchange(make_flow(context, "GET", url), lambda flow: respond(flow, 200, {}))
    assert flow_state(poll).get("statement_id") == expected


def test_label_added_and_sql_from_original(context: SessionContext, registry: Registry) -> None:
    flow = fixture_run(Proxy(registry), context, "jobs_insert_query-01.json")[0]
    sent = json.loads(flow.request.content or b"")
    assert sent["configuration"]["labels"] == {
        "agent": "nightly", "appliance-session": context.session_id.lower()}
    request = events(context, "request")[0]
    assert json.loads(request["detail"])["bigquery"]["labels"] == {"agent": "nightly"}


def test_label_added_to_gzip_body(context: SessionContext, registry: Registry) -> None:
    fixture = load_fixture("dml_update-01.json")["request"]
    headers = {"content-type": JSON, "content-encoding": "gzip"}
    flow = make_flow(context, "POST", fixture["url"], gzip.compress(body_bytes(fixture)), headers)
    Proxy(registry).exchange(flow, lambda flow: respond(flow, 200, {"jobComplete": True}))
    sent = json.loads(gzip.decompress(flow.request.raw_content or b""))
    assert sent["labels"] == {"appliance-session": context.session_id.lower()}


def test_corrupt_gzip_forwarded_unchanged(context: SessionContext, registry: Registry) -> None:
    headers = {"content-type": JSON, "content-encoding": "gzip"}
    url = "https://bigquery.googleapis.com/bigquery/v2/projects/p/queries"
    flow = make_flow(context, "POST", url, b"\x1f\x8bnot gzip", headers)
    Proxy(registry).exchange(flow, lambda flow: respond(flow, 400, {"error": {"code": 400}}))
    assert flow.request.raw_content == b"\x1f\x8bnot gzip"
    assert "could not be decompressed" in json.loads(
        events(context, "request")[0]["detail"])["bigquery"]["decode_error"]


def test_label_off_leaves_body(context: SessionContext, registry: Registry) -> None:
    context.profile = dataclasses.replace(context.profile, job_label_key=None)
    fixture = load_fixture("jobs_insert_query-01.json")["request"]
    flow = fixture_run(Proxy(registry), context, "jobs_insert_query-01.json")[0]
    assert flow.request.content == body_bytes(fixture)


def test_result_page_streamed_counted_digested(context: SessionContext,
                                               registry: Registry) -> None:
    flow = fixture_run(Proxy(registry), context, "query_paging-03.json")[0]
    page = body_bytes(load_fixture("query_paging-03.json")["response"])
    response = events(context, "response")[0]
    assert (response["rows_returned"], response["result_bytes"], response["outcome"]) == \
        (10, len(page), "done")
    assert response["result_digest"] == "sha256:" + hashlib.sha256(page).hexdigest()
    assert flow_state(flow)["page"].skeleton is not None


def test_streamed_page_keeps_no_rows(context: SessionContext, registry: Registry) -> None:
    fixture_run(Proxy(registry), context, "tabledata_list-03.json")
    response = events(context, "response")[0]
    assert "result_rows" not in response["detail"]
    assert json.loads(response["detail"])["streamed"] is True


def test_rows_recorded_when_profile_asks(context: SessionContext, registry: Registry) -> None:
    context.profile = dataclasses.replace(context.profile, record_result_rows=True)
    fixture_run(Proxy(registry), context, "tabledata_list-03.json")
    detail = json.loads(events(context, "response")[0]["detail"])
    assert len(detail["result_rows"]) == 5


def test_upload_chunk_recorded_before_streaming(context: SessionContext,
                                                registry: Registry) -> None:
    proxy = Proxy(registry)
    fixture_run(proxy, context, "load_resumable-01.json")
    chunk = fixture_flow(context, "load_resumable-02.json")
    decoder_first = []

    def answer(flow: http.HTTPFlow) -> None:
        decoder_first.append(len(events(context, "request")))
        fixture_response(flow, "load_resumable-02.json")

    proxy.exchange(chunk, answer)
    assert chunk.request.stream
    assert decoder_first == [2]
    recorded = events(context, "request")[1]
    assert (recorded["statement_id"], recorded["upload_bytes"]) == ("st-000001", 262144)


def test_unknown_job_poll_has_no_statement(context: SessionContext, registry: Registry) -> None:
    url = "https://bigquery.googleapis.com/bigquery/v2/projects/p/jobs/nobody"
    flow = Proxy(registry).exchange(make_flow(context, "GET", url),
                                    lambda flow: respond(flow, 404, {"error": {"code": 404}}))
    assert flow_state(flow).get("statement_id") is None
    assert events(context, "response")[0].get("transient") is None
