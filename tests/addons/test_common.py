"""Tests for the helpers the addons share: credential redaction and session lookup."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from appliance.addons.common import credential_of, redacted_path, session_of
from appliance.context import Registry, SessionContext, fingerprint

SECRET = "ya29.c0-very-secret-token"


@pytest.mark.parametrize("name", ["access_token", "key", "Key", "oauth_token", "token"])
def test_redacted_path_fingerprints_secret(name: str) -> None:
    redacted = redacted_path(f"/bigquery/v2/projects/p/jobs?maxResults=5&{name}={SECRET}")

    query = parse_qs(urlsplit(redacted).query)
    assert SECRET not in redacted
    assert query[name] == [fingerprint(SECRET)]
    assert query["maxResults"] == ["5"]
    assert urlsplit(redacted).path == "/bigquery/v2/projects/p/jobs"


def test_redacted_path_every_repeated_secret() -> None:
    redacted = redacted_path(f"/x?key={SECRET}&key=other-secret")

    assert parse_qs(urlsplit(redacted).query)["key"] == [fingerprint(SECRET),
                                                        fingerprint("other-secret")]


def test_redacted_path_percent_encoded_secret() -> None:
    redacted = redacted_path("/x?access_token=ya29%2Eabc%2Fdef")

    assert "abc" not in redacted
    assert parse_qs(urlsplit(redacted).query)["access_token"] == [fingerprint("ya29.abc/def")]


@pytest.mark.parametrize("path", [
    "/bigquery/v2/projects/p/queries",
    "/bigquery/v2/projects/p/jobs?maxResults=5&pageToken=a%2Fb",
    "/x?keys=1&tokens=2",
])
def test_redacted_path_leaves_other_paths(path: str) -> None:
    assert redacted_path(path) == path


def request_with(headers: list[tuple[bytes, bytes]], path: bytes = b"/x") -> http.Request:
    return tutils.treq(path=path, headers=http.Headers(headers))


@pytest.mark.parametrize(("headers", "path", "expected"), [
    pytest.param([(b"authorization", f"Bearer {SECRET}".encode())], b"/x",
                 f"bearer:{fingerprint(SECRET)}", id="bearer"),
    pytest.param([(b"Authorization", f"Basic {SECRET}".encode())], b"/x",
                 f"basic:{fingerprint(SECRET)}", id="basic"),
    pytest.param([(b"x-goog-api-key", SECRET.encode())], b"/x",
                 f"api-key:{fingerprint(SECRET)}", id="api-key-header"),
    pytest.param([], f"/x?key={SECRET}".encode(), f"api-key:{fingerprint(SECRET)}",
                 id="api-key-query"),
    pytest.param([], b"/x", None, id="none"),
])
def test_credential_of_kinds(headers: list[tuple[bytes, bytes]], path: bytes,
                             expected: str | None) -> None:
    assert credential_of(request_with(headers, path)) == expected


@pytest.mark.parametrize("authorization", [
    f"Bearer {SECRET}",
    f"bearer   {SECRET}  ",
    f"OAuth {SECRET}",
])
def test_credential_of_hides_secret(authorization: str) -> None:
    credential = credential_of(request_with([(b"authorization", authorization.encode())]))

    assert credential is not None
    assert SECRET.lower() not in credential.lower()


def test_credential_of_schemeless_header() -> None:
    credential = credential_of(request_with([(b"authorization", SECRET.encode())]))

    assert credential is not None
    assert SECRET.lower() not in credential.lower()


def test_session_of_uses_peer_address(context: SessionContext, registry: Registry) -> None:
    flow = tflow.tflow()
    flow.client_conn.peername = (context.agent_address, 51000)

    assert session_of(registry, flow.client_conn) is context


@pytest.mark.parametrize("peer", [("198.18.0.6", 51000), None])
def test_session_of_unknown_peer(registry: Registry, peer: tuple[str, int] | None) -> None:
    flow = tflow.tflow()
    flow.client_conn.peername = peer  # type: ignore[assignment]

    assert session_of(registry, flow.client_conn) is None


def test_session_of_mapped_ipv6_peer(context: SessionContext, registry: Registry) -> None:
    flow = tflow.tflow()
    # An IPv6 socket reports a 4-tuple peer name.
    mapped = (f"::ffff:{context.agent_address}", 51000, 0, 0)
    flow.client_conn.peername = mapped  # type: ignore[assignment]

    assert session_of(registry, flow.client_conn) is context
