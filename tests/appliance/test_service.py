"""The service's socket handling, without sessions (those are in tests/e2e/test_service.py)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import service
from appliance.config import Config
from appliance.errors import ProxyError


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(runtime_dir=tmp_path / "run")


def test_unavailable_without_socket(config: Config) -> None:
    assert not service.available(config)


def test_unavailable_with_stale_socket(config: Config) -> None:
    config.runtime_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(service.socket_path(config)))
    stale.close()

    assert not service.available(config)


def test_bound_socket_is_available_and_private(config: Config) -> None:
    server = service._bind(service.socket_path(config))
    try:
        assert service.available(config)
        assert stat.S_IMODE(service.socket_path(config).stat().st_mode) == 0o600
    finally:
        server.close()


def test_second_service_refused(config: Config) -> None:
    server = service._bind(service.socket_path(config))
    try:
        with pytest.raises(ProxyError, match="already listens"):
            service._bind(service.socket_path(config))
    finally:
        server.close()


def test_probe_connection_is_not_a_request(config: Config) -> None:
    server = service._bind(service.socket_path(config))
    try:
        assert service.available(config)
        connection, _ = server.accept()
        with connection:
            assert service._receive_request(connection) is None
    finally:
        server.close()


def test_request_carries_three_descriptors(config: Config) -> None:
    server = service._bind(service.socket_path(config))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(service.socket_path(config)))
        socket.send_fds(client, [b'{"op": "run"}\n'], [0, 1, 2])
        connection, _ = server.accept()
        with connection:
            received = service._receive_request(connection)
        assert received is not None
        request, fds = received
        for fd in fds:
            os.close(fd)
        assert request == {"op": "run"}
        assert len(fds) == 3
    finally:
        client.close()
        server.close()


def test_operator_of_sudo_user() -> None:
    # /proc/<pid>/environ shows the environment a process started with, so use a child. It
    # reports ready only after exec, since before exec the file still shows the parent's.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        env={**os.environ, "SUDO_USER": "alice"}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        assert service.operator_of(child.pid, os.getuid()) == "alice"
    finally:
        child.kill()
        child.wait()


def test_client_variables_match_session() -> None:
    from appliance.session import PASSED_THROUGH

    assert service.CLIENT_VARIABLES == PASSED_THROUGH
