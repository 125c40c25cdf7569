"""Concurrency: many `appliance run` sessions at once, each running many small statements.

Starts `--sessions` appliance processes at the same moment (50 by default, on a 2-core
machine), each running an agent that issues `--statements` jobs.query calls whose SQL carries
the session's own marker. Reports throughput (statements per second over the whole run),
errors (failed agent calls and non-zero exits; target 0) and attribution errors (target 0):
read back from the store, every session must hold exactly its own statements, each with its
own marker and none with another's.

The upstream here is bench/query_server.py in the cloud namespace, a synthetic responder for
jobs.query, because local-bigquery slows down with every job it keeps and would be measured
instead of the appliance at 50,000 statements.

    sudo .venv/bin/python bench/bench_concurrency.py --sessions 50 --statements 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness

QUERY_SERVER_OFFSET = 31


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--statements", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3000)


def session_id_of(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if line.startswith("appliance: session ") and " starting " in line:
            return line.split()[2]
    return None


def measure(instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    with harness.cloud_address(instance, QUERY_SERVER_OFFSET) as address:
        server = harness.cloud_exec(instance, [
            harness.UPSTREAM_PYTHON, str(harness.BENCH / "query_server.py"), "--address",
            address, "--cert", str(instance.cert_file), "--key", str(instance.key_file)])
        hosts = {**instance.hosts, "bigquery.googleapis.com": address}
        with harness.background(server, workdir / "query-server.log",
                                ready="query server ready"):
            setup = harness.appliance_setup(instance, workdir, hosts)
            # One session first creates the CA and the store, as an installed appliance has
            # them, so the 50 measure steady-state sessions, not first-start set-up.
            subprocess.run(setup.command("true"), capture_output=True, check=True,
                           cwd=setup.workspace)
            agent = f"python {setup.workspace / 'agent_workload.py'} statements --count " \
                    f"{args.statements} --marker"
            harness.log(f"concurrency: starting {args.sessions} sessions of "
                        f"{args.statements} statements")
            started = time.perf_counter()
            processes = {
                f"bench-marker-{number:03d}": subprocess.Popen(
                    setup.command(f"{agent} bench-marker-{number:03d}"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    cwd=setup.workspace)
                for number in range(args.sessions)}
            outputs = {}
            deadline = time.monotonic() + args.timeout
            for marker, process in processes.items():
                try:
                    stdout, stderr = process.communicate(
                        timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.terminate()
                    stdout, stderr = process.communicate()
                outputs[marker] = (process.returncode, stdout, stderr)
            wall = time.perf_counter() - started
    return summarise(setup, outputs, wall, args)


def summarise(setup: harness.ApplianceSetup, outputs: dict[str, tuple[int, str, str]],
              wall: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = 0
    errors = 0
    failures: list[str] = []
    sessions: dict[str, str] = {}
    for marker, (code, stdout, stderr) in outputs.items():
        session_id = session_id_of(stderr)
        if session_id:
            sessions[session_id] = marker
        try:
            result = harness.last_json(stdout)
        except ValueError:
            result = {"ok": 0, "errors": args.statements, "error_samples": [stderr[-300:]]}
        ok += result["ok"]
        errors += result["errors"]
        if code != 0 or result["errors"]:
            failures.append(f"{marker}: exit {code}, {result['errors']} errors, "
                            f"{result.get('error_samples', [])[:2]}")
    attribution = check_attribution(setup, sessions, args.statements)
    return {"sessions": args.sessions, "statements_per_session": args.statements,
            "wall_seconds": wall, "statements_ok": ok, "errors": errors,
            "statements_per_second": ok / wall, "failures": failures[:10],
            "nonzero_exits": sum(1 for code, _, _ in outputs.values() if code != 0),
            **attribution}


def check_attribution(setup: harness.ApplianceSetup, sessions: dict[str, str],
                      expected: int) -> dict[str, Any]:
    """Count statements recorded in a session other than the one whose marker they carry."""
    query = ("SELECT session_id, regexp_extract(sql, 'bench-marker-[0-9]+') AS marker, "
             "count(*) AS n FROM statements WHERE api_method = 'jobs.query' "
             "GROUP BY ALL")
    result = subprocess.run(setup.cli("sessions", "query", query, "--json"),
                            capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    misattributed = 0
    recorded: dict[str, int] = {}
    for row in rows:
        own = sessions.get(row["session_id"])
        if row["marker"] != own:
            misattributed += row["n"]
        else:
            recorded[row["session_id"]] = row["n"]
    missing = sum(max(0, expected - recorded.get(session_id, 0)) for session_id in sessions)
    return {"attribution_errors": misattributed, "statements_recorded": sum(recorded.values()),
            "statements_missing_from_store": missing,
            "sessions_found": len(sessions)}


if __name__ == "__main__":
    harness.standalone("concurrency", measure, configure)
