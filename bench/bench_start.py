"""Session start: wall time of `appliance run --agent-cmd true`, and what the imports cost.

Runs the command `--runs` times in a loop and reports the median and spread, then the import
time of the CLI module and of the session module (python -X importtime), with the heaviest
imports, because imports alone are most of a start. With the service mode (`appliance serve`)
the same is measured when the installed appliance has that command; otherwise it is reported
as not available. Target: <= 1.5 s without the service mode, <= 0.2 s with it.

    sudo .venv/bin/python bench/bench_start.py --runs 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=10)


def import_profile(module: str) -> dict[str, Any]:
    """Return the wall time of importing `module` in a fresh interpreter, and its top imports."""
    started = time.perf_counter()
    result = subprocess.run([harness.APPLIANCE_PYTHON, "-X", "importtime", "-c",
                             f"import {module}"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
        depth = len(name) - len(name.lstrip())
        rows.append((int(cumulative_us), depth, name.strip()))
    outermost = min(depth for _, depth, _ in rows)
    total = sum(row[0] for row in rows if row[1] == outermost)
    # What the module itself pulls in: the imports one level below the outermost.
    children = sorted((row for row in rows if row[1] == outermost + 2), reverse=True)
    return {"wall_seconds": wall, "import_seconds": total / 1e6,
            "heaviest": [(name, round(cumulative / 1e6, 3))
                         for cumulative, _, name in children[:8]]}


def timed_runs(argv: list[str], runs: int, cwd: Path) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr[-2000:]}")
    return {"runs": runs, "median_seconds": statistics.median(times), "min_seconds": min(times),
            "max_seconds": max(times)}


def has_command(*args: str) -> bool:
    result = subprocess.run([harness.APPLIANCE_PYTHON, "-m", "appliance", *args, "--help"],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0


def measure(instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    setup = harness.appliance_setup(instance, workdir)
    service = has_command("serve")
    in_process = ["--no-service"] if service else []
    # The first start creates the CA and the store; it is not what an operator waits for daily.
    timed_runs(setup.command("true", *in_process), 1, setup.workspace)
    results: dict[str, Any] = {"without_service": timed_runs(
        setup.command("true", *in_process), args.runs, setup.workspace)}
    results["imports"] = {module: import_profile(module) for module in
                          ("appliance.cli", "appliance.session")}
    results["cli_help_seconds"] = timed_runs([harness.APPLIANCE_PYTHON, "-m", "appliance",
                                              "--help"], 3, setup.workspace)["median_seconds"]
    if not service:
        results["service_mode"] = "not available: this appliance has no `serve` command"
        return results
    socket_path = workdir / "run" / "serve.sock"
    with harness.background(setup.cli("serve"), workdir / "serve.log"):
        deadline = time.monotonic() + 60
        while not socket_path.is_socket():
            if time.monotonic() > deadline:
                raise RuntimeError(f"appliance serve did not create {socket_path}; see "
                                   f"{workdir / 'serve.log'}")
            time.sleep(0.1)
        timed_runs(setup.command("true"), 1, setup.workspace)
        results["with_service"] = timed_runs(setup.command("true"), args.runs, setup.workspace)
    results["service_mode"] = (f"median {results['with_service']['median_seconds']:.2f} s with "
                               "`appliance serve` running")
    return results


if __name__ == "__main__":
    harness.standalone("start", measure, configure)
