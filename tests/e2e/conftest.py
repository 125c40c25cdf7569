"""Fixtures for end-to-end tests: the testbed cloud, a store, and a way to run the CLI.

Every test gets its own store and configuration; the cloud and the appliance CA are shared by
the whole run. After each test, a check fails the test if any namespace, link, nftables table
or agent process of a session is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed.cloud import Cloud

REPO = Path(__file__).resolve().parents[2]
# Overridable so that several test runs on one machine use disjoint addresses.
CLOUD_SUBNET = os.environ.get("APPLIANCE_TEST_CLOUD_SUBNET", "198.19.64.0/24")
SESSION_POOL = os.environ.get("APPLIANCE_TEST_SESSION_POOL", "198.18.64.0/20")
AGENT_USER = "appliance-agent"


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value or not Path(value).exists():
        pytest.fail(f"{name} is unset or names a missing file ({value!r}); run the tests with "
                    "'make test', which builds the venvs and sets it.")
    return value


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    upstream_python = _required_env("APPLIANCE_UPSTREAM_PYTHON")
    # The upstream accepts only tokens the cloud's stub token services issued, so a request the
    # appliance forwarded with the agent's placeholder fails as it would at Google.
    with Cloud(tmp_path_factory.mktemp("cloud"), upstream_python, subnet=CLOUD_SUBNET,
               verify_tokens=True) as cloud:
        yield cloud


@pytest.fixture(scope="session")
def agent_python() -> str:
    return _required_env("APPLIANCE_AGENT_PYTHON")


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The CA directory and runtime directory, shared so concurrent sessions see each other.

    The runtime directory holds files the agent reads (CA bundle, hosts), so it lives outside
    pytest's private temporary directory.
    """
    runtime = Path(tempfile.mkdtemp(prefix="appliance-run-", dir="/tmp"))
    runtime.chmod(0o755)
    _RUNTIME_DIRS.append(runtime)
    yield {"ca": tmp_path_factory.mktemp("ca"), "run": runtime}
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A directory the agent user can read, holding the scripts a test runs as the agent."""
    path = Path(tempfile.mkdtemp(prefix="appliance-agent-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Appliance:
    """Runs the appliance CLI against one test store and configuration."""

    config_path: Path
    store: Path
    agent_python: str
    workspace: Path

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "appliance", *args, "--config", str(self.config_path)]

    def agent_path(self) -> str:
        return f"{Path(self.agent_python).parent}:/usr/local/bin:/usr/bin:/bin"

    def run_agent(self, agent_cmd: str, *extra: str, timeout: float = 180,
                  check_exit: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run `appliance run` with the agent venv on PATH and return the finished process."""
        result = subprocess.run(
            self.command("run", "--agent-cmd", agent_cmd, "--env", f"PATH={self.agent_path()}",
                         *extra),
            cwd=self.workspace, capture_output=True, text=True, timeout=timeout, check=False)
        if check_exit is not None:
            assert result.returncode == check_exit, \
                f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        return result

    def start_agent(self, agent_cmd: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command("run", "--agent-cmd", agent_cmd, "--env", f"PATH={self.agent_path()}",
                         *extra),
            cwd=self.workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                timeout=120, check=False)
        if check:
            assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr}"
        return result

    def query(self, sql: str) -> list[dict[str, object]]:
        return json.loads(self.cli("sessions", "query", sql, "--json").stdout)

    def replay(self, session_id: str) -> dict[str, object]:
        return json.loads(self.cli("sessions", "replay", session_id, "--json").stdout)


def session_id_of(result: subprocess.CompletedProcess[str]) -> str:
    for line in result.stderr.splitlines():
        if line.startswith("appliance: session ") and " starting " in line:
            return line.split()[2]
    raise AssertionError(f"no session id in stderr:\n{result.stderr}")


