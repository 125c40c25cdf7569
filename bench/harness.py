"""What every benchmark shares: the testbed cloud, the three setups, the agent and RSS sampling.

The three setups use the same transparent topology, an agent network namespace linked to the
host by a veth pair, and differ only in what sits on the host side:

- direct: the host routes the namespace's packets to the testbed cloud (forwarding is turned on
  for the two bench links only, and the cloud namespace gets a route back to the bench subnet);
- plain: an nftables table like the appliance's redirects the namespace's TCP to a mitmproxy 12
  master in transparent mode that loads only core, proxyserver, next_layer and tlsconfig
  (bench/plain_mitmproxy.py);
- appliance: `appliance run`, which builds its own namespace, table and proxy per session.

Every kernel object made here is named `apbench-...` or `apb-...`, not like a session's, so the
e2e suite's leftover check never mistakes it for its own; all of it is removed in `finally`.
All traffic stays inside 198.18.0.0/15 on this machine.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
APPLIANCE_PYTHON = str(REPO / ".venv" / "bin" / "python")
UPSTREAM_PYTHON = os.environ.get("APPLIANCE_UPSTREAM_PYTHON",
                                 str(REPO / ".venv-upstream" / "bin" / "python"))
AGENT_PYTHON = os.environ.get("APPLIANCE_AGENT_PYTHON", "/opt/appliance-agent-venv/bin/python")
CLOUD_SUBNET = os.environ.get("BENCH_CLOUD_SUBNET", "198.19.109.0/24")
SESSION_POOL = os.environ.get("BENCH_SESSION_POOL", "198.18.109.0/24")
PROXY_PORT = 15001
BENCH_USER = "appliance-bench"
# Bench namespaces take /30s from the end of the session pool; `appliance run` skips a /30
# while an address of it is on a host link.
SYNTHETIC_STORAGE_OFFSET = 30
ALLOWED = ipaddress.IPv4Network("198.18.0.0/15")


def bench_subnet(slot: int) -> ipaddress.IPv4Network:
    """Return the /30 of bench namespace `slot`, counted from the end of the session pool."""
    return list(ipaddress.IPv4Network(SESSION_POOL).subnets(new_prefix=30))[-1 - slot]


def check_addresses() -> None:
    for value in (CLOUD_SUBNET, SESSION_POOL):
        if not ipaddress.IPv4Network(value).subnet_of(ALLOWED):
            raise SystemExit(f"bench: {value} is outside {ALLOWED}; benchmarks only use test "
                             "addresses.")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)


# -- statistics --------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else float("nan")}


# -- machine -----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Describe the machine and the versions that the numbers depend on."""
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")

    def versions(python: str, names: list[str]) -> dict[str, str]:
        code = ("import importlib.metadata as m, json, sys\n"
                "out = {'python': sys.version.split()[0]}\n"
                f"for n in {names!r}:\n"
                "    try: out[n] = m.version(n)\n"
                "    except m.PackageNotFoundError: pass\n"
                "print(json.dumps(out))")
        return json.loads(run([python, "-c", code]).stdout)

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory": f"{int(memory.split()[1]) // 1024} MiB",
        "kernel": platform.release(),
        "os": _os_name(),
        "appliance": versions(APPLIANCE_PYTHON, ["bq-session-appliance", "mitmproxy", "duckdb",
                                                 "pyroute2", "typer"]),
        "agent": versions(AGENT_PYTHON, ["google-cloud-bigquery",
                                         "google-cloud-bigquery-storage", "grpcio", "requests",
                                         "urllib3", "pyarrow"]),
        "upstream": versions(UPSTREAM_PYTHON, ["local-bigquery", "duckdb", "grpcio",
                                               "pyarrow"]),
        "nft": run(["nft", "--version"]).stdout.strip(),
        "jq": run(["jq", "--version"]).stdout.strip() if shutil.which("jq") else None,
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


# -- RSS ---------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread, with wall-clock times."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = rss_kib(self.pid)
            if value is None:
                return
            self.samples.append((time.time(), value))
            self._stop.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return max(values) if values else None

    def last_before(self, moment: float) -> int | None:
        values = [v for t, v in self.samples if t <= moment]
        return values[-1] if values else None


# -- the cloud ---------------------------------------------------------------------------------

@contextlib.contextmanager
def cloud(workdir: Path) -> Iterator[Any]:
    """Start the testbed cloud on the bench subnet; yield it, then stop it."""
    sys.path.insert(0, str(REPO))
    from testbed.cloud import Cloud

    check_addresses()
    log(f"starting the testbed cloud on {CLOUD_SUBNET}")
    with Cloud(workdir / "cloud", UPSTREAM_PYTHON, subnet=CLOUD_SUBNET) as instance:
        yield instance


def cloud_exec(instance: Any, argv: list[str]) -> list[str]:
    """Return argv prefixed so that it runs inside the cloud's namespace."""
    return ["nsenter", f"--net=/run/netns/{instance.namespace}", "--", *argv]


@contextlib.contextmanager
def cloud_address(instance: Any, offset: int) -> Iterator[str]:
    """Add one more address to the cloud's namespace link, for a bench server; remove it after."""
    address = str(ipaddress.IPv4Network(CLOUD_SUBNET)[offset])
    link = instance.namespace_interface
    run(["ip", "-n", instance.namespace, "addr", "add", f"{address}/32", "dev", link])
    try:
        yield address
    finally:
        subprocess.run(["ip", "-n", instance.namespace, "addr", "del", f"{address}/32", "dev",
                        link], check=False, capture_output=True)


@contextlib.contextmanager
def background(argv: list[str], log_path: Path, ready: str | None = None,
               timeout: float = 60.0, env: dict[str, str] | None = None
               ) -> Iterator[subprocess.Popen[str]]:
    """Run a server in its own process group until the block ends; wait for `ready` on stdout."""
    handle = log_path.open("w")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE if ready else handle,
                               stderr=handle, text=True, start_new_session=True,
                               env=env)
    try:
        if ready is not None:
            assert process.stdout is not None
            deadline = time.monotonic() + timeout
            while True:
                line = process.stdout.readline()
                if ready in line:
                    break
                if not line and process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not become ready; see {log_path}")
            threading.Thread(target=_drain, args=(process.stdout, handle), daemon=True).start()
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        handle.close()


