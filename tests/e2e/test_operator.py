"""What an operator runs around sessions, end to end: doctor against the testbed upstream,
`sessions show` and `sessions tail --follow` on real sessions, and the log lines of a run."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Appliance, session_id_of

pytestmark = pytest.mark.e2e

# Long enough for a slow CI machine; a test that needs it has failed anyway.
DEADLINE_SECONDS = 120


class JsonLines:
    """Reads the JSON lines a process prints, in a thread.

    A thread reads, because select() on a buffered pipe misses lines already in its buffer.
    """

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.stream.readline, ""):
            self.lines.put(line)
        self.lines.put("")

    def until(self, done: str) -> list[dict[str, object]]:
        """Return the records up to one of kind `done`, the end of output, or the deadline."""
        records: list[dict[str, object]] = []
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if not line:
                break
            records.append(json.loads(line))
            if records[-1]["kind"] == done:
                break
        return records


def copy_example(appliance: Appliance) -> None:
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")


def test_doctor_passes_against_testbed(appliance: Appliance) -> None:
    appliance.cli("ca", "show")  # Creates the CA, as make install does.

    result = appliance.cli("doctor", "--json", check=False)
    checks = json.loads(result.stdout)["checks"]

    assert [c["name"] for c in checks if not c["ok"]] == []
    assert result.returncode == 0


def test_show_reports_real_session_intact(appliance: Appliance) -> None:
    copy_example(appliance)
    session_id = session_id_of(appliance.run_agent("python agent.py", "--env",
                                                   "AGENT_DATASET=operator_show"))

    document = json.loads(appliance.cli("sessions", "show", session_id, "--json").stdout)

    assert document["integrity"]["status"] == "intact"
    assert document["integrity"]["problems"] == []
    assert document["identity"]["unix_user"] == "appliance-agent"
    assert document["session"]["status"] == "completed"
    assert sum(document["counts"]["statements_by_outcome"].values()) == \
        document["session"]["statements"]


def test_tail_follow_prints_live_statements(appliance: Appliance) -> None:
    copy_example(appliance)
    appliance.store.mkdir(mode=0o700, exist_ok=True)
    tail = subprocess.Popen(appliance.command("sessions", "tail", "--follow", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        output = JsonLines(tail)
        run = appliance.run_agent("python agent.py", "--env", "AGENT_DATASET=operator_tail")
        records = output.until("session_end")
    finally:
        tail.send_signal(signal.SIGINT)
        _, stderr = tail.communicate(timeout=30)

    session_id = session_id_of(run)
    sql = [r["sql"] for r in records if r["kind"] == "request" and r.get("sql")]
    assert records[0]["kind"] == "session_start"
    assert records[-1]["kind"] == "session_end"
    assert {r["session_id"] for r in records} == {session_id}
    assert any("UPDATE" in str(statement) for statement in sql)
    assert tail.returncode == 0
    assert "stopped following" in stderr


def test_tail_follow_session_stops_at_end(appliance: Appliance) -> None:
    gate = appliance.workspace / "go"
    agent = appliance.start_agent(f"while [ ! -e {gate} ]; do sleep 0.1; done")
    tail: subprocess.Popen[str] | None = None
    try:
        assert agent.stderr is not None
        line = ""
        while not line.startswith("appliance: session "):
            line = agent.stderr.readline()
            assert line, "appliance run ended before announcing its session"
        session_id = line.split()[2]
        journal = appliance.store / "journal" / f"{session_id}.jsonl"
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not journal.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        tail = subprocess.Popen(appliance.command("sessions", "tail", session_id, "--follow",
                                                  "--json"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        output = JsonLines(tail)
        started = output.until("session_start")
        Path(gate).touch()
        agent.wait(timeout=DEADLINE_SECONDS)
        rest = output.until("session_end")
        tail.wait(timeout=30)
    finally:
        gate.touch()
        agent.wait(timeout=DEADLINE_SECONDS)
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait()

    assert started[-1]["session_id"] == session_id
    assert rest[-1]["kind"] == "session_end"
    assert rest[-1]["exit_code"] == 0
    assert tail.returncode == 0


def test_log_lines_carry_session_id(appliance: Appliance) -> None:
    copy_example(appliance)
    result = subprocess.run(
        appliance.command("--log-level", "debug", "run", "--agent-cmd", "python agent.py",
                          "--env", f"PATH={appliance.agent_path()}",
                          "--env", "AGENT_DATASET=operator_logs"),
        cwd=appliance.workspace, capture_output=True, text=True, timeout=DEADLINE_SECONDS,
        check=False)
    session_id = session_id_of(result)
    lines = [line for line in result.stderr.splitlines()
             if " appliance.session: " in line or " appliance.addons." in line]

    assert lines
    assert [line for line in lines if session_id not in line] == []
    assert "ya29." not in result.stderr
    assert " DEBUG pyroute2" not in result.stderr
