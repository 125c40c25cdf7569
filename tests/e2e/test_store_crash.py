"""The store under crashes and a full disk, end to end: a real `appliance run` killed with
SIGKILL in the middle of concurrent requests, and a store on a small tmpfs that fills up while
the agent works. After each, `appliance sessions verify --all` must pass with only the public
key, and every request the agent saw answered must be in the recording."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.cloud import Cloud
from tests.e2e.conftest import Appliance, leftovers, write_config

pytestmark = pytest.mark.e2e


def write_script(appliance: Appliance, name: str, source: str) -> None:
    path = appliance.workspace / name
    path.write_text(textwrap.dedent(source))
    path.chmod(0o644)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def verify(appliance: Appliance, public_key: Path) -> dict[str, object]:
    result = appliance.cli("sessions", "verify", "--all", "--public-key", str(public_key),
                           "--json", check=False)
    assert result.returncode in (0, 7), result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def failures(report: dict[str, object]) -> list[str]:
    sessions = report["sessions"]
    assert isinstance(sessions, list)
    return [f["message"] for s in sessions for f in s["findings"] if f["severity"] == "failure"]


CONCURRENT_AGENT = """
    import sys, threading, time
    from google.cloud import bigquery
    client = bigquery.Client()
    lock = threading.Lock()

    def work(worker):
        for number in range(1000):
            marker = f"w{worker}-{number}"
            client.query_and_wait(f"SELECT '{marker}' AS marker")
            with lock:
                print(marker, flush=True)

    for worker in range(4):
        threading.Thread(target=work, args=(worker,), daemon=True).start()
    time.sleep(600)
"""


def test_kill9_keeps_acknowledged_events(appliance: Appliance, tmp_path: Path) -> None:
    write_script(appliance, "busy.py", CONCURRENT_AGENT)
    process = appliance.start_agent("python busy.py")
    assert process.stdout is not None
    acknowledged = [process.stdout.readline().strip() for _ in range(12)]
    assert all(acknowledged), process.stderr.read() if process.stderr else ""
    running = appliance.query("SELECT status FROM sessions")

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    # The agent may have seen more answers between the last line read and the kill.
    acknowledged += process.stdout.read().split()
    wait_for(lambda: not any(i.startswith("process ") for i in leftovers()),
             "the agent to die with the appliance")
    abandoned = appliance.query("SELECT session_id, status FROM sessions")
    public_key = tmp_path / "auditor.pub"
    appliance.run_agent("true")  # Sweeps the dead session's objects and recovers its journal.
    appliance.cli("store", "public-key", "--output", str(public_key))

    assert running == [{"status": "running"}]
    assert [row["status"] for row in abandoned] == ["abandoned"]
    session_id = str(abandoned[0]["session_id"])
    recorded = {str(row["sql"]).split("'")[1] for row in appliance.query(
        f"SELECT sql FROM statements WHERE session_id = '{session_id}' AND sql IS NOT NULL")}
    assert set(acknowledged) <= recorded
    assert appliance.replay(session_id)["session"]["status"] == "interrupted"
    report = verify(appliance, public_key)
    assert failures(report) == []
    assert report["ok"] is True


def test_kill9_recovery_event_signed(appliance: Appliance, tmp_path: Path) -> None:
    write_script(appliance, "busy.py", CONCURRENT_AGENT)
    process = appliance.start_agent("python busy.py")
    assert process.stdout is not None
    assert process.stdout.readline()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    wait_for(lambda: not any(i.startswith("process ") for i in leftovers()),
             "the agent to die with the appliance")

    appliance.run_agent("true")
    rows = appliance.query("SELECT e.session_id, e.hash, s.status FROM events e JOIN sessions s "
                           "USING (session_id) WHERE e.kind = 'session_recovered'")
    digests = [json.loads(line) for line in
               (appliance.store / "digests.jsonl").read_text().splitlines()]

    assert len(rows) == 1
    assert rows[0]["status"] == "interrupted"
    signed = [d for d in digests if d["session_id"] == rows[0]["session_id"]]
    assert [d["last_hash"] for d in signed] == [rows[0]["hash"]]
    assert [d["origin"] for d in signed] == ["recovery"]


# -- a full disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` on a fresh directory; unmount and remove it afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="store-tmpfs-"))
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(directory)], check=True, capture_output=True)
        mounted = True
        yield directory
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True,
                           capture_output=True)
        directory.rmdir()


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
    with open(filler, "ab", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0")
    return filler


# The journal's last page may still hold a few events after the disk is full, so the agent
# keeps listing datasets until one request is refused; the dataset it then creates must be
# refused too, since the journal refuses everything after its first failed write.
DISK_FULL_AGENT = """
    import os, time
    from google.api_core import exceptions
    from google.cloud import bigquery
    client = bigquery.Client()
    client.query_and_wait("SELECT 'before the disk filled' AS phase")
    print("first ok", flush=True)
    while not os.path.exists("go"):
        time.sleep(0.05)
    for attempt in range(200):
        try:
            list(client.list_datasets(retry=None, timeout=30))
        except exceptions.GoogleAPICallError as error:
            print(f"refused {error.code}: {error.message}", flush=True)
            break
    else:
        print("never refused", flush=True)
    try:
        client.create_dataset("disk_full_not_created", retry=None, timeout=30)
        print("created", flush=True)
    except exceptions.GoogleAPICallError as error:
        print(f"create refused {error.code}", flush=True)
"""


def test_disk_full_fails_closed(appliance: Appliance, cloud: Cloud,
                                shared_dirs: dict[str, Path], tmp_path: Path) -> None:
    write_script(appliance, "full.py", DISK_FULL_AGENT)
    with small_tmpfs("16m") as mount:
        appliance.store = mount / "store"
        write_config(appliance.config_path, cloud, appliance.store, shared_dirs)
        process = appliance.start_agent("python full.py")
        assert process.stdout is not None
        try:
            assert process.stdout.readline() == "first ok\n"
            filler = fill(mount)
            (appliance.workspace / "go").write_text("")
            answer = process.stdout.readline()
            created = process.stdout.readline()
            filler.unlink()
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        check = appliance.run_agent(
            "python -c \"from google.cloud import bigquery; "
            "print([d.dataset_id for d in bigquery.Client().list_datasets()])\"")
        public_key = tmp_path / "auditor.pub"
        appliance.cli("store", "public-key", "--output", str(public_key))
        report = verify(appliance, public_key)

    assert answer.startswith("refused 503:")
    assert "could not record this request, so it was not sent" in answer
    assert "No space left on device" in answer
    assert created == "create refused 503\n"
    assert "not forwarded because recording failed" in stderr
    assert "No space left on device" in stderr
    assert "disk_full_not_created" not in check.stdout
    assert failures(report) == []
