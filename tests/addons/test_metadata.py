"""Tests for the GCE metadata emulator: the paths google-auth reads, and the header it requires."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from appliance.addons.common import flow_state
from appliance.addons.metadata import (
    DEFAULT_SCOPES,
    METADATA_ADDRESS,
    PLACEHOLDER_LIFETIME_SECONDS,
    MetadataEmulator,
    is_metadata_flow,
)
from appliance.context import Registry, SessionContext

FLAVOR = (b"Metadata-Flavor", b"Google")
ACCOUNT_PATH = "/computeMetadata/v1/instance/service-accounts/default"


def metadata_flow(context: SessionContext, path: str, headers: tuple[tuple[bytes, bytes], ...]
                  = (FLAVOR,), host: str = METADATA_ADDRESS, port: int = 80,
                  scheme: bytes = b"http") -> http.HTTPFlow:
    request = tutils.treq(host=host, port=port, scheme=scheme, path=path.encode(),
                          headers=http.Headers(headers), content=b"")
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = (context.agent_address, 40000)
    flow.server_conn.address = (METADATA_ADDRESS, port)
    return flow


def answer(registry: Registry, flow: http.HTTPFlow) -> http.Response:
    """Run the emulator's hooks on `flow` in the order mitmproxy calls them."""
    emulator = MetadataEmulator(registry)
    emulator.requestheaders(flow)
    emulator.request(flow)
    assert flow.response is not None
    return flow.response


def test_root_answers_with_flavor(context: SessionContext, registry: Registry) -> None:
    response = answer(registry, metadata_flow(context, "/"))

    assert response.status_code == 200
    assert response.headers["Metadata-Flavor"] == "Google"
    assert response.text == "computeMetadata/\n"


def test_flow_marked_local(context: SessionContext, registry: Registry) -> None:
    flow = metadata_flow(context, "/")

    answer(registry, flow)

    assert flow_state(flow)["local"] == "metadata"


@pytest.mark.parametrize("headers", [
    pytest.param((), id="no-header"),
    pytest.param(((b"Metadata-Flavor", b"Other"),), id="wrong-value"),
    pytest.param(((b"X-Google-Metadata-Request", b"True"),), id="legacy-header"),
])
def test_missing_flavor_forbidden(context: SessionContext, registry: Registry,
                                  headers: tuple[tuple[bytes, bytes], ...]) -> None:
    response = answer(registry, metadata_flow(context, ACCOUNT_PATH + "/token", headers))

    assert response.status_code == 403
    assert "Metadata-Flavor" in (response.text or "")
    assert context.placeholder_token not in (response.text or "")


def test_token_is_session_placeholder(context: SessionContext, registry: Registry) -> None:
    response = answer(registry, metadata_flow(context, ACCOUNT_PATH + "/token"))
    token = json.loads(response.text or "")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert token["access_token"] == context.placeholder_token
    assert token["token_type"] == "Bearer"
    assert 0 < token["expires_in"] <= PLACEHOLDER_LIFETIME_SECONDS


def test_token_by_principal_alias(context: SessionContext, registry: Registry) -> None:
    path = f"/computeMetadata/v1/instance/service-accounts/{context.profile.principal}/token"

    token = json.loads(answer(registry, metadata_flow(context, path)).text or "")

    assert token["access_token"] == context.placeholder_token


@pytest.mark.parametrize("path", [ACCOUNT_PATH + "/?recursive=true",
                                  ACCOUNT_PATH + "?recursive=true"])
def test_recursive_service_account_json(context: SessionContext, registry: Registry,
                                        path: str) -> None:
    response = answer(registry, metadata_flow(context, path))

    assert response.status_code == 200
    assert json.loads(response.text or "") == {
        "aliases": ["default"],
        "email": context.profile.principal,
        "scopes": list(DEFAULT_SCOPES),
    }


