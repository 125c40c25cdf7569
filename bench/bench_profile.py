"""Profiles of the appliance where targets are missed: small calls and a Storage Read stream.

Runs the appliance under bench/hook_timing.py (wall time of every addon hook, which shows time
spent waiting for fsync, not only CPU) and under py-spy (CPU samples of every thread), once for
keep-alive small calls and once for a Storage Read stream, and keeps the busiest frames.

    sudo .venv/bin/python bench/bench_profile.py --calls 200 --storage-mib 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--storage-mib", type=int, default=256)


def profile_run(setup: harness.ApplianceSetup, agent_args: list[str], workdir: Path,
                name: str) -> dict[str, Any]:
    """Profile one appliance run; retry once, as Runner.run_agent does."""
    try:
        return _profile_once(setup, agent_args, workdir, name)
    except RuntimeError as error:
        harness.log(f"retrying after a failed profiled run ({str(error).splitlines()[0]})")
        return _profile_once(setup, agent_args, workdir, name)


def _profile_once(setup: harness.ApplianceSetup, agent_args: list[str], workdir: Path,
                  name: str) -> dict[str, Any]:
    timings = workdir / f"{name}-hooks.json"
    stacks = workdir / f"{name}-py-spy.txt"
    agent = f"python {setup.workspace / 'agent_workload.py'} {' '.join(agent_args)}"
    argv = setup.command(agent)
    argv[1:3] = [str(harness.BENCH / "hook_timing.py"), str(timings)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(harness.REPO)) if p)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=setup.workspace)
    time.sleep(1.0)
    with harness.profiled(process.pid, stacks):
        stdout, stderr = process.communicate(timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"profiled run {name} exited {process.returncode}:\n{stderr[-2000:]}")
    hooks = {hook: harness.summary(values)
             for hook, values in json.loads(timings.read_text()).items() if len(values) > 2}
    return {"agent": harness.last_json(stdout), "hooks_ms": hooks,
            "py_spy": harness.profile_summary(stacks, top=25)}


def measure(instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    with harness.cloud_address(instance, harness.SYNTHETIC_STORAGE_OFFSET) as address:
        server = harness.cloud_exec(instance, [
            harness.UPSTREAM_PYTHON, str(harness.BENCH / "storage_server.py"), "--address",
            address, "--cert", str(instance.cert_file), "--key", str(instance.key_file)])
        hosts = {**instance.hosts, "bigquerystorage.googleapis.com": address}
        with harness.background(server, workdir / "storage-server.log",
                                ready="storage server ready"):
            setup = harness.appliance_setup(instance, workdir, hosts)
            harness.log("profile: small calls through the appliance")
            small = profile_run(setup, ["small", "--calls", str(args.calls)], workdir, "small")
            small["agent"] = {k: harness.summary(v) for k, v in small["agent"].items()
                              if isinstance(v, list)}
            harness.log(f"profile: Storage Read of {args.storage_mib} MiB through the appliance")
            storage = profile_run(setup, ["storage", "--table",
                                          f"bench.synthetic_{args.storage_mib}"],
                                  workdir, "storage")
    return {"small": small, "storage": storage}


if __name__ == "__main__":
    harness.standalone("profile", measure, configure)