def write_config(path: Path, cloud: Cloud, store: Path, shared: dict[str, Path],
                 agents: dict[str, dict[str, object]] | None = None) -> None:
    allow = ["bigquery.googleapis.com", "bigquerystorage.googleapis.com", "www.googleapis.com",
             "example.test"]
    document = {
        # The signing key stays beside the test store, not in /etc/appliance.
        "store": {"path": str(store), "signing_key": str(store.parent / "signing-key.pem")},
        "runtime_dir": str(shared["run"]),
        "proxy": {"ca_dir": str(shared["ca"]), "upstream_ca_file": str(cloud.ca_file)},
        "network": {"pool": SESSION_POOL,
                    "hosts": {**cloud.hosts, "blocked.test": cloud.echo_address}},
        "agents": agents or {"default": {"project": cloud.project, "allow_hosts": allow}},
    }
    # A profile that names no credentials mints real tokens as the cloud's test service account.
    assert cloud.identities is not None
    runner = {"source": "service_account_key", "file": str(cloud.identities.service_account_key)}
    document["agents"] = {name: {"credentials": runner, **body}
                          for name, body in document["agents"].items()}
    if agents:
        document["default_agent"] = sorted(agents)[0]
    path.write_text(yaml.safe_dump(document))


@pytest.fixture
def appliance(cloud: Cloud, agent_python: str, shared_dirs: dict[str, Path],
              tmp_path: Path, workspace: Path) -> Appliance:
    config_path = tmp_path / "appliance.yaml"
    store = tmp_path / "store"
    write_config(config_path, cloud, store, shared_dirs)
    return Appliance(config_path, store, agent_python, workspace)


# Runtime directories of this test run. Only sessions leased there count as this run's, so
# concurrent runs on one machine (other developers, benchmarks) never see each other's sessions.
_RUNTIME_DIRS: list[Path] = []


def _own_tags() -> set[str]:
    tags = set()
    for runtime in _RUNTIME_DIRS:
        for lease in (runtime / "pool").glob("*.lock"):
            tag = lease.read_text(errors="replace").strip()
            if tag:
                tags.add(tag)
        sessions = runtime / "sessions"
        if sessions.is_dir():
            tags.update(path.name for path in sessions.iterdir())
    return tags


def _own_process(pid: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(f"HOME={runtime}/".encode() in environ for runtime in _RUNTIME_DIRS)


def leftovers() -> list[str]:
    """List this run's session namespaces, links, nftables tables and agent processes."""
    tags = _own_tags()

    def own(name: str) -> bool:
        return any(tag in name for tag in tags)

    found = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {line.split()[0]}" for line in namespaces.splitlines()
              if line.startswith("ap-") and own(line.split()[0])]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
              if line.split(":")[1].strip().startswith("ap-") and own(line.split(":")[1])]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"table {line}" for line in tables.splitlines()
              if "appliance_" in line and own(line)]
    processes = subprocess.run(["pgrep", "-u", AGENT_USER, "-a"], capture_output=True,
                               text=True).stdout
    found += [f"process {line}" for line in processes.splitlines()
              if _own_process(line.split()[0])]
    return found


def wait_for_no_leftovers(timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an e2e test that leaves a session's kernel objects or processes behind."""
    if "e2e" not in request.keywords:
        yield
        return
    before = set(leftovers())
    yield
    remaining = [item for item in wait_for_no_leftovers() if item not in before]
    if remaining:
        _remove(remaining)
        pytest.fail(f"the test left these behind: {remaining}")


def _remove(items: list[str]) -> None:
    """Delete what a failed test left, so later tests and the machine start clean."""
    for item in items:
        kind, _, name = item.partition(" ")
        if kind == "process":
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name.split()[0]), signal.SIGKILL)
        elif kind == "namespace":
            subprocess.run(["ip", "netns", "delete", name], check=False)
        elif kind == "link":
            subprocess.run(["ip", "link", "delete", name.split("@")[0]], check=False)
        elif kind == "table":
            subprocess.run(["nft", "delete", *name.split()], check=False)
