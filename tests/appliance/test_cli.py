"""The CLI's text and JSON output and exit codes, for every command that needs no session.

Commands run through typer's CliRunner against real stores, CAs and configuration files in
temporary directories; exit codes that `appliance.cli.main` maps from errors are checked through
a real `python -m appliance` process. Stores are private to root, so those tests need root.
`appliance run` itself, `doctor` against the upstream and `sessions tail --follow` on a live
session are covered end to end in tests/e2e/test_operator.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from mitmproxy.certs import CertStore
from typer.testing import CliRunner

from appliance import cli
from appliance.recordings.journal import Journal
from appliance.recordings.schema import SESSION_END, SESSION_START
from appliance.recordings.store import Store

runner = CliRunner()
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the store is private "
                                                          "to root")

SESSION = "20260101T000000Z-0badc0de"
LIVE = "20260101T000100Z-11ve11ve"
START_NS = 1_767_225_600_000_000_000
SQL = "UPDATE `demo-project.shop.orders` SET state = 'void' WHERE id = 7"


def invoke(*args: str) -> Any:
    return runner.invoke(cli.app, list(args))


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real entry point, whose error handling sets the documented exit codes."""
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[2])


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    CertStore.create_store(tmp_path / "ca", "mitmproxy", 2048)
    (tmp_path / "ca").chmod(0o700)
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({
        "store": {"path": str(tmp_path / "store"),
                  "signing_key": str(tmp_path / "keys" / "signing-key.pem")},
        "proxy": {"ca_dir": str(tmp_path / "ca")},
        # Loopback only: the doctor's upstream check must not leave this machine.
        "network": {"hosts": {"bigquery.googleapis.com": "127.0.0.1",
                              "bigquerystorage.googleapis.com": "127.0.0.1"}},
    }))
    return path


def _events(statement: str = "st-000001") -> list[dict[str, Any]]:
    return [
        {"kind": "request", "flow_id": "f1", "statement_id": statement, "host":
         "bigquery.googleapis.com", "method": "POST", "api": "bigquery.v2",
         "api_method": "jobs.query", "project": "demo-project", "sql": SQL},
        {"kind": "response", "flow_id": "f1", "statement_id": statement, "status": 200,
         "api_method": "jobs.query", "statement_type": "UPDATE", "outcome": "done",
         "rows_affected": 1},
        {"kind": "blocked", "flow_id": "f2", "host": "exfil.example.com", "method": "CONNECT",
         "detail": json.dumps({"reason": "host not in the allowlist"})},
    ]


def _record(store: Store, session_id: str, events: list[dict[str, Any]],
            end: bool = True) -> Journal:
    journal = store.open_journal(session_id)
    journal.append_sync({"kind": SESSION_START, "ts_ns": START_NS, "project": "demo-project",
                         "detail": json.dumps({
                             "agent": "analyst", "principal": "analyst@demo.iam",
                             "unix_user": "appliance-agent", "uid": 990, "operator": "alice",
                             "command": "python agent.py", "cwd": "/srv/agent",
                             "namespace": "ap-0badc0de", "agent_address": "198.18.0.2",
                             "proxy_address": "198.18.0.1:15001"})})
    for number, event in enumerate(events, start=1):
        journal.append_sync({"ts_ns": START_NS + number * 1_000_000, **event})
    if end:
        journal.append_sync({"kind": SESSION_END, "ts_ns": START_NS + 10_000_000,
                             "detail": json.dumps({"exit_code": 0})})
    return journal


