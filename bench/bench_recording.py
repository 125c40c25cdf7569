"""Recording cost: record-before-forward with fsync and group commit, at 1, 8 and 64 clients.

Micro-benchmark: `clients` asyncio tasks each append request-sized events to a real journal
(opened by the store, as a session opens it) and wait until each is durable, against the same
loop with no journal. Through the proxy: `clients` threads in the agent, each with its own
client and keep-alive connection, call jobs.get as fast as they can, in plain mitmproxy and in
the appliance. Reports requests per second and p50 latency; the added p50 is the recording
cost. Target: <= 1 ms added at p50 with one client.

    sudo .venv/bin/python bench/bench_recording.py --clients 1 8 64
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--events", type=int, default=3000, help="events per level (micro)")
    parser.add_argument("--calls", type=int, default=1500, help="calls per level (proxy)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit per level")


def sample_event(number: int) -> dict[str, Any]:
    """A request event of the size and shape the recorder writes for a jobs.query."""
    return {
        "kind": "request", "flow_id": f"bench-flow-{number}", "statement_id": f"st-{number:06d}",
        "client": "198.18.109.2:40000", "server": "198.19.109.10:443",
        "host": "bigquery.googleapis.com", "method": "POST",
        "path": "/bigquery/v2/projects/demo-project/queries", "request_bytes": 180,
        "credential": "bearer:sha256:0123456789abcdef", "api": "bigquery.v2",
        "api_method": "jobs.query", "project": "demo-project", "location": None,
        "job_id": None, "dataset_id": None, "table_id": None,
        "sql": f"SELECT name, tier FROM `demo-project.customers.profiles` WHERE id = {number}",
        "parameters": None, "dry_run": False,
        "detail": '{"headers":{"content-type":"application/json","user-agent":"gcloud-python/'
                  '3.47.0 gl-python/3.11"},"http_version":"HTTP/1.1","sni":"bigquery.'
                  'googleapis.com"}',
    }


async def _drive(clients: int, events: int, append: Any) -> dict[str, Any]:
    latencies: list[float] = []
    per_client = max(1, events // clients)

    async def client(index: int) -> None:
        for number in range(per_client):
            event = sample_event(index * per_client + number)
            started = time.perf_counter()
            await append(event)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {"per_second": len(latencies) / elapsed, **harness.summary(latencies)}


def micro(levels: list[int], events: int) -> dict[str, Any]:
    from appliance.recordings.store import Store

    async def no_journal(_event: dict[str, Any]) -> None:
        await asyncio.sleep(0)

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="appliance-bench-journal-", dir="/var/tmp") as root:
        store = Store(Path(root))
        store.ensure()
        for clients in levels:
            journal = store.open_journal(f"20260101T000000Z-bench{clients:03d}")
            try:
                with_journal = asyncio.run(_drive(clients, events, journal.append))
            finally:
                journal.close()
                journal.release()
            without = asyncio.run(_drive(clients, events, no_journal))
            out[str(clients)] = {"journal": with_journal, "none": without,
                                 "added_p50_ms": with_journal["p50"] - without["p50"]}
            harness.log(f"recording: micro, {clients} clients: "
                        f"{with_journal['per_second']:.0f} events/s, "
                        f"p50 {with_journal['p50']:.3f} ms")
    return out


def measure(instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"micro": micro(args.clients, args.events), "proxy": {}}
    with harness.runners(instance, workdir) as runners:
        for clients in args.clients:
            for _, setup in harness.rotations(1):
                harness.log(f"recording: through the proxy, {clients} clients, {setup}")
                calls = max(1, args.calls // clients)
                run = runners[setup].run_agent(["load", "--clients", str(clients), "--calls",
                                                str(calls), "--seconds", str(args.seconds)])
                r = run.result
                results["proxy"].setdefault(str(clients), {})[setup] = {
                    "per_second": len(r["latencies"]) / r["seconds"], "errors": r["errors"],
                    **harness.summary(r["latencies"])}
            level = results["proxy"][str(clients)]
            level["added_p50_ms"] = level["appliance"]["p50"] - level["plain"]["p50"]
            level["rps_ratio"] = harness.ratio(level["appliance"]["per_second"],
                                               level["plain"]["per_second"])
    return results


if __name__ == "__main__":
    harness.standalone("recording", measure, configure)
