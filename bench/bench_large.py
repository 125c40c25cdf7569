"""Large results: getQueryResults pages of about 10 MB and a Storage Read stream of 1 GiB or more.

Pages: the agent creates a table of wide rows (about 10 kB each) in the testbed upstream, then
reads it with the real client through jobs.getQueryResults, `--page-rows` rows (about 10 MB of
JSON) per page. Storage Read: local-bigquery builds Arrow batches from DuckDB in Python and
cannot stream a gigabyte in reasonable time, so bench/storage_server.py, a synthetic Storage
Read server built from the published google-cloud-bigquery-storage protos, runs in the cloud
namespace and streams generated Arrow record batches; the agent reads them with the real
BigQueryReadClient. Reports throughput per setup, its ratio to direct (target >= 0.5), and the
peak RSS of the proxy process against its idle size (target: within 64 MB, whatever the size).

    sudo .venv/bin/python bench/bench_large.py --storage-mib 1024 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness

MIB = 1 << 20


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=3000, help="rows of the wide table")
    parser.add_argument("--width", type=int, default=10000, help="bytes per wide row")
    parser.add_argument("--page-rows", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--storage-mib", type=int, nargs="+", default=[1024, 256],
                        help="stream sizes in MiB; RSS must not grow with them")
    parser.add_argument("--timeout", type=float, default=900)


def _rss(run: harness.AgentRun, started: float, setup: str) -> dict[str, Any] | None:
    if run.rss is None:
        return None
    idle = run.rss.last_before(started)
    peak = run.rss.peak_between(started, float("inf"))
    return {"idle_mib": idle / 1024 if idle else None, "peak_mib": peak / 1024 if peak else None,
            "growth_mib": (peak - idle) / 1024 if peak and idle else None,
            "process": "appliance run" if setup == "appliance" else "plain mitmproxy"}


def measure(instance: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"pages": {}, "storage": {}}
    with harness.cloud_address(instance, harness.SYNTHETIC_STORAGE_OFFSET) as address:
        server = harness.cloud_exec(instance, [
            harness.UPSTREAM_PYTHON, str(harness.BENCH / "storage_server.py"), "--address",
            address, "--cert", str(instance.cert_file), "--key", str(instance.key_file)])
        hosts = {**instance.hosts, "bigquerystorage.googleapis.com": address}
        with harness.background(server, workdir / "storage-server.log",
                                ready="storage server ready"), \
                harness.runners(instance, workdir, hosts) as runners:
            harness.log(f"large: creating the wide table ({args.rows} rows of {args.width} B)")
            runners["direct"].run_agent(["setup", "--rows", str(args.rows), "--width",
                                         str(args.width)])
            for _, setup in harness.rotations(1):
                harness.log(f"large: getQueryResults pages, {setup}")
                run = runners[setup].run_agent(
                    ["pages", "--page-rows", str(args.page_rows), "--repeat", str(args.repeat)],
                    sample=True, timeout=args.timeout)
                runs = run.result["runs"]
                total = sum(r["bytes"] for r in runs)
                seconds = sum(r["seconds"] for r in runs)
                results["pages"][setup] = {
                    "bytes": total, "seconds": seconds, "mib_per_s": total / MIB / seconds,
                    "page_mib": total / MIB / sum(r["pages"] for r in runs),
                    "rss": _rss(run, runs[0]["started"], setup)}
            for mib in args.storage_mib:
                for _, setup in harness.rotations(1):
                    harness.log(f"large: Storage Read of {mib} MiB, {setup}")
                    run = runners[setup].run_agent(["storage", "--table",
                                                    f"bench.synthetic_{mib}"],
                                                   sample=True, timeout=args.timeout)
                    r = run.result
                    results["storage"].setdefault(str(mib), {})[setup] = {
                        "bytes": r["bytes"], "seconds": r["seconds"],
                        "mib_per_s": r["bytes"] / MIB / r["seconds"],
                        "first_message_seconds": r["first_message_seconds"],
                        "rss": _rss(run, r["started"], setup)}
    for kind in ("pages",):
        data = results[kind]
        for setup in data:
            data[setup]["ratio_to_direct"] = harness.ratio(data[setup]["mib_per_s"],
                                                           data["direct"]["mib_per_s"])
    for data in results["storage"].values():
        for setup in data:
            data[setup]["ratio_to_direct"] = harness.ratio(data[setup]["mib_per_s"],
                                                           data["direct"]["mib_per_s"])
    return results


if __name__ == "__main__":
    harness.standalone("large", measure, configure)
