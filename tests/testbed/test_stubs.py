"""Checks of the testbed's certificates and stub servers on loopback (no root needed).

The token services are exercised with google-auth itself, through each credential file format
the testbed issues, at the real host names (pinned to loopback by the appliance's own host
override adapter) over TLS.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("pyroute2")

import google.auth.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import identity_pool, impersonated_credentials
from google.auth.transport.requests import Request
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from appliance.credentials import outbound_session
from testbed import identities as identities_module
from testbed import stub_servers, token_verifier
from testbed.identities import Identities
from tests.token_stubs import ECHO, TOKEN, Stubs

CLOUD_PLATFORM = ["https://www.googleapis.com/auth/cloud-platform"]


@pytest.fixture(scope="module")
def tls_files(stubs: Stubs) -> tuple[Path, Path, Path]:
    return stubs.ca, stubs.ca.parent / "server.pem", stubs.ca.parent / "server-key.pem"


@pytest.fixture(scope="module")
def identities(stubs: Stubs) -> Identities:
    return stubs.identities


@pytest.fixture(scope="module")
def ports(stubs: Stubs) -> tuple[int, int]:
    return stubs.tls_port, stubs.plain_port


@pytest.fixture(scope="module")
def request_(stubs: Stubs) -> Request:
    """A google-auth transport that reaches the token host names on the loopback stubs."""
    return Request(session=outbound_session(stubs.config()))


def _open(ca: Path, url: str, host: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(url, data=data, headers={"Host": host, **(headers or {})})
    with opener.open(request, timeout=10) as response:
        return json.load(response)


def _error(ca: Path, url: str, host: str, data: bytes,
           headers: dict[str, str] | None = None) -> tuple[int, Any]:
    with pytest.raises(urllib.error.HTTPError) as raised:
        _open(ca, url, host, data, headers)
    return raised.value.code, json.load(raised.value)


def _handshake(ca: Path, port: int, server_hostname: str) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        socket.create_connection((ECHO, port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname),
    ):
        pass


def _secret(identities: Identities) -> bytes:
    return identities.token_secret.read_text().strip().encode()


def test_server_certificate_verifies_strictly_for_its_names_only(
    tls_files: tuple[Path, Path, Path], ports: tuple[int, int]
) -> None:
    ca, _, _ = tls_files
    tls_port, _ = ports
    _handshake(ca, tls_port, "oauth2.googleapis.com")
    _handshake(ca, tls_port, ECHO)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca, tls_port, "other.test")
    assert (ca.parent / "ca-key.pem").stat().st_mode & 0o077 == 0


def test_echo_server_answers_over_tls_and_plain_http(
    tls_files: tuple[Path, Path, Path], ports: tuple[int, int]
) -> None:
    ca = tls_files[0]
    tls_port, plain_port = ports
    echoed = _open(ca, f"https://{ECHO}:{tls_port}/a/b", "example.test")
    assert echoed["tls"] is True
    assert echoed["path"] == "/a/b"
    assert echoed["service"] == "echo"
    plain = _open(ca, f"http://{ECHO}:{plain_port}/c", "example.test", data=b"12345")
    assert plain["tls"] is False
    assert plain["method"] == "POST"
    assert plain["body_bytes"] == 5


def test_service_account_key_mints_signed_token(identities: Identities, request_: Request) -> None:
    credentials = service_account.Credentials.from_service_account_file(
        str(identities.service_account_key), scopes=CLOUD_PLATFORM)
    credentials.refresh(request_)
    claims = stub_servers.verify_hs256(_secret(identities), credentials.token)
    assert claims is not None
    assert claims["email"] == identities.runner
    assert claims["exp"] > time.time()


def test_assertion_signed_by_other_key_rejected(identities: Identities,
                                                 request_: Request) -> None:
    info = json.loads(identities.service_account_key.read_text())
    info["private_key"] = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    credentials = service_account.Credentials.from_service_account_info(info,
                                                                        scopes=CLOUD_PLATFORM)
    with pytest.raises(google.auth.exceptions.RefreshError, match="Invalid JWT Signature"):
        credentials.refresh(request_)


def test_refresh_token_grant_names_user(identities: Identities, request_: Request) -> None:
    credentials = user_credentials.Credentials.from_authorized_user_file(
        str(identities.authorized_user))
    credentials.refresh(request_)
    assert stub_servers.jwt_claims(credentials.token)["email"] == identities_module.USER_EMAIL


def test_wrong_client_secret_rejected(identities: Identities, request_: Request) -> None:
    info = json.loads(identities.authorized_user.read_text()) | {"client_secret": "wrong"}
    credentials = user_credentials.Credentials.from_authorized_user_info(info)
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_client"):
        credentials.refresh(request_)


@pytest.mark.parametrize(("source", "email_shown"), [("user", True), ("service_account", False)])
def test_tokeninfo_shows_email_only_with_email_scope(
        identities: Identities, request_: Request, tls_files: tuple[Path, Path, Path],
        ports: tuple[int, int], source: str, email_shown: bool) -> None:
    if source == "user":
        credentials: Any = user_credentials.Credentials.from_authorized_user_file(
            str(identities.authorized_user))
    else:
        credentials = service_account.Credentials.from_service_account_file(
            str(identities.service_account_key), scopes=CLOUD_PLATFORM)
    credentials.refresh(request_)
    info = _open(tls_files[0], f"https://{TOKEN}:{ports[0]}/tokeninfo", "oauth2.googleapis.com",
                 urllib.parse.urlencode({"access_token": credentials.token}).encode())
    assert ("email" in info) is email_shown


def test_sts_exchange_names_federated_principal(identities: Identities,
                                                request_: Request) -> None:
    credentials = identity_pool.Credentials.from_file(str(identities.external_account),
                                                     scopes=CLOUD_PLATFORM)
    credentials.refresh(request_)
    claims = stub_servers.jwt_claims(credentials.token)
    assert claims["sub"] == identities.workload_principal
    assert "email" not in claims


def test_federated_principal_impersonates_service_account(identities: Identities,
                                                          request_: Request) -> None:
    credentials = identity_pool.Credentials.from_file(
        str(identities.external_account_impersonating), scopes=CLOUD_PLATFORM)
    credentials.refresh(request_)
    assert stub_servers.jwt_claims(credentials.token)["email"] == identities.federated_agent


def test_sts_rejects_unknown_audience(identities: Identities, tls_files: tuple[Path, Path, Path],
                                      ports: tuple[int, int]) -> None:
    form = urllib.parse.urlencode({
        "grant_type": stub_servers.TOKEN_EXCHANGE, "audience": "//iam.googleapis.com/nope",
        "requested_token_type": stub_servers.ACCESS_TOKEN_TYPE, "scope": CLOUD_PLATFORM[0],
        "subject_token_type": stub_servers.SUBJECT_TOKEN_TYPES[0],
        "subject_token": identities.subject_token.read_text()}).encode()
    status, body = _error(tls_files[0], f"https://{TOKEN}:{ports[0]}/v1/token",
                          "sts.googleapis.com", form)
    assert status == 400
    assert body["error"] == "invalid_target"


def _impersonated(identities: Identities, target: str, delegates: list[str]) -> Any:
    source = service_account.Credentials.from_service_account_file(
        str(identities.service_account_key), scopes=CLOUD_PLATFORM)
    return impersonated_credentials.Credentials(
        source_credentials=source, target_principal=target, target_scopes=CLOUD_PLATFORM,
        delegates=[f"projects/-/serviceAccounts/{d}" for d in delegates])


def test_impersonation_through_delegate(identities: Identities, request_: Request) -> None:
    credentials = _impersonated(identities, identities.analyst, [identities.delegate])
    credentials.refresh(request_)
    claims = stub_servers.jwt_claims(credentials.token)
    assert claims["email"] == identities.analyst
    assert claims["delegates"] == [identities.delegate]


@pytest.mark.parametrize("delegates", [[], ["delegate"]], ids=["direct", "through-delegate"])
def test_impersonation_denied_without_token_creator(identities: Identities, request_: Request,
                                                    delegates: list[str]) -> None:
    chain = [identities.delegate for _ in delegates]
    credentials = _impersonated(identities, identities.locked, chain)
    with pytest.raises(google.auth.exceptions.RefreshError, match="IAM_PERMISSION_DENIED"):
        credentials.refresh(request_)


@pytest.mark.parametrize("authorization", [None, "Bearer ya29.appliance-placeholder.x.y"],
                         ids=["no-token", "placeholder"])
def test_generate_access_token_requires_caller_token(
        identities: Identities, tls_files: tuple[Path, Path, Path], ports: tuple[int, int],
        authorization: str | None) -> None:
    url = (f"https://{TOKEN}:{ports[0]}/v1/projects/-/serviceAccounts/"
           f"{identities.analyst}:generateAccessToken")
    status, body = _error(tls_files[0], url, "iamcredentials.googleapis.com",
                          json.dumps({"scope": CLOUD_PLATFORM}).encode(),
                          {"Authorization": authorization} if authorization else None)
    assert status == 401
    assert body["error"]["status"] == "UNAUTHENTICATED"


def test_short_lived_account_token_lives_five_seconds(identities: Identities,
                                                      request_: Request) -> None:
    credentials = service_account.Credentials.from_service_account_file(
        str(identities.short_lived_key), scopes=CLOUD_PLATFORM)
    credentials.refresh(request_)
    claims = stub_servers.jwt_claims(credentials.token)
    assert claims["exp"] - claims["iat"] == identities_module.SHORT_LIFETIME


def test_unknown_grant_type_is_rejected(
    tls_files: tuple[Path, Path, Path], ports: tuple[int, int]
) -> None:
    status, body = _error(tls_files[0], f"https://{TOKEN}:{ports[0]}/token",
                          "oauth2.googleapis.com", b"grant_type=x")
    assert status == 400
    assert body["error"] == "unsupported_grant_type"


def _tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature[:-2]}AA"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda secret: None, "no Authorization header"),
    (lambda secret: "Bearer ya29.appliance-placeholder.abc.def", "not a token"),
    (lambda secret: "Basic dXNlcjpwYXNz", "is not Bearer"),
    (lambda secret: "Bearer " + _tampered(stub_servers.sign_hs256(secret, {
        "token_use": "access", "exp": int(time.time()) + 60})), "bad signature"),
    (lambda secret: "Bearer " + stub_servers.sign_hs256(secret, {
        "token_use": "access", "exp": int(time.time()) - 1}), "expired"),
    (lambda secret: "Bearer " + stub_servers.sign_hs256(b"other secret", {
        "token_use": "access", "exp": int(time.time()) + 60}), "bad signature"),
], ids=["missing", "placeholder", "basic", "tampered", "expired", "other-signer"])
def test_upstream_token_check_refuses(identities: Identities, make: Any, reason: str) -> None:
    checker = token_verifier.TokenChecker(_secret(identities))

    _, problem = checker.problem(make(_secret(identities)))

    assert problem is not None and reason in problem


def test_upstream_token_check_accepts_issued_token(identities: Identities,
                                                   request_: Request) -> None:
    credentials = service_account.Credentials.from_service_account_file(
        str(identities.service_account_key), scopes=CLOUD_PLATFORM)
    credentials.refresh(request_)
    checker = token_verifier.TokenChecker(_secret(identities))

    assert checker.problem(f"Bearer {credentials.token}") == (
        stub_servers.fingerprint(credentials.token), None)
