"""Store: `appliance sessions query` over a million recorded statements, against jq over JSONL.

Builds a store of synthetic sealed sessions through the real code paths (the store opens each
journal, events are appended and fsynced by the journal's group commit, the store seals the
journal into Parquet and registers it), keeping a copy of every journal, which is the same
events as JSON Lines. Then times two questions asked both ways, an aggregate over all
statements and a search for the statements that touched one table, checks that both ways give
the same answer, and times `appliance sessions verify --all` over the whole store.

    sudo .venv/bin/python bench/bench_store.py --statements 1000000 --sessions 100
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness

NEEDLE = "orders_0042"
STATEMENT_TYPES = ("SELECT", "SELECT", "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--statements", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each query")


def statement_events(number: int, rng: random.Random) -> list[dict[str, Any]]:
    """The request and response events the recorder writes for one jobs.query statement."""
    kind = rng.choice(STATEMENT_TYPES)
    table = f"demo-project.sales.orders_{rng.randrange(1000):04d}"
    sql = {"SELECT": f"SELECT customer, SUM(total) FROM `{table}` WHERE day = @day GROUP BY 1",
           "INSERT": f"INSERT INTO `{table}` (customer, total) VALUES ('c{number}', {number})",
           "UPDATE": f"UPDATE `{table}` SET total = total * 1.1 WHERE customer = 'c{number}'",
           "DELETE": f"DELETE FROM `{table}` WHERE customer = 'c{number}'",
           "MERGE": f"MERGE `{table}` t USING staging s ON t.id = s.id WHEN MATCHED THEN "
                    "UPDATE SET total = s.total"}[kind]
    statement_id = f"st-{number:06d}"
    flow = f"flow-{number:08x}"
    common = {"flow_id": flow, "statement_id": statement_id, "client": "198.18.109.2:41000",
              "server": "198.19.109.10:443", "host": "bigquery.googleapis.com",
              "method": "POST", "path": "/bigquery/v2/projects/demo-project/queries",
              "api": "bigquery.v2", "api_method": "jobs.query", "project": "demo-project"}
    request = {**common, "kind": "request", "sql": sql, "dry_run": False,
               "request_bytes": len(sql) + 120, "credential": "bearer:sha256:0123456789abcdef",
               "detail": '{"headers":{"content-type":"application/json"},"sni":'
                         '"bigquery.googleapis.com"}'}
    response = {**common, "kind": "response", "status": 200, "response_bytes": 900,
                "job_id": f"job_{number:010d}", "location": "US", "statement_type": kind,
                "outcome": "done", "bytes_processed": 1024 * rng.randrange(1, 1000),
                "rows_affected": None if kind == "SELECT" else rng.randrange(100),
                "rows_returned": rng.randrange(100) if kind == "SELECT" else None,
                "detail": '{"content_type":"application/json"}'}
    return [request, response]


async def _append_all(journal: Any, events: list[dict[str, Any]], window: int = 512) -> None:
    for start in range(0, len(events), window):
        await asyncio.gather(*(journal.append(e) for e in events[start:start + window]))


def build_store(workdir: Path, statements: int, sessions: int) -> tuple[Path, Path, Path]:
    """Write the sealed sessions and the JSONL copy; return config, store and JSONL paths."""
    from appliance.recordings.schema import SESSION_END, SESSION_START
    from appliance.recordings.store import Store

    root = workdir / "store"
    key = workdir / "signing-key.pem"
    config = workdir / "appliance.yaml"
    config.write_text(yaml.safe_dump({"store": {"path": str(root), "signing_key": str(key)}}))
    parameters = inspect.signature(Store).parameters
    store = Store(root, signing_key=key) if "signing_key" in parameters else Store(root)
    store.ensure()
    export = workdir / "jsonl"
    export.mkdir()
    rng = random.Random(8)
    per_session = statements // sessions
    number = 0
    for index in range(sessions):
        session_id = f"20260101T{index // 3600 % 24:02d}{index // 60 % 60:02d}" \
                     f"{index % 60:02d}Z-{index:08x}"
        journal = store.open_journal(session_id)
        events: list[dict[str, Any]] = [{"kind": SESSION_START, "project": "demo-project",
                                         "detail": json.dumps({"agent": f"agent-{index % 7}",
                                                               "unix_user": "appliance-agent",
                                                               "operator": "root",
                                                               "command": "python agent.py"})}]
        for _ in range(per_session):
            number += 1
            events += statement_events(number, rng)
        events.append({"kind": SESSION_END, "detail": json.dumps({"exit_code": 0})})
        asyncio.run(_append_all(journal, events))
        journal.close()
        shutil.copy(store.journal_path(session_id), export / f"{session_id}.jsonl")
        try:
            store.seal(session_id)
        finally:
            journal.release()
        if index % 10 == 9:
            harness.log(f"store: sealed {index + 1}/{sessions} sessions ({number} statements)")
    return config, root, export


def timed(argv: list[str], runs: int, shell: bool = False) -> tuple[float, str]:
    """Return the median wall time of `runs` runs and the last run's output."""
    times = []
    output = ""
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(argv if not shell else ["sh", "-c", argv[0]],
                                capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - started)
        output = result.stdout
    return sorted(times)[len(times) // 2], output


def measure(_instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    config, root, export = build_store(workdir, args.statements, args.sessions)
    build_seconds = time.perf_counter() - started
    files = " ".join(str(p) for p in sorted(export.glob("*.jsonl")))
    cli = [harness.APPLIANCE_PYTHON, "-m", "appliance"]
    questions = {
        "aggregate": (
            "SELECT statement_type, count(*) AS n FROM statements GROUP BY 1 ORDER BY 1",
            "jq -n -c 'reduce (inputs | select(.kind == \"response\" and .statement_id != null))"
            " as $e ({}; .[$e.statement_type] += 1)' " + files),
        "needle": (
            f"SELECT session_id, statement_id, sql FROM statements WHERE sql LIKE "
            f"'%{NEEDLE}%' ORDER BY 1, 2",
            f"jq -c 'select(.kind == \"request\" and ((.sql // \"\") | contains(\"{NEEDLE}\")))"
            " | [.session_id, .statement_id, .sql]' " + files),
    }
    results: dict[str, Any] = {
        "statements": args.statements, "sessions": args.sessions,
        "build_seconds": build_seconds,
        "parquet_mib": sum(p.stat().st_size for p in root.rglob("*.parquet")) / (1 << 20),
        "jsonl_mib": sum(p.stat().st_size for p in export.glob("*.jsonl")) / (1 << 20),
        "queries": {}}
    for name, (sql, jq) in questions.items():
        harness.log(f"store: {name} question, sessions query and jq")
        query_seconds, csv_text = timed([*cli, "sessions", "query", sql, "--csv", "--config",
                                         str(config)], args.runs)
        jq_seconds, jq_text = timed([jq], args.runs, shell=True)
        csv_rows = len(csv_text.strip().splitlines()) - 1
        jq_rows = len(jq_text.strip().splitlines()) if name == "needle" else \
            len(json.loads(jq_text))
        results["queries"][name] = {"sql": sql, "jq": jq.replace(files, "JOURNALS/*.jsonl"),
                                    "sessions_query_seconds": query_seconds,
                                    "jq_seconds": jq_seconds,
                                    "speedup": jq_seconds / query_seconds,
                                    "rows": csv_rows, "same_rows_as_jq": csv_rows == jq_rows}
    verify = subprocess.run([*cli, "sessions", "verify", "--help"], capture_output=True,
                            check=False)
    if verify.returncode == 0:
        harness.log("store: sessions verify --all")
        events = args.statements * 2 + 2 * args.sessions
        started = time.perf_counter()
        result = subprocess.run([*cli, "sessions", "verify", "--all", "--json", "--config",
                                 str(config)], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        results["verify"] = {"seconds": seconds, "events": events,
                             "events_per_second": events / seconds,
                             "exit_code": result.returncode,
                             "ok": result.returncode == 0}
    else:
        results["verify"] = "not available: this appliance has no `sessions verify` command"
    return results


if __name__ == "__main__":
    harness.standalone("store", measure, configure, needs_cloud=False)