def _drain(stream: Any, sink: Any) -> None:
    for line in stream:
        sink.write(line)


# -- the bench namespace (direct and plain) ----------------------------------------------------

@dataclass
class BenchNetwork:
    tag: str
    namespace: str
    host_link: str
    namespace_link: str
    host_address: ipaddress.IPv4Address
    namespace_address: ipaddress.IPv4Address
    prefixlen: int
    cleanups: list[Any] = field(default_factory=list)

    def exec(self, argv: list[str]) -> list[str]:
        """Return argv prefixed to run in the namespace, with its /etc/netns hosts file."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@contextlib.contextmanager
def bench_network(instance: Any, mode: str, hosts: dict[str, str], slot: int = 0
                  ) -> Iterator[BenchNetwork]:
    """Create the agent namespace for the direct or plain setup; remove it and all else after.

    mode "direct" routes to the cloud; mode "plain" installs the redirect table of
    netns/nftables.py, under a bench table name, to the plain proxy on the host-side address.
    """
    subnet = bench_subnet(slot)
    tag = secrets.token_hex(3)
    network = BenchNetwork(tag=tag, namespace=f"apbench-{tag}", host_link=f"apb-{tag}-h",
                           namespace_link=f"apb-{tag}-n", host_address=subnet[1],
                           namespace_address=subnet[2], prefixlen=30)
    etc = Path("/etc/netns") / network.namespace
    try:
        run(["ip", "netns", "add", network.namespace])
        network.cleanups.append(["ip", "netns", "delete", network.namespace])
        run(["ip", "link", "add", network.host_link, "type", "veth", "peer", "name",
             network.namespace_link, "netns", network.namespace])
        network.cleanups.append(["ip", "link", "delete", network.host_link])
        run(["ip", "addr", "add", f"{network.host_address}/30", "dev", network.host_link])
        run(["ip", "link", "set", network.host_link, "up"])
        inside = ["ip", "-n", network.namespace]
        run([*inside, "link", "set", "lo", "up"])
        run([*inside, "addr", "add", f"{network.namespace_address}/30", "dev",
             network.namespace_link])
        run([*inside, "link", "set", network.namespace_link, "up"])
        run([*inside, "route", "add", "default", "via", str(network.host_address)])
        for scope in ("all", "default"):
            run(["ip", "netns", "exec", network.namespace, "sysctl", "-q", "-w",
                 f"net.ipv6.conf.{scope}.disable_ipv6=1"])
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{a} {h}" for h, a in sorted(hosts.items())]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        if mode == "direct":
            _route_directly(instance, network)
        elif mode == "plain":
            _install_redirect(network)
        else:
            raise ValueError(mode)
        yield network
    finally:
        for command in reversed(network.cleanups):
            subprocess.run(command, check=False, capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            etc.parent.rmdir()


def _route_directly(instance: Any, network: BenchNetwork) -> None:
    """Forward between the bench link and the cloud link only, with a route back in the cloud."""
    for link in (network.host_link, instance.host_interface):
        path = Path(f"/proc/sys/net/ipv4/conf/{link}/forwarding")
        before = path.read_text().strip()
        path.write_text("1")
        network.cleanups.append(["sh", "-c", f"test -e {path} && echo {before} > {path}"])
    subnet = f"{ipaddress.IPv4Network(f'{network.host_address}/30', strict=False)}"
    run(["ip", "-n", instance.namespace, "route", "add", subnet, "via", instance.host_address])
    network.cleanups.append(["ip", "-n", instance.namespace, "route", "del", subnet])


def _install_redirect(network: BenchNetwork) -> None:
    sys.path.insert(0, str(REPO))
    from appliance.netns.namespace import SessionNetwork
    from appliance.netns.nftables import ruleset, table_name

    session_network = SessionNetwork(
        tag=network.tag, namespace=network.namespace, host_link=network.host_link,
        namespace_link=network.namespace_link, host_address=network.host_address,
        namespace_address=network.namespace_address, prefixlen=network.prefixlen)
    table = f"apbench_{network.tag}"
    # Other arguments of ruleset (resolver port, log group) get values nothing else uses.
    extra = {"dns_port": PROXY_PORT + 1, "log_group": 1090}
    accepted = inspect.signature(ruleset).parameters
    script = ruleset(session_network, PROXY_PORT,
                     **{k: v for k, v in extra.items() if k in accepted}).replace(
        f"table inet {table_name(network.tag)} ", f"table inet {table} ", 1)
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True)
    network.cleanups.append(["nft", "delete", "table", "inet", table])


@contextlib.contextmanager
def plain_proxy(network: BenchNetwork, workdir: Path, upstream_ca: Path
                ) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Run bench/plain_mitmproxy.py on the bench network's host address; yield it and its CA."""
    confdir = workdir / "plain-ca"
    confdir.mkdir(mode=0o700, exist_ok=True)
    argv = [APPLIANCE_PYTHON, str(BENCH / "plain_mitmproxy.py"), "--listen",
            f"{network.host_address}:{PROXY_PORT}", "--confdir", str(confdir),
            "--upstream-ca", str(upstream_ca)]
    with background(argv, workdir / "plain-mitmproxy.log", ready="plain mitmproxy ready") as p:
        yield p, confdir / "mitmproxy-ca-cert.pem"


