"""Tests for the egress policy: SNI allowlist, Host/SNI agreement and destination address.

Every allowed host used here has an address in the session's `hosts`, so the policy never queries
a real resolver.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from appliance.addons.common import flow_state
from appliance.addons.egress import Egress
from appliance.context import Registry, SessionContext

BIGQUERY = "bigquery.googleapis.com"
BIGQUERY_ADDRESS = ("198.18.100.10", 443)

VERDICTS = [
    pytest.param(None, None, BIGQUERY_ADDRESS, "no TLS server name (SNI)", id="no-sni"),
    pytest.param("", None, BIGQUERY_ADDRESS, "no TLS server name (SNI)", id="empty-sni"),
    pytest.param("evil.example", None, ("198.18.100.10", 443),
                 "host 'evil.example' is not in the allowlist of agent profile 'analyst'",
                 id="sni-not-allowed"),
    pytest.param("googleapis.com", None, BIGQUERY_ADDRESS,
                 "host 'googleapis.com' is not in the allowlist", id="sni-parent-domain"),
    pytest.param(BIGQUERY, "evil.example", BIGQUERY_ADDRESS,
                 "HTTP Host 'evil.example' does not match TLS server name "
                 "'bigquery.googleapis.com'", id="host-differs-from-sni"),
    pytest.param(BIGQUERY, "oauth2.googleapis.com", BIGQUERY_ADDRESS,
                 "does not match TLS server name", id="host-other-allowed-host"),
    pytest.param(BIGQUERY, None, ("198.18.100.99", 443),
                 "destination 198.18.100.99 is not an address of 'bigquery.googleapis.com'",
                 id="destination-not-host-address"),
    pytest.param(BIGQUERY, None, ("198.18.100.11", 443),
                 "is not an address of", id="destination-other-allowed-host"),
    pytest.param(BIGQUERY, None, None, "no original destination address",
                 id="no-destination"),
    pytest.param(BIGQUERY, None, ("198.18.100.10", 8443),
                 "port 8443 is not allowed", id="allowed-host-other-port"),
    pytest.param(BIGQUERY, None, ("198.18.0.1", 443),
                 "destination 198.18.0.1:443 is the appliance itself", id="proxy-address"),
    pytest.param(BIGQUERY, None, ("198.18.0.1", 15001),
                 "is the appliance itself", id="proxy-port"),
    pytest.param(None, None, ("127.0.0.1", 443), "is the appliance itself", id="loopback"),
    pytest.param(BIGQUERY, None, BIGQUERY_ADDRESS, None, id="allowed-without-host"),
    pytest.param(BIGQUERY, BIGQUERY, BIGQUERY_ADDRESS, None, id="allowed-with-host"),
    pytest.param("BigQuery.GoogleAPIs.com.", "bigquery.googleapis.com.", BIGQUERY_ADDRESS,
                 None, id="allowed-case-and-dot"),
]


@pytest.mark.parametrize(("sni", "host_header", "destination", "expected"), VERDICTS)
def test_verdict_cases(context: SessionContext, registry: Registry, sni: str | None,
                       host_header: str | None, destination: tuple[str, int] | None,
                       expected: str | None) -> None:
    reason = asyncio.run(Egress(registry).verdict(context, sni, host_header, destination))

    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert expected in reason


def test_resolve_uses_session_hosts(context: SessionContext, registry: Registry) -> None:
    addresses = asyncio.run(Egress(registry).resolve(context, BIGQUERY))

    assert addresses == {"198.18.100.10"}


def https_flow(context: SessionContext, sni: str, host: str,
               destination: tuple[str, int]) -> http.HTTPFlow:
    request = tutils.treq(host=host, port=443, scheme=b"https", path=b"/bigquery/v2/projects",
                          headers=http.Headers(((b"host", host.encode()),)), content=b"")
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = (context.agent_address, 40000)
    flow.client_conn.sni = sni
    flow.server_conn.address = destination
    return flow


def test_requestheaders_blocks_with_403(context: SessionContext, registry: Registry) -> None:
    flow = https_flow(context, BIGQUERY, "evil.example", BIGQUERY_ADDRESS)

    asyncio.run(Egress(registry).requestheaders(flow))

    assert flow.response is not None
    assert flow.response.status_code == 403
    body = json.loads(flow.response.content or b"")
    assert body["error"]["status"] == "PERMISSION_DENIED"
    assert body["error"]["errors"][0]["reason"] == "egressBlocked"
    assert "does not match TLS server name" in flow_state(flow)["blocked"]


def test_requestheaders_approves_allowed(context: SessionContext, registry: Registry) -> None:
    flow = https_flow(context, BIGQUERY, f"{BIGQUERY}:443", BIGQUERY_ADDRESS)

    asyncio.run(Egress(registry).requestheaders(flow))

    assert flow.response is None
    assert flow_state(flow) == {"approved": True}


def test_authority_mismatch_blocked(context: SessionContext, registry: Registry) -> None:
    flow = https_flow(context, BIGQUERY, BIGQUERY, BIGQUERY_ADDRESS)
    flow.request.authority = "evil.example:443"

    asyncio.run(Egress(registry).requestheaders(flow))

    assert "request authority 'evil.example:443' does not match" in flow_state(flow)["blocked"]


def test_connect_refused_and_recorded(context: SessionContext, registry: Registry) -> None:
    flow = https_flow(context, BIGQUERY, BIGQUERY, BIGQUERY_ADDRESS)
    flow.request.method = "CONNECT"
    flow.request.authority = "evil.example:443"

    asyncio.run(Egress(registry).requestheaders(flow))

    assert flow.response is not None
    assert flow.response.status_code == 403
    assert "HTTP CONNECT to 'evil.example:443'" in flow_state(flow)["blocked"]
    assert context.journal.count == 1


def test_resolver_answers_accepted(context: SessionContext, registry: Registry) -> None:
    context.dns_answers[BIGQUERY] = {"198.18.100.30"}

    reason = asyncio.run(Egress(registry).verdict(context, BIGQUERY, None,
                                                  ("198.18.100.30", 443)))

    assert reason is None
