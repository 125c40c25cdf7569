"""Decode BigQuery REST v2 traffic and attach each flow to the statement it belongs to.

Decoding itself is the pure functions of appliance.bigquery.rest; this addon keeps the
per-session state that links requests together: a job's polls and result pages attach to the
statement that created the job, a retried jobs.query with the same requestId to the first
attempt, and a tabledata.list page with a pageToken to the read it continues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mitmproxy import http

from appliance.addons.common import flow_state, session_of
from appliance.bigquery import rest
from appliance.context import Registry, SessionContext

logger = logging.getLogger(__name__)


@dataclass
class _SessionLinks:
    """Keys seen in one session that identify an existing statement."""

    jobs: dict[tuple[str | None, str], str] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    table_reads: dict[tuple[str | None, str | None, str | None], str] = field(
        default_factory=dict)


class BigQueryDecoder:
    """Adds `request_info`, `response_info` and `statement_id` to each BigQuery flow's state."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.links: dict[str, _SessionLinks] = {}

    def _links(self, context: SessionContext) -> _SessionLinks:
        return self.links.setdefault(context.session_id, _SessionLinks())

    def request(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.response is not None or state.get("local") or state.get("blocked"):
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        info = rest.decode_request(flow.request.method, flow.request.pretty_url,
                                   dict(flow.request.headers), flow.request.raw_content or b"")
        state["request_info"] = info
        if info.api is None:
            return
        state["statement_id"] = self._statement_for(context, info, flow.request.query)

    def _statement_for(self, context: SessionContext, info: rest.RequestInfo,
                       query: http.MultiDictView[str, str]) -> str | None:
        links = self._links(context)
        job_key = (info.project, info.job_id) if info.job_id else None
        if job_key in links.jobs:
            return links.jobs[job_key]  # A poll, page, cancel or retry of a known job.
        if info.request_id and info.request_id in links.request_ids:
            return links.request_ids[info.request_id]
        table_key = (info.project, info.dataset_id, info.table_id)
        if info.api_method == "tabledata.list" and query.get("pageToken") \
                and table_key in links.table_reads:
            return links.table_reads[table_key]
        if not info.starts_statement:
            return None
        statement_id = context.next_statement_id()
        if job_key is not None:
            links.jobs[job_key] = statement_id
        if info.request_id:
            links.request_ids[info.request_id] = statement_id
        if info.api_method == "tabledata.list":
            links.table_reads[table_key] = statement_id
        return statement_id

    def response(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        info = state.get("request_info")
        if not isinstance(info, rest.RequestInfo) or info.api is None or flow.response is None:
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        result = rest.decode_response(info, flow.response.status_code,
                                      dict(flow.response.headers),
                                      flow.response.raw_content or b"")
        state["response_info"] = result
        statement_id = state.get("statement_id")
        if statement_id and result.job_id:
            # jobs.query and jobs.insert without a client job id learn the job id here.
            self._links(context).jobs.setdefault((result.project or info.project,
                                                  result.job_id), statement_id)
