"""What the agent cannot do, what happens to traffic that is not BigQuery, and teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from testbed.cloud import Cloud
from tests.e2e.conftest import (
    Appliance,
    leftovers,
    session_id_of,
    wait_for_no_leftovers,
    write_config,
)

pytestmark = pytest.mark.e2e


def write_script(appliance: Appliance, name: str, source: str) -> None:
    path = appliance.workspace / name
    path.write_text(textwrap.dedent(source))
    path.chmod(0o644)


def events(appliance: Appliance, session_id: str, kind: str) -> list[dict[str, object]]:
    return appliance.query(f"SELECT kind, host, server, method, path, status, api, detail "
                           f"FROM events WHERE session_id = '{session_id}' AND kind = '{kind}' "
                           "ORDER BY seq")


def test_agent_cannot_read_store(appliance: Appliance) -> None:
    appliance.run_agent("true")  # Creates the store.
    store = appliance.store
    result = appliance.run_agent(
        f"ls {store}; cat {store}/catalog.duckdb; ls {store}/journal; "
        f"echo x >> {store}/journal/forged.jsonl", check_exit=None)
    assert result.returncode != 0
    assert result.stderr.count("Permission denied") >= 4
    assert not (store / "journal" / "forged.jsonl").exists()
    assert oct(store.stat().st_mode & 0o777) == "0o700"


def test_direct_connection_elsewhere_fails(appliance: Appliance, cloud: Cloud) -> None:
    """TCP to an upstream address on another port reaches only the proxy, which refuses it
    with a readable 403; UDP gets no answer."""
    write_script(appliance, "probe.py", f"""
        import socket, subprocess, time
        started = time.monotonic()
        try:
            with socket.create_connection(("{cloud.echo_address}", {cloud.echo_plain_port}),
                                          timeout=5) as connection:
                connection.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                data = connection.recv(100)
            print("tcp-data", repr(data))
        except OSError as error:
            print("tcp-error", type(error).__name__)
        print("tcp-seconds", round(time.monotonic() - started, 1))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(2)
        udp.sendto(b"ping", ("{cloud.echo_address}", 53))
        try:
            print("udp-data", udp.recvfrom(100))
        except OSError as error:
            print("udp-error", type(error).__name__)
    """)
    result = appliance.run_agent("python probe.py")
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["tcp-data"].startswith("b'HTTP/1.1 403 Forbidden"), result.stdout
    assert float(lines["tcp-seconds"]) < 5
    assert lines["udp-error"] == "TimeoutError"
    blocked = events(appliance, session_id_of(result), "blocked")
    assert any(event["server"] == f"{cloud.echo_address}:{cloud.echo_plain_port}"
               for event in blocked), blocked


def test_other_host_recorded_as_generic(appliance: Appliance, cloud: Cloud) -> None:
    write_script(appliance, "other.py", f"""
        import socket
        import requests
        allowed = requests.get("https://example.test/some/path?x=1", timeout=10)
        print("allowed", allowed.status_code)
        try:
            socket.gethostbyname("blocked.test")
        except socket.gaierror:
            print("dns refused")
        # The session resolver refuses blocked.test, so the agent uses an address it knows.
        real_getaddrinfo = socket.getaddrinfo
        socket.getaddrinfo = lambda host, *rest, **named: real_getaddrinfo(
            "{cloud.echo_address}" if host == "blocked.test" else host, *rest, **named)
        blocked = requests.get("https://blocked.test/secret", timeout=10)
        print("blocked", blocked.status_code, blocked.json()["error"]["status"])
    """)
    result = appliance.run_agent("python other.py")
    assert "allowed 200" in result.stdout
    assert "dns refused" in result.stdout
    assert "blocked 403 PERMISSION_DENIED" in result.stdout
    session_id = session_id_of(result)
    requests_seen = [e for e in events(appliance, session_id, "request")
                     if e["host"] == "example.test"]
    assert len(requests_seen) == 1
    assert requests_seen[0]["api"] is None
    assert requests_seen[0]["method"] == "GET"
    assert requests_seen[0]["path"] == "/some/path?x=1"
    responses = [e for e in events(appliance, session_id, "response")
                 if e["host"] == "example.test"]
    assert [e["status"] for e in responses] == [200]
    blocked = [e for e in events(appliance, session_id, "blocked") if e["host"] == "blocked.test"]
    assert len(blocked) == 1
    assert "not in the allowlist" in str(blocked[0]["detail"])


def test_concurrent_sessions_attributed_separately(cloud: Cloud, appliance: Appliance,
                                                  shared_dirs: dict[str, Path]) -> None:
    agents = {name: {"project": cloud.project, "allow_hosts": ["bigquery.googleapis.com"]}
              for name in ("agent-a", "agent-b")}
    write_config(appliance.config_path, cloud, appliance.store, shared_dirs, agents)
    write_script(appliance, "marker.py", """
        import os, time
        from google.cloud import bigquery
        client = bigquery.Client()
        marker = os.environ["MARKER"]
        for number in range(5):
            client.query_and_wait(f"SELECT '{marker}' AS marker, {number} AS n")
            time.sleep(0.05)
    """)
    first = appliance.start_agent("python marker.py", "--agent", "agent-a", "--env", "MARKER=a")
    second = appliance.start_agent("python marker.py", "--agent", "agent-b", "--env", "MARKER=b")
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert first.returncode == 0, outputs[0][1]
    assert second.returncode == 0, outputs[1][1]
    rows = appliance.query("SELECT agent, sql FROM statements ORDER BY session_id, "
                           "statement_index")
    assert len(rows) == 10
    for row in rows:
        marker = str(row["agent"])[-1]
        assert f"SELECT '{marker}' AS marker" in str(row["sql"]), row
    sessions = appliance.query("SELECT agent, statements FROM sessions ORDER BY agent")
    assert sessions == [{"agent": "agent-a", "statements": 5},
                        {"agent": "agent-b", "statements": 5}]


@pytest.mark.parametrize("command, expected", [
    ("python -c 'import os; os.abort()'", 134),
    ("kill -KILL $$", 137),
    ("sleep 300 & exit 3", 3),
])
def test_teardown_after_agent_exit(appliance: Appliance, command: str, expected: int) -> None:
    result = appliance.run_agent(command, check_exit=expected)
    assert "completed" in result.stderr
    assert wait_for_no_leftovers() == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_teardown_after_interrupt(appliance: Appliance, signum: int) -> None:
    process = appliance.start_agent("(sleep 300 &) ; sleep 300")
    _wait_for(lambda: any(item.startswith("process ") and "sleep 300" in item
                          for item in leftovers()), "the agent to start")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signum
    assert "completed" in stderr
    assert wait_for_no_leftovers() == []


def test_kill9_recovered_at_next_start(appliance: Appliance) -> None:
    write_script(appliance, "slow.py", """
        import time
        from google.cloud import bigquery
        client = bigquery.Client()
        client.query_and_wait("SELECT 'before the crash' AS phase")
        print("queried", flush=True)
        time.sleep(300)
    """)
    process = appliance.start_agent("python slow.py")
    assert process.stdout is not None
    assert process.stdout.readline() == "queried\n"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    # The agent dies with the appliance; its namespace and rules stay until the next start.
    _wait_for(lambda: not any(i.startswith("process ") for i in leftovers()),
              "the agent to die with the appliance")
    journals = list((appliance.store / "journal").glob("*.jsonl"))
    assert len(journals) == 1
    session_id = journals[0].stem

    appliance.run_agent("true")
    assert not journals[0].exists()
    replay = appliance.replay(session_id)
    assert replay["session"]["status"] == "interrupted"
    assert [s["sql"] for s in replay["statements"]] == ["SELECT 'before the crash' AS phase"]
    assert replay["statements"][0]["outcome"] == "done"


def _wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