def agent_env(ca_file: Path, project: str) -> dict[str, str]:
    return {
        "PATH": f"{Path(AGENT_PYTHON).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "SSL_CERT_FILE": str(ca_file),
        "REQUESTS_CA_BUNDLE": str(ca_file),
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(ca_file),
        "GOOGLE_CLOUD_PROJECT": project,
        "PYTHONUNBUFFERED": "1",
    }


# -- the appliance -----------------------------------------------------------------------------

@dataclass
class ApplianceSetup:
    config: Path
    store: Path
    workspace: Path

    def command(self, agent_cmd: str, *extra: str) -> list[str]:
        path = f"{Path(AGENT_PYTHON).parent}:/usr/local/bin:/usr/bin:/bin"
        return [APPLIANCE_PYTHON, "-m", "appliance", "run", "--config", str(self.config),
                "--agent-cmd", agent_cmd, "--env", f"PATH={path}", "--env",
                "PYTHONUNBUFFERED=1", *extra]

    def cli(self, *args: str) -> list[str]:
        return [APPLIANCE_PYTHON, "-m", "appliance", *args, "--config", str(self.config)]


def appliance_setup(instance: Any, workdir: Path,
                    hosts: dict[str, str] | None = None) -> ApplianceSetup:
    """Write an appliance configuration for the bench cloud, pool and a fresh store."""
    store = workdir / "store"
    # The agent reads its session files there, so it lives in the world-traversable workdir.
    runtime = workdir / "run"
    runtime.mkdir(mode=0o755, exist_ok=True)
    config = workdir / "appliance.yaml"
    allow = ["bigquery.googleapis.com", "bigquerystorage.googleapis.com", "www.googleapis.com",
             "oauth2.googleapis.com"]
    ensure_bench_user()
    profile: dict[str, Any] = {"project": instance.project, "allow_hosts": allow,
                               "user": BENCH_USER}
    store_section: dict[str, Any] = {"path": str(store)}
    identities = getattr(instance, "identities", None)
    if identities is not None:
        # An appliance that mints real tokens gets them from the testbed's token service, as
        # the e2e tests configure it; the signing key stays beside the bench store.
        profile["credentials"] = {"source": "service_account_key",
                                  "file": str(identities.service_account_key)}
        store_section["signing_key"] = str(workdir / "signing-key.pem")
    config.write_text(yaml.safe_dump({
        "store": store_section,
        "runtime_dir": str(runtime),
        "proxy": {"ca_dir": str(workdir / "appliance-ca"),
                  "upstream_ca_file": str(instance.ca_file), "port": PROXY_PORT},
        "network": {"pool": SESSION_POOL, "hosts": hosts or dict(instance.hosts)},
        "agents": {"bench": profile},
        "default_agent": "bench",
    }))
    return ApplianceSetup(config, store, workspace(workdir))


