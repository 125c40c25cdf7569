"""appliance run, end to end: a real client library as the agent, in a real namespace, through
the embedded mitmproxy, against the local upstream over TLS, read back with the real CLI."""

from __future__ import annotations

import datetime
import shutil
import subprocess

import pytest

from tests.e2e.conftest import REPO, AGENT_USER, Appliance, session_id_of

pytestmark = pytest.mark.e2e

EXAMPLE_SQL = [
    "SELECT name, tier, spend FROM `demo-project.{dataset}.profiles` ORDER BY name",
    "UPDATE `demo-project.{dataset}.profiles` SET tier = 'gold' WHERE spend > 10000",
    "DELETE FROM `demo-project.{dataset}.profiles` WHERE spend < 1000",
    "SELECT name FROM `demo-project.{dataset}.profiles` WHERE tier = @tier ORDER BY name",
]


def run_example(appliance: Appliance, dataset: str) -> subprocess.CompletedProcess[str]:
    """Run examples/agent.py against its own dataset, so tests sharing the cloud don't mix."""
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")
    return appliance.run_agent("python agent.py", "--env", f"AGENT_DATASET={dataset}")


def _timestamp(value: object) -> datetime.datetime:
    assert isinstance(value, str)
    return datetime.datetime.fromisoformat(value.rstrip("Z"))


def test_example_agent_replayed_in_order(appliance: Appliance) -> None:
    result = run_example(appliance, "replay_order")
    session_id = session_id_of(result)
    assert "updated rows: 2" in result.stdout
    assert "deleted rows: 1" in result.stdout
    assert f"session {session_id} completed: 7 statements" in result.stderr

    replay = appliance.replay(session_id)
    session = replay["session"]
    assert session["agent"] == "default"
    assert session["unix_user"] == AGENT_USER
    assert session["operator"] == "root"
    assert session["status"] == "completed"
    assert session["exit_code"] == 0

    statements = replay["statements"]
    methods = [s["api_method"] for s in statements]
    assert methods == ["datasets.insert", "tables.insert", "tabledata.insertAll", "jobs.query",
                       "jobs.insert", "jobs.insert", "jobs.query"]
    assert [s["sql"] for s in statements if s["sql"]] == \
        [sql.format(dataset="replay_order") for sql in EXAMPLE_SQL]
    assert [s["statement_index"] for s in statements] == list(range(1, 8))
    assert all(s["outcome"] == "done" for s in statements)
    by_type = {s["statement_type"]: s for s in statements if s["statement_type"]}
    assert by_type["UPDATE"]["rows_affected"] == 2
    assert by_type["DELETE"]["rows_affected"] == 1
    assert by_type["UPDATE"]["job_id"]
    assert statements[3]["rows_returned"] == 3
    requested = [_timestamp(s["requested_at"]) for s in statements]
    assert requested == sorted(requested)
    assert len(set(requested)) == len(requested)
    for statement in statements:
        assert _timestamp(statement["requested_at"]) <= _timestamp(statement["responded_at"])
    parameters = statements[6]["parameters"]
    assert '"name": "tier"' in parameters and '"value": "gold"' in parameters


def test_query_json_and_csv(appliance: Appliance) -> None:
    session_id = session_id_of(run_example(appliance, "query_formats"))
    sql = ("SELECT statement_index, statement_type, rows_affected FROM statements "
           f"WHERE session_id = '{session_id}' AND statement_type IN ('UPDATE', 'DELETE') "
           "ORDER BY statement_index")
    rows = appliance.query(sql)
    assert rows == [{"statement_index": 5, "statement_type": "UPDATE", "rows_affected": 2},
                    {"statement_index": 6, "statement_type": "DELETE", "rows_affected": 1}]
    csv_text = appliance.cli("sessions", "query", sql, "--csv").stdout
    assert csv_text.splitlines() == ["statement_index,statement_type,rows_affected",
                                     "5,UPDATE,2", "6,DELETE,1"]
    table = appliance.cli("sessions", "query", sql).stdout
    assert "UPDATE" in table and "DELETE" in table
    listed = appliance.cli("sessions", "list", "--json").stdout
    assert session_id in listed


def test_invalid_query_is_one_line_error(appliance: Appliance) -> None:
    appliance.run_agent("true")
    result = appliance.cli("sessions", "query", "SELECT nope FROM statements", check=False)
    assert result.returncode == 5
    assert result.stderr.startswith("appliance: error: The query failed:")
    assert "Traceback" not in result.stderr


def test_replay_unknown_session_exits_6(appliance: Appliance) -> None:
    appliance.run_agent("true")
    result = appliance.cli("sessions", "replay", "no-such-session", check=False)
    assert result.returncode == 6
    assert "no-such-session" in result.stderr


def test_agent_exit_code_returned(appliance: Appliance) -> None:
    result = appliance.run_agent("echo out; echo err >&2; exit 7", check_exit=7)
    assert result.stdout == "out\n"
    assert "err\n" in result.stderr
    assert "agent exit code 7" in result.stderr


def test_agent_stdin_forwarded(appliance: Appliance) -> None:
    result = subprocess.run(appliance.command("run", "--agent-cmd", "tr a-z A-Z"),
                            input="hello agent\n", capture_output=True, text=True, timeout=60,
                            cwd=appliance.workspace, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HELLO AGENT\n"


def test_agent_runs_unprivileged(appliance: Appliance) -> None:
    result = appliance.run_agent(
        "id -un; grep NoNewPrivs /proc/self/status; cat /proc/sys/net/ipv6/conf/all/disable_ipv6")
    lines = result.stdout.split("\n")
    assert lines[0] == AGENT_USER
    assert lines[1].split() == ["NoNewPrivs:", "1"]
    assert lines[2] == "1"


@pytest.mark.needs_bq
def test_bq_update_command_recorded(appliance: Appliance) -> None:
    if shutil.which("bq") is None:
        pytest.skip("the bq command (Google Cloud CLI) is not installed on this machine")
    shutil.copy(REPO / "examples" / "agent.py", appliance.workspace / "agent.py")
    command = ("bq query --use_legacy_sql=false "
               "'UPDATE customers.profiles SET tier = \"gold\" WHERE spend > 10000'")
    result = appliance.run_agent(f"python agent.py >/dev/null && {command}")
    assert "Number of affected rows: 2" in result.stdout
    statements = appliance.replay(session_id_of(result))["statements"]
    last = statements[-1]
    assert last["sql"] == 'UPDATE customers.profiles SET tier = "gold" WHERE spend > 10000'
    assert last["api_method"] == "jobs.insert"
    assert last["outcome"] == "done"
    assert last["rows_affected"] == 2