@pytest.mark.parametrize(("path", "status", "body"), [
    ("/computeMetadata/", 200, "v1/\n"),
    ("/computeMetadata/v1/project/project-id", 200, "proj"),
    (ACCOUNT_PATH + "/email", 200, "agent-analyst@proj.iam.gserviceaccount.com"),
    (ACCOUNT_PATH + "/scopes", 200, "\n".join(DEFAULT_SCOPES) + "\n"),
    (ACCOUNT_PATH + "/", 200, "aliases\nemail\nscopes\ntoken\n"),
    ("/computeMetadata/v1/project", 200, "numeric-project-id\nproject-id\n"),
    ("/computeMetadata/v1/instance", 200, "service-accounts/\n"),
    ("/computeMetadata/v1/instance/", 200, "service-accounts/\n"),
    ("/computeMetadata/v1/universe/universe-domain", 200, "googleapis.com"),
    (ACCOUNT_PATH + "/identity?audience=https://example.test", 404,
     "ID tokens are not issued inside a recorded session.\n"),
    ("/computeMetadata/v1/instance/service-accounts/",
     200, "default/\nagent-analyst@proj.iam.gserviceaccount.com/\n"),
    ("/computeMetadata/v1/project/numeric-project-id", 404, "Not found\n"),
    ("/computeMetadata/v1/instance/zone", 404, "Not found\n"),
    ("/other", 404, "Not found\n"),
])
def test_metadata_paths(context: SessionContext, registry: Registry, path: str, status: int,
                        body: str) -> None:
    response = answer(registry, metadata_flow(context, path))

    assert response.status_code == status
    assert response.text == body


def test_port_other_than_80(context: SessionContext, registry: Registry) -> None:
    response = answer(registry, metadata_flow(context, ACCOUNT_PATH + "/token", port=443,
                                              scheme=b"https"))

    assert response.status_code == 404
    assert context.placeholder_token not in (response.text or "")


@pytest.mark.parametrize("host", ["metadata.google.internal", "metadata.google.internal.",
                                  "metadata", METADATA_ADDRESS])
def test_metadata_host_names(context: SessionContext, host: str) -> None:
    flow = metadata_flow(context, "/", host=host)
    flow.server_conn.address = ("198.18.100.10", 80)

    assert is_metadata_flow(flow)


def test_other_host_not_metadata(context: SessionContext, registry: Registry) -> None:
    flow = metadata_flow(context, "/", host="bigquery.googleapis.com")
    flow.server_conn.address = ("198.18.100.10", 80)
    emulator = MetadataEmulator(registry)

    emulator.requestheaders(flow)
    emulator.request(flow)

    assert flow.response is None
    assert "local" not in flow_state(flow)


def test_unknown_client_gets_nothing(context: SessionContext, registry: Registry) -> None:
    flow = metadata_flow(context, ACCOUNT_PATH + "/token")
    flow.client_conn.peername = ("198.18.55.55", 40000)
    emulator = MetadataEmulator(registry)

    emulator.requestheaders(flow)
    emulator.request(flow)

    assert flow.response is None


def test_forwarded_request_forbidden(context: SessionContext, registry: Registry) -> None:
    flow = metadata_flow(context, ACCOUNT_PATH + "/token",
                         (FLAVOR, (b"X-Forwarded-For", b"10.0.0.1")))

    response = answer(registry, flow)

    assert response.status_code == 403
    assert context.placeholder_token not in (response.text or "")


def test_numeric_project_id_from_profile(context: SessionContext, registry: Registry) -> None:
    context.profile = dataclasses.replace(context.profile, project_number="123456789012")

    response = answer(registry, metadata_flow(context,
                                              "/computeMetadata/v1/project/numeric-project-id"))

    assert (response.status_code, response.text) == (200, "123456789012")


@pytest.mark.parametrize(("principal", "email"), [
    ("minted@proj.iam.gserviceaccount.com", "minted@proj.iam.gserviceaccount.com"),
    (("principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/"
      "subject/s"), "agent-analyst@proj.iam.gserviceaccount.com"),
], ids=["service-account", "federated"])
def test_email_is_token_principal(context: SessionContext, registry: Registry, principal: str,
                                  email: str) -> None:
    context.principal = principal

    response = answer(registry, metadata_flow(context, ACCOUNT_PATH + "/email"))

    assert response.text == email


def test_email_default_without_any_principal(context: SessionContext,
                                             registry: Registry) -> None:
    context.profile = dataclasses.replace(context.profile, principal=None)

    response = answer(registry, metadata_flow(context, ACCOUNT_PATH + "/email"))

    assert response.text == "default"