def ensure_bench_user() -> None:
    """Create the bench's agent user, like `make agent-user` creates the tests' one.

    A user of its own keeps the e2e suite's leftover check, which kills stray processes of
    the tests' agent user, away from agents that a benchmark runs at the same time.
    """
    if subprocess.run(["id", "-u", BENCH_USER], capture_output=True,
                      check=False).returncode != 0:
        run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", BENCH_USER])


def workspace(workdir: Path) -> Path:
    """A directory the agent user can read, holding a copy of the agent workload script."""
    path = workdir / "workspace"
    path.mkdir(exist_ok=True)
    shutil.copy(BENCH / "agent_workload.py", path / "agent_workload.py")
    path.chmod(0o755)
    return path


def bench_workdir(name: str) -> Path:
    """A fresh directory under /tmp the agent user can traverse; removed by the caller."""
    path = Path(tempfile.mkdtemp(prefix=f"appliance-bench-{name}-", dir="/tmp"))
    path.chmod(0o755)
    return path


def last_json(text: str) -> dict[str, Any]:
    """Return the last line of `text` that is a JSON object (the agent's result)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise ValueError(f"no JSON result in output:\n{text[-2000:]}")


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Store one benchmark's result as JSON under bench/results/, for report.py."""
    directory = BENCH / "results"
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    log(f"wrote {path}")
    return path


# -- one runner per setup ----------------------------------------------------------------------

SETUPS = ("direct", "plain", "appliance")


@dataclass
class AgentRun:
    """What one agent run returned, with the RSS samples of the proxy process (if any)."""

    result: dict[str, Any]
    rss: RssSampler | None
    stderr: str


class Runner:
    """Runs the agent workload in one setup; the setup's network stays up between runs."""

    def __init__(self, name: str, instance: Any, workdir: Path,
                 hosts: dict[str, str] | None = None) -> None:
        self.name = name
        self.instance = instance
        self.workdir = workdir
        self.hosts = hosts or dict(instance.hosts)
        self.workspace = workspace(workdir)
        self._stack = contextlib.ExitStack()
        self.network: BenchNetwork | None = None
        self.proxy: subprocess.Popen[str] | None = None
        self.ca_file: Path = instance.ca_file
        self.appliance: ApplianceSetup | None = None

    def __enter__(self) -> Self:
        try:
            if self.name == "appliance":
                self.appliance = appliance_setup(self.instance, self.workdir, self.hosts)
            else:
                self.network = self._stack.enter_context(
                    bench_network(self.instance, self.name, self.hosts,
                                  slot=SETUPS.index(self.name)))
                if self.name == "plain":
                    self.proxy, self.ca_file = self._stack.enter_context(
                        plain_proxy(self.network, self.workdir, self.instance.ca_file))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()

    def agent_argv(self, args: list[str]) -> list[str]:
        return ["python", str(self.workspace / "agent_workload.py"), *args]

    def run_agent(self, args: list[str], timeout: float = 900, sample: bool = False,
                  extra_env: dict[str, str] | None = None, attempts: int = 2) -> AgentRun:
        """Run the agent workload and return its JSON result; retry a failed run once.

        A retry is logged and counted in the result: on a shared machine another test run may
        remove a session's namespace while a benchmark uses it.
        """
        for attempt in range(1, attempts + 1):
            try:
                run = self._run_agent_once(args, timeout, sample, extra_env)
            except RuntimeError as error:
                if attempt == attempts:
                    raise
                log(f"retrying after a failed agent run ({str(error).splitlines()[0]})")
                continue
            run.result["retries"] = attempt - 1
            return run
        raise AssertionError("unreachable")

    def _run_agent_once(self, args: list[str], timeout: float, sample: bool,
                        extra_env: dict[str, str] | None) -> AgentRun:
        if self.name == "appliance":
            assert self.appliance is not None
            envs = [item for k, v in (extra_env or {}).items() for item in ("--env", f"{k}={v}")]
            argv = self.appliance.command(" ".join(self.agent_argv(args)), *envs)
            env = None
        else:
            assert self.network is not None
            env = {**agent_env(self.ca_file, self.instance.project), **(extra_env or {})}
            argv = self.network.exec(["env", "-i", *[f"{k}={v}" for k, v in env.items()],
                                      *self.agent_argv(args)])
            argv[argv.index("python")] = AGENT_PYTHON
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=self.workspace)
        watched = process.pid if self.name == "appliance" else (
            self.proxy.pid if self.proxy is not None else None)
        sampler = RssSampler(watched) if sample and watched is not None else None
        with sampler if sampler is not None else contextlib.nullcontext():
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
                raise RuntimeError(f"agent {args} in setup {self.name} timed out:\n{stderr}")
        if process.returncode != 0:
            raise RuntimeError(f"agent {args} in setup {self.name} exited "
                               f"{process.returncode}:\n{stderr[-3000:]}")
        return AgentRun(last_json(stdout), sampler, stderr)


