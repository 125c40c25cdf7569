"""The benchmark agent: the real google-cloud-bigquery clients, run as an agent would run them.

It runs with the agent venv's Python (3.11) in the agent's namespace, in all three setups alike,
and prints one JSON object with its measurements as its last line of stdout. The clients find
BigQuery at its real host names; the only credential is a placeholder token (the session's own
under the appliance), because the testbed upstream does not check tokens.

    python agent_workload.py small --calls 300 [--new-connections]
    python agent_workload.py pages --table bench.wide --page-rows 1000 --repeat 3
    python agent_workload.py storage --table bench.synthetic
    python agent_workload.py load --clients 8 --calls 200
    python agent_workload.py statements --count 1000 --marker agent-07
    python agent_workload.py setup --rows 4000 --width 10000
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

from google.cloud import bigquery
from google.oauth2.credentials import Credentials


def credentials() -> Credentials:
    path = os.environ.get("CLOUDSDK_AUTH_ACCESS_TOKEN_FILE")
    token = "bench-placeholder-token"
    if path and os.path.exists(path):
        with open(path) as handle:
            token = handle.read().strip()
    return Credentials(token=token)


def client() -> bigquery.Client:
    return bigquery.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"], credentials=credentials())


def counting(bq: bigquery.Client) -> dict[str, int]:
    """Count the HTTP responses and body bytes the client receives."""
    counts = {"responses": 0, "bytes": 0}

    def hook(response: Any, *_args: Any, **_kwargs: Any) -> None:
        counts["responses"] += 1
        counts["bytes"] += len(response.content)

    bq._http.hooks["response"].append(hook)
    return counts


def timed(action: Any, calls: int, new_connections: bool, bq: bigquery.Client) -> list[float]:
    latencies = []
    for _ in range(calls):
        if new_connections:
            bq._http.close()  # Drops pooled connections: the next call does a TLS handshake.
        started = time.perf_counter()
        action()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def small(args: argparse.Namespace) -> dict[str, Any]:
    bq = client()
    job = bq.query("SELECT 1")
    job.result()
    counts = counting(bq)
    query = lambda: list(bq.query_and_wait("SELECT 1"))
    get = lambda: bq.get_job(job.job_id, location=job.location)
    timed(query, args.warmup, args.new_connections, bq)
    timed(get, args.warmup, args.new_connections, bq)
    before = counts["responses"]
    result = {"jobs.query": timed(query, args.calls, args.new_connections, bq)}
    result["requests_per_query"] = (counts["responses"] - before) / args.calls
    result["jobs.get"] = timed(get, args.calls, args.new_connections, bq)
    return result


def setup(args: argparse.Namespace) -> dict[str, Any]:
    bq = client()
    dataset = f"{bq.project}.bench"
    bq.create_dataset(dataset, exists_ok=True)
    table = f"{dataset}.wide"
    bq.query_and_wait(f"DROP TABLE IF EXISTS `{table}`")
    bq.query_and_wait(
        f"CREATE TABLE `{table}` AS SELECT n, REPEAT('x', {args.width}) AS payload "
        f"FROM UNNEST(GENERATE_ARRAY(1, {args.rows})) AS n")
    count = next(iter(bq.query_and_wait(f"SELECT COUNT(*) AS c FROM `{table}`"))).c
    return {"table": table, "rows": count}


def pages(args: argparse.Namespace) -> dict[str, Any]:
    bq = client()
    counts = counting(bq)
    runs = []
    for _ in range(args.repeat):
        job = bq.query(f"SELECT n, payload FROM `{bq.project}.{args.table}`")
        job.result(max_results=0)
        before_bytes, before_responses = counts["bytes"], counts["responses"]
        started = time.perf_counter()
        rows = 0
        page_count = 0
        for page in job.result(page_size=args.page_rows).pages:
            rows += page.num_items
            page_count += 1
        elapsed = time.perf_counter() - started
        runs.append({"seconds": elapsed, "bytes": counts["bytes"] - before_bytes,
                     "responses": counts["responses"] - before_responses, "rows": rows,
                     "pages": page_count, "started": time.time() - elapsed})
    return {"runs": runs}


def storage(args: argparse.Namespace) -> dict[str, Any]:
    from google.cloud import bigquery_storage

    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    dataset, table = args.table.split(".")
    reader = bigquery_storage.BigQueryReadClient(credentials=credentials())
    started_wall = time.time()
    started = time.perf_counter()
    session = reader.create_read_session(
        parent=f"projects/{project}",
        read_session=bigquery_storage.types.ReadSession(
            table=f"projects/{project}/datasets/{dataset}/tables/{table}",
            data_format=bigquery_storage.types.DataFormat.ARROW),
        max_stream_count=1)
    received = 0
    rows = 0
    messages = 0
    first_byte = None
    # A deadline, so that a stream whose path was torn down fails instead of hanging.
    for response in reader.read_rows(session.streams[0].name, timeout=args.deadline):
        if first_byte is None:
            first_byte = time.perf_counter() - started
        received += len(response.arrow_record_batch.serialized_record_batch)
        rows += response.row_count
        messages += 1
    return {"seconds": time.perf_counter() - started, "bytes": received, "rows": rows,
            "messages": messages, "first_message_seconds": first_byte, "started": started_wall}


def load(args: argparse.Namespace) -> dict[str, Any]:
    """Run `clients` threads, each with its own client and connection, calling jobs.get."""
    seed = client()
    job = seed.query("SELECT 1")
    job.result()
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    barrier = threading.Barrier(args.clients + 1)
    deadline = [0.0]

    def worker(index: int) -> None:
        bq = client()
        bq.get_job(job.job_id, location=job.location)
        barrier.wait()
        for _ in range(args.calls):
            if time.monotonic() > deadline[0]:
                break
            started = time.perf_counter()
            try:
                bq.get_job(job.job_id, location=job.location)
            except Exception as error:  # noqa: BLE001 - counted and reported, not raised
                errors.append(type(error).__name__)
                continue
            latencies[index].append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.monotonic() + args.seconds
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    flat = [value for values in latencies for value in values]
    return {"latencies": flat, "seconds": elapsed, "errors": len(errors),
            "error_kinds": sorted(set(errors))}


def statements(args: argparse.Namespace) -> dict[str, Any]:
    bq = client()
    ok = 0
    errors: list[str] = []
    started = time.perf_counter()
    for number in range(args.count):
        try:
            list(bq.query_and_wait(f"SELECT '{args.marker}' AS marker, {number} AS n"))
            ok += 1
        except Exception as error:  # noqa: BLE001 - counted and reported, not raised
            errors.append(f"{type(error).__name__}: {str(error)[:200]}")
    return {"marker": args.marker, "ok": ok, "errors": len(errors), "error_samples": errors[:5],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("small")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--new-connections", action="store_true")
    p = commands.add_parser("setup")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--width", type=int, default=10000)
    p = commands.add_parser("pages")
    p.add_argument("--table", default="bench.wide")
    p.add_argument("--page-rows", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p = commands.add_parser("storage")
    p.add_argument("--table", default="bench.synthetic")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole read")
    p = commands.add_parser("load")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p = commands.add_parser("statements")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--marker", required=True)
    args = parser.parse_args()
    handlers = {"small": small, "setup": setup, "pages": pages, "storage": storage,
                "load": load, "statements": statements}
    result = handlers[args.command](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
