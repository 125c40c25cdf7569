"""Tests for finding the process that owns a connection, with real processes and sockets.

The test process takes the sandbox's place. Its child `sh` acts as the sandbox's init, and the
shell's children act as the agent's processes. They connect to a listener on 127.0.0.1 that this
test owns, so nothing leaves the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import processes

CLIENT = textwrap.dedent("""
    import socket, sys, time
    connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print(connection.getsockname()[1], flush=True)
    time.sleep(60)
""")
PARENT = textwrap.dedent("""
    import subprocess, sys
    subprocess.run([sys.executable, sys.argv[1], sys.argv[2]])
""")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def agent(listener: socket.socket,
          tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start an `sh` (the init) running a Python parent whose child owns the connection."""
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "agent_marker.py").write_text(PARENT)
    command = (f"{sys.executable} {tmp_path / 'agent_marker.py'} {tmp_path / 'client.py'} "
               f"{listener.getsockname()[1]}; true")
    tree = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert tree.stdout is not None
        yield tree, int(tree.stdout.readline())
    finally:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()


def test_owner_found_by_port(agent: tuple[subprocess.Popen[str], int]) -> None:
    _, port = agent

    found = processes.owner(os.getpid(), "127.0.0.1", port)

    assert "client.py" in found["cmdline"]
    assert found["executable"] == os.path.realpath(sys.executable)


def test_owner_chain_reaches_agent_command(agent: tuple[subprocess.Popen[str], int]) -> None:
    _, port = agent

    found = processes.owner(os.getpid(), "127.0.0.1", port)

    assert any("agent_marker.py" in parent["cmdline"] for parent in found["chain"])


def test_unknown_port_reports_error(agent: tuple[subprocess.Popen[str], int]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free_port = unused.getsockname()[1]

    found = processes.owner(os.getpid(), "127.0.0.1", free_port)

    assert found == {"error": f"no socket 127.0.0.1:{free_port} in the session "
                              "(closed already)"}


def test_descendants_parents_first(agent: tuple[subprocess.Popen[str], int]) -> None:
    tree, _ = agent

    found = processes.descendants(os.getpid())

    assert found[0] == tree.pid


@pytest.mark.parametrize("address, family, expected", [
    ("127.0.0.1", socket.AF_INET, "0100007F"),
    ("198.18.0.2", socket.AF_INET, "020012C6"),
    ("198.18.0.2", socket.AF_INET6, "0000000000000000FFFF0000020012C6"),
])
def testproc_address_format(address: str, family: int, expected: str) -> None:
    if sys.byteorder != "little":
        pytest.skip("the expected strings are for little-endian hosts")
    assert processes.proc_address(address, family) == expected