@pytest.fixture
def store(config_file: Path, tmp_path: Path) -> Iterator[Store]:
    """A store holding one sealed session (SESSION) and one running session (LIVE)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the store is private to root")
    created = Store(tmp_path / "store", signing_key=tmp_path / "keys" / "signing-key.pem")
    created.ensure()
    sealed = _record(created, SESSION, _events())
    sealed.close()
    try:
        created.seal(SESSION)
    finally:
        sealed.release()
    live = _record(created, LIVE, _events(), end=False)
    yield created
    live.close()
    live.release()


# -- help and global options -------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["run"], ["sessions"], ["sessions", "list"],
                                     ["sessions", "replay"], ["sessions", "query"],
                                     ["sessions", "show"], ["sessions", "tail"], ["ca"],
                                     ["ca", "show"], ["ca", "export"], ["doctor"],
                                     ["serve"]])
def test_help_exits_zero(command: list[str]) -> None:
    result = invoke(*command, "--help")

    assert result.exit_code == 0
    assert "Usage:" in result.stdout


def test_top_help_lists_commands() -> None:
    result = invoke("--help")

    for name in ("run", "sessions", "ca", "doctor"):
        assert name in result.stdout


def test_unknown_log_level_rejected() -> None:
    result = invoke("--log-level", "loud", "sessions", "list")

    assert result.exit_code == 2
    assert "loud" in result.stderr


# -- exit codes through the real entry point ---------------------------------------------------


@pytest.mark.parametrize(("args", "code", "words"), [
    (["sessions", "list", "--config", "/nonexistent/appliance.yaml"], 2, "not found"),
    (["run", "--agent-cmd", "true", "--agent", "nobody", "--config", "{config}"], 2,
     "'nobody' is not defined"),
    (["run", "--agent-cmd", "true", "--env", "NOEQUALS", "--config", "{config}"], 2,
     "KEY=VALUE"),
    (["ca", "export", "{config}", "--config", "{config}"], 2, "--force"),
    (["sessions", "show", "20990101T000000Z-00000000", "--config", "{config}"], 6,
     "is not in the store"),
    (["sessions", "query", "SELEC nonsense", "--config", "{config}"], 5, "query failed"),
])
def test_errors_exit_with_documented_code(args: list[str], code: int, words: str,
                                          config_file: Path) -> None:
    if code in (5, 6) and os.geteuid() != 0:
        pytest.skip("needs root: the store is private to root")
    (config_file.parent / "store").mkdir(mode=0o700, exist_ok=True)
    result = appliance(*[arg.replace("{config}", str(config_file)) for arg in args])

    assert result.returncode == code
    assert words in result.stderr
    assert result.stderr.startswith("appliance: error: ")


# -- ca ----------------------------------------------------------------------------------------


def test_ca_show_prints_certificate_only(config_file: Path) -> None:
    result = invoke("ca", "show", "--config", str(config_file))

    assert result.exit_code == 0
    assert "SHA-256" in result.stdout
    assert "-----BEGIN CERTIFICATE-----" in result.stdout
    assert "PRIVATE KEY" not in result.stdout


def test_ca_show_json_matches_file(config_file: Path) -> None:
    result = invoke("ca", "show", "--json", "--config", str(config_file))
    document = json.loads(result.stdout)
    certificate = (config_file.parent / "ca" / "mitmproxy-ca-cert.pem").read_text()

    assert document["pem"] == certificate
    assert document["subject"] == \
        x509.load_pem_x509_certificate(certificate.encode()).subject.rfc4514_string()
    assert "PRIVATE KEY" not in result.stdout


def test_ca_export_writes_public_certificate(config_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "export" / "ca.pem"
    target.parent.mkdir()

    result = invoke("ca", "export", str(target), "--config", str(config_file))

    assert result.exit_code == 0
    assert "wrote the CA certificate" in result.stderr
    assert target.read_bytes() == (config_file.parent / "ca" / "mitmproxy-ca-cert.pem") \
        .read_bytes()
    assert b"PRIVATE KEY" not in target.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_ca_export_force_overwrites(config_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "ca.pem"
    target.write_text("old")

    result = invoke("ca", "export", str(target), "--force", "--json", "--config",
                    str(config_file))

    assert result.exit_code == 0
    assert json.loads(result.stdout)["path"] == str(target)
    assert target.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_ca_export_dash_writes_stdout(config_file: Path) -> None:
    result = invoke("ca", "export", "-", "--config", str(config_file))

    assert result.stdout.startswith("-----BEGIN CERTIFICATE-----")


@needs_root
def test_ca_show_creates_missing_ca_privately(tmp_path: Path) -> None:
    config_path = tmp_path / "appliance.yaml"
    config_path.write_text(yaml.safe_dump({"proxy": {"ca_dir": str(tmp_path / "new-ca")}}))

    result = invoke("ca", "show", "--config", str(config_path))

    assert result.exit_code == 0
    assert stat.S_IMODE((tmp_path / "new-ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new-ca" / "mitmproxy-ca.pem").stat().st_mode) == 0o600


# -- doctor ------------------------------------------------------------------------------------


@needs_root
def test_doctor_json_reports_each_check(config_file: Path) -> None:
    result = invoke("doctor", "--json", "--config", str(config_file))
    document = json.loads(result.stdout)
    by_name = {check["name"]: check for check in document["checks"]}

    assert result.exit_code == 8
    assert document["ok"] is False
    for name in ("root", "python", "packages", "netns", "veth", "nftables", "config", "ca"):
        assert by_name[name]["ok"], by_name[name]
    assert not by_name["upstream bigquery"]["ok"]
    assert "127.0.0.1:443" in by_name["upstream bigquery"]["detail"]
    assert by_name["upstream bigquery"]["fix"]


@needs_root
def test_doctor_flags_readable_ca_directory(config_file: Path) -> None:
    (config_file.parent / "ca").chmod(0o755)

    result = invoke("doctor", "--json", "--config", str(config_file))
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}

    assert not checks["ca"]["ok"]
    assert "mode 0755" in checks["ca"]["detail"]
    assert "chmod 0700" in checks["ca"]["fix"]


@needs_root
def test_doctor_removes_its_throwaway_objects(config_file: Path) -> None:
    invoke("doctor", "--config", str(config_file))

    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout
    assert f"appliance_doctor_{os.getpid()}" not in namespaces
    assert f"appliance_doctor_{os.getpid()}" not in tables


def test_doctor_table_shows_failure_and_fix(config_file: Path) -> None:
    result = invoke("doctor", "--config", str(config_file))

    assert "FAIL" in result.stdout
    assert "fix:" in result.stdout
    assert "checks failed" in result.stderr


def test_doctor_reports_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("proxy:\n  port: 70000\n")

    result = invoke("doctor", "--json", "--config", str(path))
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}

    assert result.exit_code == 8
    assert "proxy.port" in checks["config"]["detail"]
    assert "70000" in checks["config"]["detail"]


# -- sessions show -----------------------------------------------------------------------------


def test_show_text_has_identity_counts_integrity(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "show", SESSION, "--config", str(config_file))

    assert result.exit_code == 0
    assert f"Session {SESSION}" in result.stdout
    assert "principal    analyst@demo.iam" in result.stdout
    assert "operator     alice" in result.stdout
    assert "1 done" in result.stdout
    assert "1 blocked" in result.stdout
    assert "integrity    intact" in result.stdout


def test_show_json_document(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "show", SESSION, "--json", "--config", str(config_file))
    document = json.loads(result.stdout)

    assert document["session"]["status"] == "completed"
    assert document["identity"]["uid"] == 990
    assert document["identity"]["namespace"] == "ap-0badc0de"
    assert document["counts"]["statements_by_outcome"] == {"done": 1}
    assert document["counts"]["events_by_kind"]["request"] == 1
    assert document["integrity"]["status"] == "intact"
    assert document["integrity"]["checked_events"] == 5


def test_show_running_session(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "show", LIVE, "--json", "--config", str(config_file))
    document = json.loads(result.stdout)

    assert document["session"]["status"] == "running"
    assert document["integrity"]["status"] == "running (intact so far)"


def test_show_tampered_session_exits_7(store: Store, config_file: Path) -> None:
    parquet = next(store.sessions_dir.glob("*/*.parquet"))
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    parquet.write_bytes(bytes(data))

    result = invoke("sessions", "show", SESSION, "--json", "--config", str(config_file))

    assert result.exit_code == 7
    assert json.loads(result.stdout)["integrity"]["status"] == "broken"


# -- sessions tail, list, replay, query --------------------------------------------------------


def test_tail_prints_running_statements(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "tail", "--config", str(config_file))
    lines = result.stdout.splitlines()

    assert result.exit_code == 0
    assert any(LIVE in line and "started: agent analyst" in line for line in lines)
    assert any(f"st-000001 jobs.query: {SQL}" in line for line in lines)
    assert any("st-000001 -> done UPDATE, 1 rows" in line for line in lines)
    assert any("blocked exfil.example.com" in line for line in lines)
    assert not any(SESSION in line for line in lines)


def test_tail_json_lines(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "tail", LIVE, "--json", "--config", str(config_file))
    records = [json.loads(line) for line in result.stdout.splitlines()]

    assert [r["kind"] for r in records] == ["session_start", "request", "response", "blocked"]
    assert records[1]["sql"] == SQL
    assert records[2]["outcome"] == "done"
    assert all(r["session_id"] == LIVE for r in records)


def test_tail_finished_session_reads_sealed(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "tail", SESSION, "--follow", "--json", "--config",
                    str(config_file))
    kinds = [json.loads(line)["kind"] for line in result.stdout.splitlines()]

    assert result.exit_code == 0
    assert kinds == ["session_start", "request", "response", "blocked", "session_end"]


def test_list_json_has_both_sessions(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "list", "--json", "--config", str(config_file))
    statuses = {row["session_id"]: row["status"] for row in json.loads(result.stdout)}

    assert statuses == {SESSION: "completed", LIVE: "running"}


def test_replay_text_shows_sql(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "replay", SESSION, "--config", str(config_file))

    assert result.exit_code == 0
    assert SQL in result.stdout
    assert "principal analyst@demo.iam" in result.stdout


def test_query_csv_header_and_row(store: Store, config_file: Path) -> None:
    result = invoke("sessions", "query", "SELECT statement_type, rows_affected FROM statements "
                    f"WHERE session_id = '{SESSION}'", "--csv", "--config", str(config_file))

    assert result.stdout.splitlines() == ["statement_type,rows_affected", "UPDATE,1"]
