"""`make bench`: run every benchmark once against one testbed cloud, then write the report.

Each benchmark stores its result in bench/results/<name>.json; bench/report.py turns them, the
machine description and bench/analysis.md into docs/benchmarks.md. Every loop is bounded, all
traffic stays in namespaces on this machine, and everything created is removed at the end.

    sudo .venv/bin/python bench/run_all.py [--quick] [--only calls large ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    bench_calls,
    bench_concurrency,
    bench_large,
    bench_profile,
    bench_recording,
    bench_start,
    bench_store,
    harness,
    report,
)

BENCHMARKS = {
    "calls": bench_calls, "large": bench_large, "recording": bench_recording,
    "start": bench_start, "concurrency": bench_concurrency, "profile": bench_profile,
    "store": bench_store,
}
# Smaller sizes for trying the scripts out; the report says when they were used.
QUICK = {
    "calls": ["--calls", "60", "--rounds", "3"],
    "large": ["--rows", "2000", "--repeat", "1", "--storage-mib", "128", "64"],
    "recording": ["--events", "600", "--calls", "300"],
    "start": ["--runs", "3"],
    "concurrency": ["--sessions", "5", "--statements", "50"],
    "profile": ["--calls", "50", "--storage-mib", "64"],
    "store": ["--statements", "20000", "--sessions", "10"],
}


def parse(name: str, quick: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    BENCHMARKS[name].configure(parser)
    return parser.parse_args(QUICK[name] if quick else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to try things out")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    options = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: benchmarks create namespaces and nftables tables; run as root.")
    names = options.only or list(BENCHMARKS)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    harness.write_result("machine", {**harness.machine(), "started": started,
                                     "quick": options.quick})
    workdir = harness.bench_workdir("all")
    try:
        with harness.cloud(workdir) as instance:
            for name in names:
                if name == "store":
                    continue
                began = time.perf_counter()
                args = parse(name, options.quick)
                try:
                    result = BENCHMARKS[name].measure(instance, _fresh(workdir, name), args)
                except Exception as error:  # noqa: BLE001 - reported, so the other benchmarks still run
                    harness.log(f"{name} failed: {error}")
                    result = {"error": str(error)[-2000:]}
                result["command"] = f"bench/{BENCHMARKS[name].__name__.split('.')[-1]}.py " \
                                    + " ".join(QUICK[name] if options.quick else [])
                result["bench_seconds"] = time.perf_counter() - began
                harness.write_result(name, result)
        if "store" in names:
            began = time.perf_counter()
            result = bench_store.measure(None, _fresh(workdir, "store"),
                                         parse("store", options.quick))
            result["command"] = "bench/bench_store.py " + " ".join(
                QUICK["store"] if options.quick else [])
            result["bench_seconds"] = time.perf_counter() - began
            harness.write_result("store", result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report.main()
    return 0


def _fresh(workdir: Path, name: str) -> Path:
    path = workdir / name
    path.mkdir(mode=0o755)
    return path


if __name__ == "__main__":
    sys.exit(main())
