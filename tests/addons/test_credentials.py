"""Tests of credential substitution: the placeholder becomes a real token, nothing else passes.

The real tokens come from google-auth against the testbed's stub token services on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from appliance.addons.common import flow_state
from appliance.addons.credentials import CredentialSubstitution, bearer_kind, token_service
from appliance.addons.recorder import request_event
from appliance.config import AgentProfile, CredentialsConfig
from appliance.context import Registry, SessionContext, fingerprint
from appliance.credentials import TokenSource
from testbed import stub_servers
from tests.token_stubs import Stubs

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="credential files must be owned by root")

FOREIGN_TOKEN = "ya29.a0AfH6SMBforeign-token-the-agent-brought"


def _jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2lnbmF0dXJl"


SELF_SIGNED = _jwt({"iss": "leak@p.iam.gserviceaccount.com",
                    "sub": "leak@p.iam.gserviceaccount.com",
                    "aud": "https://bigquery.googleapis.com/"})


@pytest.fixture
def tokens(stubs: Stubs) -> TokenSource:
    profile = AgentProfile(name="analyst", credentials=CredentialsConfig(
        source="service_account_key", file=stubs.identities.service_account_key))
    return TokenSource.for_profile(profile, stubs.config())


@pytest.fixture
def live(context: SessionContext, tokens: TokenSource, stubs: Stubs) -> SessionContext:
    context.tokens = tokens
    context.principal = stubs.identities.runner
    return context


def _flow(context: SessionContext, host: str = "bigquery.googleapis.com",
          path: str = "/bigquery/v2/projects/proj/queries", method: str = "POST",
          headers: dict[str, str] | None = None, content: bytes = b"{}",
          approved: bool = True) -> http.HTTPFlow:
    request = tutils.treq(host=host, port=443, scheme=b"https", method=method.encode(),
                          path=path.encode(), content=content,
                          headers=http.Headers([(k.encode(), v.encode())
                                                for k, v in (headers or {}).items()]))
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = (context.agent_address, 40000)
    flow.client_conn.sni = host
    flow.server_conn.address = ("198.18.100.10", 443)
    if approved:
        flow_state(flow)["approved"] = True
    return flow


def _run(context: SessionContext, flow: http.HTTPFlow) -> CredentialSubstitution:
    registry = Registry()
    registry.add(context)
    addon = CredentialSubstitution(registry)
    asyncio.run(addon.requestheaders(flow))
    addon.request(flow)
    return addon


def _bearer(context: SessionContext) -> dict[str, str]:
    return {"Authorization": f"Bearer {context.placeholder_token}"}


def _secret(stubs: Stubs) -> bytes:
    return stubs.identities.token_secret.read_text().encode()


def test_placeholder_header_becomes_real_token(live: SessionContext, stubs: Stubs) -> None:
    flow = _flow(live, headers=_bearer(live))

    _run(live, flow)

    scheme, _, token = flow.request.headers["authorization"].partition(" ")
    claims = stub_servers.verify_hs256(_secret(stubs), token)
    assert scheme == "Bearer"
    assert claims is not None and claims["email"] == stubs.identities.runner
    assert flow.response is None
    assert flow_state(flow)["substituted"] == fingerprint(token)


def test_placeholder_query_parameter_becomes_real_token(live: SessionContext,
                                                        stubs: Stubs) -> None:
    flow = _flow(live, path=f"/bigquery/v2/projects/p/jobs?access_token="
                            f"{live.placeholder_token}", method="GET")

    _run(live, flow)

    assert stub_servers.verify_hs256(_secret(stubs), flow.request.query["access_token"])


def test_recorded_event_has_no_token(live: SessionContext) -> None:
    flow = _flow(live, headers=_bearer(live))
    _run(live, flow)
    token = flow.request.headers["authorization"].split()[1]

    event = json.dumps(request_event(flow))

    assert token not in event
    assert live.placeholder_token not in event


@pytest.mark.parametrize("header", ["x-allowed-locations", "x-goog-user-project",
                                    "x-goog-api-client", "x-goog-request-reason"])
def test_credential_feature_headers_pass_unchanged(live: SessionContext, header: str) -> None:
    flow = _flow(live, headers={**_bearer(live), header: "0xA30"})

    _run(live, flow)

    assert flow.request.headers[header] == "0xA30"


@pytest.mark.parametrize(("headers", "path", "kind"), [
    ({"Authorization": f"Bearer {FOREIGN_TOKEN}"}, "/", "OAuth access token"),
    ({"Authorization": f"Bearer {SELF_SIGNED}"}, "/", "self-signed service account JWT"),
    ({"Authorization": "Bearer ya29.appliance-placeholder.of-another-session"}, "/",
     "placeholder of another session"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "/", "basic authorization"),
    ({"x-goog-api-key": "AIzaSyForeignKey"}, "/", "API key"),
    ({}, "/?key=AIzaSyForeignKey", "API key"),
    ({}, f"/?access_token={FOREIGN_TOKEN}", "OAuth access token"),
], ids=["oauth-token", "self-signed-jwt", "other-placeholder", "basic", "api-key-header",
        "api-key-query", "token-query"])
def test_foreign_credential_refused_and_recorded(live: SessionContext, headers: dict[str, str],
                                                 path: str, kind: str) -> None:
    flow = _flow(live, path="/bigquery/v2/projects/p/jobs" + path, headers=headers,
                 method="GET")

    _run(live, flow)

    assert flow.response is not None and flow.response.status_code == 403
    error = json.loads(flow.response.text or "")["error"]
    assert error["status"] == "PERMISSION_DENIED"
    assert error["errors"][0]["reason"] == "foreignCredential"
    event = request_event(flow)
    assert event["kind"] == "blocked"
    reason = json.loads(event["detail"])["reason"]
    assert kind in reason
    assert "sha256:" in reason
    assert "allow_foreign_credentials" in reason


def test_foreign_credential_value_not_recorded(live: SessionContext) -> None:
    flow = _flow(live, headers={"Authorization": f"Bearer {FOREIGN_TOKEN}"})

    _run(live, flow)

    assert FOREIGN_TOKEN not in json.dumps(request_event(flow))


def test_placeholder_beside_foreign_key_refused(live: SessionContext) -> None:
    flow = _flow(live, headers={**_bearer(live), "x-goog-api-key": "AIzaSyForeignKey"})

    _run(live, flow)

    assert flow.response is not None and flow.response.status_code == 403
    assert flow.request.headers["authorization"] == f"Bearer {live.placeholder_token}"


@pytest.mark.parametrize(("host", "path", "body"), [
    ("oauth2.googleapis.com", "/token",
     b"grant_type=refresh_token&refresh_token=1//leaked&client_id=c&client_secret=s"),
    ("sts.googleapis.com", "/v1/token",
     (b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
      b"&subject_token=eyJleGZpbHRyYXRlZA")),
    ("iamcredentials.googleapis.com",
     "/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com:generateAccessToken",
     b'{"scope": ["https://www.googleapis.com/auth/cloud-platform"]}'),
    ("www.googleapis.com", "/oauth2/v4/token", b"grant_type=x&assertion=eyJhc3NlcnQ"),
], ids=["oauth2", "sts", "iamcredentials", "legacy-oauth2"])
def test_token_service_call_refused(live: SessionContext, host: str, path: str,
                                    body: bytes) -> None:
    flow = _flow(live, host=host, path=path, headers=_bearer(live), content=body)

    _run(live, flow)

    assert flow.response is not None and flow.response.status_code == 403
    assert json.loads(flow.response.text or "")["error"]["errors"][0]["reason"] == \
        "tokenServiceCall"
    reason = flow_state(flow)["blocked"]
    assert f"token service {host}" in reason
    assert b"leaked" not in json.dumps(request_event(flow)).encode()


def test_token_call_body_credential_fingerprinted(live: SessionContext) -> None:
    flow = _flow(live, host="oauth2.googleapis.com", path="/token",
                 content=b"grant_type=refresh_token&refresh_token=1//leaked")

    _run(live, flow)

    assert f"refresh_token {fingerprint('1//leaked')}" in flow_state(flow)["blocked"]
    assert "grant_type refresh_token" in flow_state(flow)["blocked"]


def test_allowed_locations_lookup_substituted(live: SessionContext, stubs: Stubs) -> None:
    flow = _flow(live, host="iamcredentials.googleapis.com", method="GET",
                 path="/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com/"
                      "allowedLocations", headers=_bearer(live))

    _run(live, flow)

    assert flow.response is None
    assert stub_servers.verify_hs256(_secret(stubs),
                                     flow.request.headers["authorization"].split()[1])


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {FOREIGN_TOKEN}"}, {}],
                         ids=["foreign-token", "token-call"])
def test_profile_may_allow_foreign_credentials(live: SessionContext,
                                               headers: dict[str, str]) -> None:
    live.profile = AgentProfile(name="open", allow_foreign_credentials=True)
    host = "bigquery.googleapis.com" if headers else "oauth2.googleapis.com"
    flow = _flow(live, host=host, path="/token" if not headers else "/", headers=headers)

    _run(live, flow)

    assert flow.response is None
    assert flow.request.headers.get("authorization") == headers.get("Authorization")


@pytest.mark.parametrize(("host", "approved"), [("example.test", True),
                                                ("bigquery.googleapis.com", False)],
                         ids=["other-host", "not-approved"])
def test_placeholder_left_alone(live: SessionContext, host: str, approved: bool) -> None:
    flow = _flow(live, host=host, headers=_bearer(live), approved=approved)

    _run(live, flow)

    assert flow.request.headers["authorization"] == f"Bearer {live.placeholder_token}"
    assert flow.response is None


def test_request_without_credential_passes(live: SessionContext) -> None:
    flow = _flow(live)

    _run(live, flow)

    assert flow.response is None
    assert "authorization" not in flow.request.headers


def test_mint_failure_fails_closed(context: SessionContext, stubs: Stubs) -> None:
    profile = AgentProfile(name="broken", credentials=CredentialsConfig(
        source="impersonate", file=stubs.identities.service_account_key,
        target_principal=stubs.identities.locked))
    context.tokens = TokenSource.for_profile(profile, stubs.config())
    flow = _flow(context, headers=_bearer(context))

    _run(context, flow)

    assert flow.response is not None and flow.response.status_code == 503
    assert "PERMISSION_DENIED" in flow_state(flow)["blocked"]
    assert flow.request.headers["authorization"] == f"Bearer {context.placeholder_token}"


def test_upstream_401_forces_new_token(live: SessionContext) -> None:
    flow = _flow(live, headers=_bearer(live))
    addon = _run(live, flow)
    first = flow.request.headers["authorization"]
    flow.response = http.Response.make(401, b"{}")
    addon.response(flow)

    second = _flow(live, headers=_bearer(live))
    _run(live, second)

    assert second.request.headers["authorization"] != first


def test_concurrent_flows_share_one_token(live: SessionContext) -> None:
    flows = [_flow(live, headers=_bearer(live)) for _ in range(10)]
    registry = Registry()
    registry.add(live)
    addon = CredentialSubstitution(registry)

    async def scenario() -> None:
        await asyncio.gather(*(addon.requestheaders(flow) for flow in flows))

    asyncio.run(scenario())

    assert len({flow.request.headers["authorization"] for flow in flows}) == 1
    assert live.tokens is not None and live.tokens.mints == 1


@pytest.mark.parametrize(("token", "kind"), [
    ("ya29.appliance-placeholder.mine", "placeholder"),
    ("ya29.appliance-placeholder.theirs", "placeholder of another session"),
    ("ya29.a0Af", "OAuth access token"),
    (SELF_SIGNED, "self-signed service account JWT"),
    (_jwt({"iss": "https://accounts.google.com", "sub": "123"}), "JWT"),
    ("opaque", "bearer token"),
])
def test_bearer_kinds(token: str, kind: str) -> None:
    assert bearer_kind(token, "ya29.appliance-placeholder.mine") == kind


@pytest.mark.parametrize(("host", "path", "service"), [
    ("oauth2.googleapis.com", "/tokeninfo?access_token=x", True),
    ("sts.googleapis.com", "/v1/token", True),
    ("iamcredentials.googleapis.com", "/v1/projects/-/serviceAccounts/a:signJwt", True),
    ("iamcredentials.googleapis.com", "/v1/projects/-/serviceAccounts/a/allowedLocations",
     False),
    ("accounts.google.com", "/o/oauth2/token", True),
    ("www.googleapis.com", "/bigquery/v2/projects/p/jobs", False),
    ("bigquery.googleapis.com", "/bigquery/v2/projects/p/jobs", False),
])
def test_token_service_recognised(host: str, path: str, service: bool) -> None:
    assert (token_service(host, path) is not None) is service
