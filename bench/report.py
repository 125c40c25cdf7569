"""Write docs/benchmarks.md from bench/results/*.json and the hand-written bench/analysis.md.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
OUTPUT = BENCH.parent / "docs" / "benchmarks.md"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def machine_section(m: dict[str, Any]) -> list[str]:
    a, g, u = m["appliance"], m["agent"], m["upstream"]
    return [
        "## Machine and run", "",
        f"- Date: {m['started']} (report written {m['date']})",
        f"- Command: `sudo make bench` (runs `.venv/bin/python bench/run_all.py"
        f"{' --quick' if m.get('quick') else ''}`){' - quick sizes' if m.get('quick') else ''}",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory']} memory, kernel "
        f"{m['kernel']}, {m['os']}",
        f"- Appliance: Python {a.get('python')}, bq-session-appliance "
        f"{a.get('bq-session-appliance')}, mitmproxy {a.get('mitmproxy')}, duckdb "
        f"{a.get('duckdb')}, pyroute2 {a.get('pyroute2')}, typer {a.get('typer')}",
        f"- Agent: Python {g.get('python')}, google-cloud-bigquery "
        f"{g.get('google-cloud-bigquery')}, google-cloud-bigquery-storage "
        f"{g.get('google-cloud-bigquery-storage')}, grpcio {g.get('grpcio')}, requests "
        f"{g.get('requests')}, urllib3 {g.get('urllib3')}, pyarrow {g.get('pyarrow')}",
        f"- Upstream: Python {u.get('python')}, local-bigquery {u.get('local-bigquery')}, "
        f"duckdb {u.get('duckdb')}, grpcio {u.get('grpcio')}, pyarrow {u.get('pyarrow')}",
        f"- Tools: {m['nft']}, {m.get('jq') or 'jq missing'}", "",
    ]


def summary_section(results: dict[str, Any]) -> list[str]:
    rows: list[list[str]] = []
    calls = results.get("calls")
    if calls:
        for mode in ("keepalive", "new_connection"):
            for call in ("jobs.query", "jobs.get"):
                for stat in ("p50", "p99"):
                    r = calls["ratios"][f"{mode} {call} {stat}"]["appliance/plain"]
                    rows.append([f"{call} {stat}, {mode.replace('_', ' ')}",
                                 "appliance <= 1.15 x plain", f"{f(r)} x", verdict(r <= 1.15)])
    large = results.get("large")
    if large:
        r = large["pages"]["appliance"]["ratio_to_direct"]
        rows.append(["getQueryResults ~10 MB pages, throughput", ">= 0.5 x direct", f"{f(r)} x",
                     verdict(r >= 0.5)])
        for mib, data in sorted(large["storage"].items(), key=lambda item: -int(item[0])):
            r = data["appliance"]["ratio_to_direct"]
            rows.append([f"Storage Read {mib} MiB, throughput", ">= 0.5 x direct", f"{f(r)} x",
                         verdict(r >= 0.5)])
            rss = data["appliance"]["rss"]
            rows.append([f"Storage Read {mib} MiB, appliance peak RSS - idle",
                         "<= 64 MB, flat", f"{f(rss['growth_mib'], 1)} MiB",
                         verdict(rss["growth_mib"] is not None and rss["growth_mib"] <= 64)])
        rss = large["pages"]["appliance"]["rss"]
        rows.append(["getQueryResults pages, appliance peak RSS - idle", "<= 64 MB",
                     f"{f(rss['growth_mib'], 1)} MiB",
                     verdict(rss["growth_mib"] is not None and rss["growth_mib"] <= 64)])
    recording = results.get("recording")
    if recording:
        added = recording["micro"]["1"]["added_p50_ms"]
        rows.append(["Recording, 1 client, added p50 (journal micro-benchmark)", "<= 1 ms",
                     f"{f(added, 3)} ms", verdict(added <= 1)])
        added = recording["proxy"]["1"]["added_p50_ms"]
        rows.append(["Recording, 1 client, added p50 (appliance - plain, jobs.get)", "<= 1 ms",
                     f"{f(added, 3)} ms", verdict(added <= 1)])
    start = results.get("start")
    if start:
        s = start["without_service"]["median_seconds"]
        rows.append(["Session start `appliance run --agent-cmd true`", "<= 1.5 s",
                     f"{f(s)} s", verdict(s <= 1.5)])
        served = start.get("with_service")
        rows.append(["Session start with the service mode (`appliance serve`)", "<= 0.2 s",
                     f"{f(served['median_seconds'])} s" if served else start["service_mode"],
                     verdict(served["median_seconds"] <= 0.2) if served else "-"])
    concurrency = results.get("concurrency")
    if concurrency:
        rows.append([f"{concurrency['sessions']} sessions x "
                     f"{concurrency['statements_per_session']} statements, errors", "0",
                     f(concurrency["errors"] + concurrency["nonzero_exits"]),
                     verdict(concurrency["errors"] + concurrency["nonzero_exits"] == 0)])
        wrong = concurrency["attribution_errors"] + concurrency["statements_missing_from_store"]
        rows.append(["... attribution errors", "0", f(wrong), verdict(wrong == 0)])
    return ["## Targets", ""] + table(["measure", "target", "result", "verdict"], rows)


def calls_section(calls: dict[str, Any]) -> list[str]:
    lines = ["## Small calls", "",
             f"{calls['calls']} calls of each kind per setup, in {calls['rounds']} rounds with the "
             "order of the setups rotated (the testbed upstream slows down as its job history "
             "grows, so the drift falls on all three alike). Milliseconds, measured in the agent "
             "around the client library call (`query_and_wait(\"SELECT 1\")`, one jobs.query "
             "request each; `get_job`, one jobs.get request each).", ""]
    rows = []
    for mode in ("keepalive", "new_connection"):
        for call in ("jobs.query", "jobs.get"):
            for stat in ("p50", "p99"):
                values = [calls["setups"][s][mode][call][stat] for s in
                          ("direct", "plain", "appliance")]
                ratio = calls["ratios"][f"{mode} {call} {stat}"]
                rows.append([mode.replace("_", " "), call, stat, *[f(v) for v in values],
                             f(ratio["plain/direct"]), f(ratio["appliance/plain"])])
    return lines + table(["connection", "call", "stat", "direct", "plain mitmproxy",
                          "appliance", "plain/direct", "appliance/plain"], rows)


def large_section(large: dict[str, Any]) -> list[str]:
    lines = ["## Large results", ""]
    rows = []
    for setup, data in large["pages"].items():
        rss = data.get("rss") or {}
        rows.append([setup, f(data["page_mib"], 1), f(data["bytes"] / 2**20, 1),
                     f(data["mib_per_s"], 1), f(data["ratio_to_direct"]),
                     f(rss.get("idle_mib"), 1), f(rss.get("peak_mib"), 1)])
    lines += ["getQueryResults, real client, wide rows (JSON page size as received):", ""]
    lines += table(["setup", "page MiB", "total MiB", "MiB/s", "ratio to direct",
                    "proxy idle RSS MiB", "proxy peak RSS MiB"], rows)
    rows = []
    for mib, data in sorted(large["storage"].items(), key=lambda item: -int(item[0])):
        for setup, d in data.items():
            rss = d.get("rss") or {}
            rows.append([mib, setup, f(d["mib_per_s"], 1), f(d["ratio_to_direct"]),
                         f(d["first_message_seconds"], 3), f(rss.get("idle_mib"), 1),
                         f(rss.get("peak_mib"), 1), f(rss.get("growth_mib"), 1)])
    lines += ["Storage Read (synthetic server from the published protos, real "
              "BigQueryReadClient, Arrow batches of about 1 MiB):", ""]
    lines += table(["stream MiB", "setup", "MiB/s", "ratio to direct", "first message s",
                    "proxy idle RSS MiB", "proxy peak RSS MiB", "growth MiB"], rows)
    lines += ["The proxy process is `appliance run` for the appliance and the plain mitmproxy "
              "process for plain; VmRSS is sampled every 50 ms. Idle is the last sample before "
              "the agent started reading.", ""]
    return lines


def recording_section(recording: dict[str, Any]) -> list[str]:
    lines = ["## Recording cost", "",
             "Journal micro-benchmark: asyncio clients appending request-sized events to a real "
             "journal opened by the store (fsync, group commit), against the same loop with no "
             "journal.", ""]
    rows = []
    for clients, data in sorted(recording["micro"].items(), key=lambda kv: int(kv[0])):
        j = data["journal"]
        rows.append([clients, f(j["per_second"], 0), f(j["p50"], 3), f(j["p99"], 3),
                     f(data["none"]["p50"], 4), f(data["added_p50_ms"], 3)])
    lines += table(["clients", "events/s", "p50 ms", "p99 ms", "no-journal p50 ms",
                    "added p50 ms"], rows)
    lines += ["Through the proxy: agent threads, each with its own client and keep-alive "
              "connection, calling jobs.get.", ""]
    rows = []
    for clients, data in sorted(recording["proxy"].items(), key=lambda kv: int(kv[0])):
        rows.append([clients, *[f(data[s]["per_second"], 0) for s in ("direct", "plain",
                                                                        "appliance")],
                     *[f(data[s]["p50"]) for s in ("direct", "plain", "appliance")],
                     f(data["added_p50_ms"]), f(data["rps_ratio"]),
                     f(sum(data[s]["errors"] for s in ("direct", "plain", "appliance")))])
    lines += table(["clients", "direct req/s", "plain req/s", "appliance req/s",
                    "direct p50 ms", "plain p50 ms", "appliance p50 ms",
                    "added p50 ms (appliance - plain)", "req/s appliance/plain", "errors"], rows)
    return lines


def start_section(start: dict[str, Any]) -> list[str]:
    w = start["without_service"]
    lines = ["## Session start", "",
             f"`appliance run --agent-cmd true`, {w['runs']} runs after one warm-up run: median "
             f"{f(w['median_seconds'])} s (min {f(w['min_seconds'])}, max "
             f"{f(w['max_seconds'])}). `appliance --help`: {f(start['cli_help_seconds'])} s. "
             f"Service mode: {start['service_mode']}.", "",
             "Import time in a fresh interpreter (`python -X importtime`), with what each "
             "module pulls in:", ""]
    rows = [[module, f(data["import_seconds"]), ", ".join(f"{n} {s:.2f}" for n, s in
                                                          data["heaviest"][:6])]
            for module, data in start["imports"].items()]
    return lines + table(["module", "import s", "heaviest imports (s)"], rows)


def concurrency_section(c: dict[str, Any]) -> list[str]:
    lines = ["## Concurrency", "",
             f"{c['sessions']} `appliance run` processes started at once, each agent running "
             f"{c['statements_per_session']} jobs.query statements that carry its marker, "
             "against a synthetic jobs.query responder (bench/query_server.py) in the cloud "
             "namespace.", ""]
    rows = [["wall time", f"{f(c['wall_seconds'], 1)} s"],
            ["statements succeeded", f(c["statements_ok"])],
            ["throughput", f"{f(c['statements_per_second'], 1)} statements/s"],
            ["agent errors", f(c["errors"])],
            ["non-zero exits", f(c["nonzero_exits"])],
            ["statements recorded in their own session", f(c["statements_recorded"])],
            ["statements recorded under another session's marker", f(c["attribution_errors"])],
            ["statements missing from the store", f(c["statements_missing_from_store"])]]
    lines += table(["", "value"], rows)
    if c["failures"]:
        lines += ["Failures (first ten):", ""] + [f"- `{x}`" for x in c["failures"]] + [""]
    return lines


def store_section(s: dict[str, Any]) -> list[str]:
    lines = ["## Store", "",
             f"{s['statements']:,} statements in {s['sessions']} sealed sessions "
             f"({s['statements'] * 2 + 2 * s['sessions']:,} events), built through the store's "
             f"own journal and seal code in {f(s['build_seconds'], 0)} s: Parquet "
             f"{f(s['parquet_mib'], 0)} MiB, the same events as JSONL {f(s['jsonl_mib'], 0)} MiB.",
             ""]
    rows = []
    for name, q in s["queries"].items():
        rows.append([name, f"`{q['sql']}`", f(q["sessions_query_seconds"]), f(q["jq_seconds"]),
                     f(q["speedup"], 1), f(q["rows"]), "yes" if q["same_rows_as_jq"] else "NO"])
    lines += table(["question", "SQL", "sessions query s", "jq s", "jq time / query time",
                    "rows", "same answer as jq"], rows)
    lines += ["jq commands:", ""] + [f"- {name}: `{q['jq']}`" for name, q in
                                     s["queries"].items()] + [""]
    v = s["verify"]
    if isinstance(v, dict):
        lines += [f"`appliance sessions verify --all`: {f(v['seconds'], 1)} s for {v['events']:,} "
                  f"events, {f(v['events_per_second'], 0)} events/s (exit code "
                  f"{v['exit_code']}).", ""]
    else:
        lines += [f"`sessions verify`: {v}.", ""]
    return lines


def profile_section(p: dict[str, Any]) -> list[str]:
    lines = ["## Profiles", "",
             "Wall time per addon hook (bench/hook_timing.py; includes waiting for fsync) and "
             "py-spy CPU samples of the appliance process, during keep-alive small calls and "
             "during a Storage Read stream.", ""]
    for name, data in ((k, p[k]) for k in ("small", "storage") if k in p):
        rows = [[hook, f(v["p50"], 3), f(v["p99"], 3), f(v["n"])]
                for hook, v in sorted(data["hooks_ms"].items(), key=lambda kv: -kv[1]["p50"])
                if v["p50"] >= 0.01]
        lines += [f"### {name}", ""]
        if rows:
            lines += ["Addon hooks (ms):", ""] + table(["hook", "p50", "p99", "calls"], rows)
        spy = data["py_spy"]
        lines += [f"{name}: py-spy, {spy['busy_samples']} busy samples of {spy['samples']}; "
                  "busiest frames of the appliance's own code (inclusive %) and leaf frames "
                  "(self %):", ""]
        lines += table(["appliance frame", "%"], [[x, f(y, 1)] for x, y in spy["appliance"][:12]])
        lines += table(["leaf frame", "%"], [[x, f(y, 1)] for x, y in spy["self"][:12]])
    return lines


def main() -> None:
    machine = load("machine")
    if machine is None:
        sys.exit("report: no bench/results/machine.json; run bench/run_all.py first.")
    results = {name: load(name) for name in ("calls", "large", "recording", "start",
                                             "concurrency", "store", "profile")}
    targets = {name: value for name, value in results.items()
               if value is not None and "error" not in value}
    lines = ["# Benchmarks: the cost of being recorded", "",
             "The appliance measured beside a direct connection (no proxy) and plain mitmproxy 12 "
             "in the same transparent setup with no addons. The numbers come from one run "
             "(ratios are within that run; these machines are noisy). Written by "
             "`bench/report.py` from `bench/results/*.json`; the analysis at the end is "
             "`bench/analysis.md`. Benchmarks are not tests: `make test` does not run them.", "",
             "Setups: *direct* routes the agent namespace to the testbed cloud; *plain* "
             "redirects it with the appliance's nftables rules to bench/plain_mitmproxy.py "
             "(core, proxyserver, next_layer, tlsconfig only); *appliance* is `appliance run`. "
             "The agent is the real google-cloud-bigquery client from the agent venv, run as "
             "the Unix user `appliance-bench`, which the benchmarks create if it is missing. "
             "All traffic stays on this machine, in 198.19.109.0/24 (cloud) and "
             "198.18.109.0/24 (sessions and bench namespaces); set BENCH_CLOUD_SUBNET and "
             "BENCH_SESSION_POOL to use others.", ""]
    lines += machine_section(machine)
    lines += summary_section(targets)
    sections = [("calls", calls_section), ("large", large_section),
                ("recording", recording_section), ("start", start_section),
                ("concurrency", concurrency_section), ("store", store_section),
                ("profile", profile_section)]
    for name, render in sections:
        result = results[name]
        if result and "error" in result:
            lines += [f"## {name}: failed", "", "```", result["error"], "```", ""]
        elif result:
            lines += render(result)
    analysis = BENCH / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip(), ""]
    OUTPUT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"report: wrote {OUTPUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
