"""Checks of the testbed's certificates and stub servers on loopback (no root needed)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("pyroute2")

from testbed import stub_servers
from testbed.cloud import make_certificates

ROOT = Path(__file__).resolve().parents[2]
ECHO, TOKEN = "127.0.0.1", "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((ECHO, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(
        tmp_path_factory.mktemp("tls"), ["oauth2.googleapis.com", "example.test"], [ECHO, TOKEN]
    )


@pytest.fixture(scope="module")
def stubs(tls_files: tuple[Path, Path, Path]) -> Iterator[tuple[int, int]]:
    _, cert, key = tls_files
    tls_port, plain_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "testbed" / "stub_servers.py"), "--cert", str(cert),
         "--key", str(key), "--echo-address", ECHO, "--echo-plain-port", str(plain_port),
         "--token-address", TOKEN, "--tls-port", str(tls_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == "stubs ready", process.stderr.read() if process.stderr else ""
        yield tls_port, plain_port
    finally:
        process.terminate()
        process.wait(10)


def _open(ca: Path, url: str, host: str, data: bytes | None = None) -> dict:
    context = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(url, data=data, headers={"Host": host})
    with opener.open(request, timeout=10) as response:
        return json.load(response)


def _handshake(ca: Path, port: int, server_hostname: str) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        socket.create_connection((ECHO, port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname),
    ):
        pass


def test_server_certificate_verifies_strictly_for_its_names_only(
    tls_files: tuple[Path, Path, Path], stubs: tuple[int, int]
) -> None:
    ca, _, _ = tls_files
    tls_port, _ = stubs
    _handshake(ca, tls_port, "oauth2.googleapis.com")
    _handshake(ca, tls_port, ECHO)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca, tls_port, "other.test")
    assert (ca.parent / "ca-key.pem").stat().st_mode & 0o077 == 0


def test_echo_server_answers_over_tls_and_plain_http(
    tls_files: tuple[Path, Path, Path], stubs: tuple[int, int]
) -> None:
    ca = tls_files[0]
    tls_port, plain_port = stubs
    echoed = _open(ca, f"https://{ECHO}:{tls_port}/a/b", "example.test")
    assert echoed["tls"] is True
    assert echoed["path"] == "/a/b"
    assert echoed["service"] == "echo"
    plain = _open(ca, f"http://{ECHO}:{plain_port}/c", "example.test", data=b"12345")
    assert plain["tls"] is False
    assert plain["method"] == "POST"
    assert plain["body_bytes"] == 5


def test_token_endpoint_names_service_account(
    tls_files: tuple[Path, Path, Path], stubs: tuple[int, int]
) -> None:
    ca = tls_files[0]
    tls_port, _ = stubs
    email = "agent@demo-project.iam.gserviceaccount.com"
    assertion = stub_servers.mint_token(email, iss=email)
    form = urllib.parse.urlencode(
        {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    ).encode()
    answer = _open(ca, f"https://{TOKEN}:{tls_port}/token", "oauth2.googleapis.com", data=form)
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] > 0
    claims = stub_servers.jwt_claims(answer["access_token"])
    assert claims["email"] == email
    assert claims["exp"] > time.time()


def test_generate_access_token_names_account(
    tls_files: tuple[Path, Path, Path], stubs: tuple[int, int]
) -> None:
    ca = tls_files[0]
    tls_port, _ = stubs
    email = "bot@demo-project.iam.gserviceaccount.com"
    answer = _open(
        ca,
        f"https://{TOKEN}:{tls_port}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
        "iamcredentials.googleapis.com",
        data=b"{}",
    )
    assert stub_servers.jwt_claims(answer["accessToken"])["email"] == email
    assert answer["expireTime"].endswith("Z")


def test_unknown_grant_type_is_rejected(
    tls_files: tuple[Path, Path, Path], stubs: tuple[int, int]
) -> None:
    ca = tls_files[0]
    tls_port, _ = stubs
    with pytest.raises(urllib.error.HTTPError) as raised:
        _open(
            ca, f"https://{TOKEN}:{tls_port}/token", "oauth2.googleapis.com", data=b"grant_type=x"
        )
    assert raised.value.code == 400
    assert "'x'" in json.load(raised.value)["error_description"]
