"""The testbed's stub Google token services on loopback, for tests that need real tokens.

Import the fixture into a test module (`from tests.token_stubs import stubs`). The stubs
listen on a free port of 127.0.0.2 with a certificate for the token host names.
`Stubs.config()` is an appliance configuration whose host overrides pin those names there.
Through it, google-auth and the appliance's own transport reach the stubs at their real names
over verified TLS.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from appliance.config import Config
from testbed import identities as identities_module
from testbed.cloud import make_certificates
from testbed.identities import Identities

ROOT = Path(__file__).resolve().parents[1]
ECHO, TOKEN = "127.0.0.1", "127.0.0.2"
TOKEN_HOSTS = ("oauth2.googleapis.com", "sts.googleapis.com", "iamcredentials.googleapis.com")


@dataclass(frozen=True)
class Stubs:
    ca: Path
    tls_port: int
    plain_port: int
    identities: Identities
    process: subprocess.Popen[str]
    # Lines the stubs printed after "stubs ready": one `issued sha256:...` per token.
    output: list[str] = field(default_factory=list)

    def config(self) -> Config:
        return Config(upstream_ca_file=self.ca,
                      hosts={host: f"{TOKEN}:{self.tls_port}" for host in TOKEN_HOSTS})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((ECHO, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    base = tmp_path_factory.mktemp("stubs")
    ca, cert, key = make_certificates(base / "tls", [*TOKEN_HOSTS, "example.test"], [ECHO, TOKEN])
    identities = identities_module.create(base / "identities", "demo-project")
    tls_port, plain_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "testbed" / "stub_servers.py"), "--cert", str(cert),
         "--key", str(key), "--echo-address", ECHO, "--echo-plain-port", str(plain_port),
         "--token-address", TOKEN, "--tls-port", str(tls_port),
         "--identities", str(identities.registry)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == "stubs ready", process.stderr.read() if process.stderr else ""
        running = Stubs(ca, tls_port, plain_port, identities, process)
        # Drained, so that a full pipe never stalls the stubs.
        for stream, sink in ((process.stdout, running.output), (process.stderr, [])):
            threading.Thread(target=_drain, args=(stream, sink), daemon=True).start()
        yield running
    finally:
        process.terminate()
        process.wait(10)


def _drain(stream: IO[str] | None, sink: list[str]) -> None:
    if stream is None:
        return
    for line in stream:
        sink.append(line.rstrip("\n"))
