"""`appliance serve`: runs handed to the shared service, and runs without it.

Each test starts its own service on the test's configuration, so the service's socket exists
only during that test; every other e2e test runs sessions in-process.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import REPO, Appliance, session_id_of

pytestmark = pytest.mark.e2e

DEADLINE_SECONDS = 120


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def service(appliance: Appliance, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    runtime = Path(yaml.safe_load(appliance.config_path.read_text())["runtime_dir"])
    socket_path = runtime / "serve.sock"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(appliance.command("--log-level", "info", "serve"),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: socket_path.is_socket() or process.poll() is not None,
                 "the service socket")
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=DEADLINE_SECONDS)
        log.close()


def appliance_pid(appliance: Appliance, session_id: str) -> int:
    rows = appliance.query("SELECT json_extract_string(detail, '$.appliance_pid') AS pid "
                           f"FROM events WHERE session_id = '{session_id}' "
                           "AND kind = 'session_start'")
    return int(str(rows[0]["pid"]))


def copy_example(appliance: Appliance) -> None:
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")


def test_run_through_service_records_session(appliance: Appliance,
                                             service: subprocess.Popen[bytes]) -> None:
    copy_example(appliance)

    result = appliance.run_agent("python agent.py", "--env", "AGENT_DATASET=served")
    session_id = session_id_of(result)

    assert "updated rows: 2" in result.stdout
    assert f"session {session_id} completed: 7 statements" in result.stderr
    assert appliance_pid(appliance, session_id) == service.pid
    assert len(appliance.replay(session_id)["statements"]) == 7


def test_concurrent_runs_share_service(appliance: Appliance,
                                       service: subprocess.Popen[bytes]) -> None:
    copy_example(appliance)

    runs = [appliance.start_agent("python agent.py", "--env", f"AGENT_DATASET=shared_{n}")
            for n in range(2)]
    outputs = [run.communicate(timeout=DEADLINE_SECONDS) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    sessions = [session_id_of(subprocess.CompletedProcess([], 0, out, err))
                for out, err in outputs]
    assert len(set(sessions)) == 2
    assert [appliance_pid(appliance, s) for s in sessions] == [service.pid, service.pid]


def test_no_service_runs_in_process(appliance: Appliance,
                                    service: subprocess.Popen[bytes]) -> None:
    result = appliance.run_agent("true", "--no-service")

    assert appliance_pid(appliance, session_id_of(result)) != service.pid


def _start_looping_agent(appliance: Appliance, trap: str) -> tuple[subprocess.Popen[str], Path]:
    """Start an agent that marks the workspace once it runs, then loops until signalled."""
    appliance.workspace.chmod(0o777)  # The agent user writes its marker there.
    marker = appliance.workspace / "running"
    client = appliance.start_agent(f"{trap} touch {marker}; while :; do sleep 0.1; done")
    wait_for(lambda: marker.exists() or client.poll() is not None, "the agent to start")
    return client, marker


def test_interrupt_reaches_agent_through_service(appliance: Appliance,
                                                 service: subprocess.Popen[bytes]) -> None:
    client, _ = _start_looping_agent(appliance, "trap 'exit 42' INT;")

    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=DEADLINE_SECONDS)

    assert client.returncode == 42
    session_id = session_id_of(subprocess.CompletedProcess([], 42, "", stderr))
    assert appliance.replay(session_id)["session"]["exit_code"] == 42


def test_vanished_client_ends_session(appliance: Appliance,
                                      service: subprocess.Popen[bytes]) -> None:
    client, _ = _start_looping_agent(appliance, "")

    client.kill()
    client.wait(timeout=DEADLINE_SECONDS)

    def sealed() -> bool:
        rows = json.loads(appliance.cli("sessions", "list", "--json").stdout)
        return bool(rows) and rows[-1]["status"] == "completed"

    wait_for(sealed, "the service to end the session")
    assert service.poll() is None


def test_stopped_service_leaves_local_runs(appliance: Appliance,
                                           service: subprocess.Popen[bytes]) -> None:
    runtime = Path(yaml.safe_load(appliance.config_path.read_text())["runtime_dir"])

    service.send_signal(signal.SIGTERM)
    code = service.wait(timeout=DEADLINE_SECONDS)
    result = appliance.run_agent("true")

    assert code == 0
    assert not (runtime / "serve.sock").exists()
    assert appliance_pid(appliance, session_id_of(result)) != service.pid
