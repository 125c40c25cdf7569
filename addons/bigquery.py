"""Decode BigQuery REST v2 traffic and attach each flow to the statement it belongs to.

Decoding itself is the pure functions of appliance.bigquery.rest and appliance.bigquery.pages.
This addon keeps the per-session state that links requests together, so that one job is one
statement however the client spreads it over requests:

- a job is keyed by (project, location, job id), wherever each part comes from; its polls,
  result pages, cancels and retries attach to the statement that created it, and so does a
  retried jobs.query with the same requestId;
- a script's child jobs (jobs.list with parentJobId, jobs.get of a child) attach to the
  script's statement, marked with the parent job id so that the statement counts its own
  statistics once;
- a resumable upload's chunks attach to the load job that its first request started;
- a 404 or 409 answering a poll or a retry of a known statement is a transport event, not the
  statement's outcome.

It also adds the recording's job label to jobs.insert and jobs.query bodies (after decoding the
body as the agent sent it), streams result pages through ``PageDigest`` instead of buffering
them, and streams resumable upload chunks, whose request event the recorder writes from the
headers before any byte goes upstream.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.coretypes.multidict import MultiDictView

from appliance.addons.common import flow_state, session_of
from appliance.bigquery import pages, rest
from appliance.context import Registry, SessionContext

logger = logging.getLogger(__name__)

# Result pages larger than this, or of unknown size, are streamed rather than buffered.
STREAM_THRESHOLD_BYTES = 1 << 20

_TRANSIENT_STATUSES = frozenset({404, 409})

JobKey = tuple[str | None, str]


@dataclass
class _Job:
    statement_id: str
    parent_job_id: str | None = None


@dataclass
class _SessionLinks:
    """Keys seen in one session that identify an existing statement."""

    # (project, job id) -> lowercased location (None when unknown) -> the job's statement.
    jobs: dict[JobKey, dict[str | None, _Job]] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    table_reads: dict[tuple[str | None, str | None, str | None], str] = field(
        default_factory=dict)
    uploads: dict[str, str] = field(default_factory=dict)

    def find(self, project: str | None, location: str | None, job_id: str) -> _Job | None:
        """Return the job with this key; an unknown location matches one known job only."""
        entries = self.jobs.get((project, job_id))
        if not entries:
            return None
        if location is not None:
            located = entries.get(location.lower())
            if located is not None or any(key is not None for key in entries):
                return located
            return entries.get(None)
        if None in entries:
            return entries[None]
        return next(iter(entries.values())) if len(entries) == 1 else None

    def remember(self, project: str | None, location: str | None, job_id: str,
                 job: _Job) -> None:
        entries = self.jobs.setdefault((project, job_id), {})
        entries.setdefault(location.lower() if location else None, job)


class BigQueryDecoder:
    """Adds `request_info`, `response_info` and `statement_id` to each BigQuery flow's state."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.links: dict[str, _SessionLinks] = {}

    def _links(self, context: SessionContext) -> _SessionLinks:
        return self.links.setdefault(context.session_id, _SessionLinks())

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Stream a resumable upload's data chunks; everything else is decoded whole."""
        state = flow_state(flow)
        if flow.response is not None or not state.get("approved"):
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        request = flow.request
        if request.method.upper() != "PUT" or "upload_id" not in request.query \
                or request.query.get("uploadType") != "resumable":
            return
        info = rest.decode_request(request.method, request.pretty_url, dict(request.headers),
                                   b"")
        if info.api_method != "jobs.insert":
            return
        state["request_info"] = info
        state["statement_id"] = self._statement_for(context, info, request.query, state)
        counter = _ByteCounter()
        state["streamed_request"] = counter
        request.stream = counter

    def request(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.response is not None or state.get("local") or state.get("blocked") \
                or "streamed_request" in state:
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        headers = dict(flow.request.headers)
        body = flow.request.raw_content or b""
        info = rest.decode_request(flow.request.method, flow.request.pretty_url, headers, body)
        state["request_info"] = info
        if info.api is None:
            return
        state["statement_id"] = self._statement_for(context, info, flow.request.query, state)
        self._add_label(context, flow, info, headers, body)

    def _add_label(self, context: SessionContext, flow: http.HTTPFlow,
                   info: rest.RequestInfo, headers: dict[str, str], body: bytes) -> None:
        key = context.profile.job_label_key
        if key is None or info.api_method not in rest.LABELLED_METHODS:
            return
        value = rest.label_value(context.session_id)
        labelled = rest.add_job_label(info, headers, body, key, value)
        if labelled is None:
            logger.info("Session %s flow %s: no job label added to %s", context.session_id,
                        flow.id, info.api_method)
            return
        try:
            # Encodes the body again with the request's Content-Encoding.
            flow.request.content = labelled
        except ValueError as error:
            logger.warning("Session %s flow %s: job label not added: %s", context.session_id,
                           flow.id, error)
            return
        flow_state(flow)["job_label"] = {key: value}

    def _statement_for(self, context: SessionContext, info: rest.RequestInfo,
                       query: MultiDictView[str, str],
                       state: dict[str, object]) -> str | None:
        links = self._links(context)
        found = self._existing_statement(links, info, query)
        if found is not None:
            statement_id, parent_job_id = found
            state["follow_up"] = True
            if parent_job_id:
                state["child_of"] = parent_job_id
            return statement_id
        if not info.starts_statement:
            return None
        statement_id = context.next_statement_id()
        if info.job_id:
            links.remember(info.project, info.location, info.job_id, _Job(statement_id))
        if info.request_id:
            links.request_ids[info.request_id] = statement_id
        if info.api_method == "tabledata.list":
            links.table_reads[(info.project, info.dataset_id, info.table_id)] = statement_id
        return statement_id

    @staticmethod
    def _existing_statement(links: _SessionLinks, info: rest.RequestInfo,
                            query: MultiDictView[str, str]
                            ) -> tuple[str, str | None] | None:
        """Return the statement and parent job id a follow-up request belongs to."""
        if info.upload_id and info.upload_id in links.uploads:
            return links.uploads[info.upload_id], None
        if info.parent_job_id:
            parent = links.find(info.project, info.location, info.parent_job_id)
            return (parent.statement_id, info.parent_job_id) if parent else None
        if info.job_id:
            job = links.find(info.project, info.location, info.job_id)
            if job is not None:
                return job.statement_id, job.parent_job_id
        if info.request_id and info.request_id in links.request_ids:
            return links.request_ids[info.request_id], None
        table_key = (info.project, info.dataset_id, info.table_id)
        if info.api_method == "tabledata.list" and query.get("pageToken") \
                and table_key in links.table_reads:
            return links.table_reads[table_key], None
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream large result pages through a digest instead of buffering them.

        Pages of known size up to STREAM_THRESHOLD_BYTES stay buffered, so their response
        event (with the job outcome) is durable before the agent receives them. A streamed page
        reaches the agent while it passes, and its event is written when it ends.
        """
        state = flow_state(flow)
        info = state.get("request_info")
        response = flow.response
        if not isinstance(info, rest.RequestInfo) or response is None \
                or info.api_method not in rest.RESULT_METHODS or response.status_code != 200:
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None or context.profile.record_result_rows:
            return
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) <= STREAM_THRESHOLD_BYTES:
            return
        digest = pages.PageDigest(response.headers.get("content-encoding"))
        state["page_digest"] = digest
        response.stream = digest

    def response(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        info = state.get("request_info")
        if not isinstance(info, rest.RequestInfo) or info.api is None or flow.response is None:
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        result = self._decode(context, flow, info, state)
        links = self._links(context)
        statement_id = state.get("statement_id")
        if isinstance(statement_id, str):
            self._learn(links, info, result, statement_id, state)
        elif result.parent_job_id:
            self._attach_child(links, info, result, state)
        status = flow.response.status_code
        if status in _TRANSIENT_STATUSES and state.get("follow_up"):
            # A job not yet visible, or a duplicate of one already created by an earlier try.
            state["transient"] = True
            result = dataclasses.replace(result, outcome=None)
            logger.info("Session %s flow %s: HTTP %s on a follow-up of %s recorded as "
                        "transient", context.session_id, flow.id, status, statement_id)
        state["response_info"] = result

    def _decode(self, context: SessionContext, flow: http.HTTPFlow, info: rest.RequestInfo,
                state: dict[str, object]) -> rest.ResponseInfo:
        assert flow.response is not None
        response = flow.response
        headers = dict(response.headers)
        digest = state.get("page_digest")
        if isinstance(digest, pages.PageDigest):
            summary = digest.summary()
            state["page"] = summary
            if summary.skeleton is None:
                return dataclasses.replace(
                    rest.decode_response(info, response.status_code, {}, b""),
                    decode_error=summary.error)
            headers.pop("content-encoding", None)
            headers.pop("Content-Encoding", None)
            result = rest.decode_response(info, response.status_code, headers,
                                          summary.skeleton)
            return dataclasses.replace(result, rows_returned=summary.rows
                                       if summary.rows is not None else result.rows_returned)
        body = response.raw_content or b""
        if info.api_method in rest.RESULT_METHODS and response.status_code == 200:
            state["page"] = pages.summarise(body, response.headers.get("content-encoding"))
        return rest.decode_response(info, response.status_code, headers, body,
                                    keep_rows=context.profile.record_result_rows)

    @staticmethod
    def _learn(links: _SessionLinks, info: rest.RequestInfo, result: rest.ResponseInfo,
               statement_id: str, state: dict[str, object]) -> None:
        """Remember the keys a response reveals: job id, location, upload id, children."""
        child_of = state.get("child_of")
        job = _Job(statement_id, child_of if isinstance(child_of, str) else None)
        if result.job_id:
            # jobs.query and jobs.insert without a client job id learn the job id here.
            project = result.project or info.project
            links.remember(project, result.location or info.location, result.job_id, job)
        elif info.job_id and result.location:
            links.remember(info.project, result.location, info.job_id, job)
        if result.upload_id:
            links.uploads.setdefault(result.upload_id, statement_id)
        if info.parent_job_id and isinstance(result.child_jobs, list):
            for child in result.child_jobs:
                if isinstance(child, dict) and isinstance(child.get("job_id"), str):
                    child_job = _Job(statement_id, info.parent_job_id)
                    links.remember(info.project, child.get("location"), child["job_id"],
                                   child_job)

    @staticmethod
    def _attach_child(links: _SessionLinks, info: rest.RequestInfo, result: rest.ResponseInfo,
                      state: dict[str, object]) -> None:
        """Attach a jobs.get of a script's child job, seen first here, to the script."""
        assert result.parent_job_id is not None
        project = result.project or info.project
        parent = links.find(project, result.location or info.location, result.parent_job_id)
        if parent is None or not result.job_id:
            return
        state["statement_id"] = parent.statement_id
        state["child_of"] = result.parent_job_id
        links.remember(project, result.location, result.job_id,
                       _Job(parent.statement_id, result.parent_job_id))


class _ByteCounter:
    """A request stream callable that passes chunks on unchanged and counts their bytes."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return chunk