# -- profiles ----------------------------------------------------------------------------------

PY_SPY = str(REPO / ".venv" / "bin" / "py-spy")


@contextlib.contextmanager
def profiled(pid: int, output: Path, rate: int = 250) -> Iterator[None]:
    """Record a py-spy profile of `pid` (collapsed stacks) while the block runs."""
    if not Path(PY_SPY).exists():
        raise SystemExit("bench: py-spy is missing; install it with "
                         f"{APPLIANCE_PYTHON} -m pip install py-spy")
    process = subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--rate", str(rate),
                                "--format", "raw", "--output", str(output), "--nonblocking",
                                "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Summarise a collapsed-stack profile: the busiest leaf frames and appliance frames.

    Samples whose leaf is a wait (select, epoll, a lock or queue) are idle and left out.
    `self` ranks leaf frames (where the CPU was); `appliance` ranks frames of the appliance's
    own code by inclusive share, which tells which of its functions the time was spent under.
    """
    own = ("appliance/", "addons/", "recordings/", "netns/")
    leaves: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        if any(word in leaf for word in ("select (selectors", "poll (selectors", "epoll",
                                         "_wait_for_tstate", "wait (threading",
                                         "get (queue")):
            idle += count
            continue
        leaves[leaf] = leaves.get(leaf, 0) + count
        for frame in set(frames[1:]):
            if any(part in frame for part in own) and "cli.py" not in frame \
                    and "Session.run " not in frame:
                inclusive[frame] = inclusive.get(frame, 0) + count
    busy = max(total - idle, 1)

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / busy, 1))
                for frame, n in sorted(counts.items(), key=lambda item: -item[1])[:top]]

    return {"samples": total, "busy_samples": total - idle, "self": ranked(leaves),
            "appliance": ranked(inclusive)}


# -- entry points ------------------------------------------------------------------------------

def standalone(name: str, measure: Any, configure: Any | None = None,
               needs_cloud: bool = True) -> None:
    """Run one benchmark script on its own: parse its options, start a cloud, store the result."""
    import argparse

    if os.geteuid() != 0:
        raise SystemExit("bench: benchmarks create namespaces and nftables tables; run as root.")
    parser = argparse.ArgumentParser(description=sys.modules[measure.__module__].__doc__)
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    workdir = bench_workdir(name)
    try:
        if needs_cloud:
            with cloud(workdir) as instance:
                result = measure(instance, workdir, args)
        else:
            result = measure(None, workdir, args)
        result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        write_result(name, result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@contextlib.contextmanager
def runners(instance: Any, workdir: Path, hosts: dict[str, str] | None = None
            ) -> Iterator[dict[str, Runner]]:
    """Bring all three setups up at once, so that runs can be interleaved."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(Runner(name, instance, workdir, hosts))
               for name in SETUPS}


def rotations(rounds: int) -> Iterator[tuple[int, str]]:
    """Yield (round, setup) with the setup order rotated each round.

    The testbed upstream slows down as its job history grows, so the setups take turns in
    short rounds and the drift falls on all three alike.
    """
    for number in range(rounds):
        shift = number % len(SETUPS)
        for name in SETUPS[shift:] + SETUPS[:shift]:
            yield number, name
