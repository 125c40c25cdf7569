"""Small BigQuery calls: jobs.query of SELECT 1 and jobs.get, through the real client library.

For each setup (direct, plain mitmproxy, appliance) the agent makes `--calls` calls of each kind
over one keep-alive connection, then again with a new connection (a full TLS handshake) per
call, and reports p50 and p99 latency in milliseconds. Target: appliance <= 1.15 x plain
mitmproxy at p50 and p99.

    sudo .venv/bin/python bench/bench_calls.py --calls 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness

MODES = {"keepalive": [], "new_connection": ["--new-connections"]}
CALLS = ("jobs.query", "jobs.get")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=300, help="calls of each kind per setup")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=5)


def measure(instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    per_round = max(1, args.calls // args.rounds)
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    requests_per_query: dict[str, float] = {}
    with harness.runners(instance, workdir) as runners:
        for mode, flags in MODES.items():
            for number, setup in harness.rotations(args.rounds):
                harness.log(f"calls: {mode}, round {number + 1}/{args.rounds}, {setup}")
                run = runners[setup].run_agent(["small", "--calls", str(per_round),
                                                "--warmup", str(args.warmup), *flags])
                for call in CALLS:
                    samples.setdefault(setup, {}).setdefault(mode, {}).setdefault(
                        call, []).extend(run.result[call])
                requests_per_query[setup] = run.result["requests_per_query"]
    setups = {setup: {mode: {call: harness.summary(values) for call, values in calls.items()}
                      for mode, calls in modes.items()} for setup, modes in samples.items()}
    return {"calls": per_round * args.rounds, "rounds": args.rounds, "setups": setups,
            "requests_per_query": requests_per_query, "ratios": ratios(setups)}


def ratios(setups: dict[str, Any]) -> dict[str, Any]:
    """appliance / plain and plain / direct, per mode, call and percentile."""
    out: dict[str, Any] = {}
    for mode in MODES:
        for call in CALLS:
            for stat in ("p50", "p99"):
                value = {s: setups[s][mode][call][stat] for s in harness.SETUPS}
                out[f"{mode} {call} {stat}"] = {
                    "appliance/plain": harness.ratio(value["appliance"], value["plain"]),
                    "plain/direct": harness.ratio(value["plain"], value["direct"]),
                    "appliance/direct": harness.ratio(value["appliance"], value["direct"]),
                }
    return out


if __name__ == "__main__":
    harness.standalone("calls", measure, configure)
