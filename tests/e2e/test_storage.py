"""The BigQuery Storage Read and Write gRPC APIs through the appliance, end to end.

The agent runs the published google-cloud-bigquery-storage clients (tests/e2e/storage_agent.py)
in a session: reads go to local-bigquery's Read API, writes to the testbed's Write server,
which logs the SHA-256 of every AppendRowsRequest it received.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from testbed.cloud import Cloud
from tests.e2e.conftest import Appliance, session_id_of, write_config

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
LARGE_ROWS = 200_000
READ = "BigQueryRead"
WRITE = "BigQueryWrite"


def run_storage_agent(appliance: Appliance, cloud: Cloud, *commands: str) -> tuple[str, list[Any]]:
    """Run storage_agent.py once per command in one session; return its id and the outputs."""
    shutil.copy(HERE / "storage_agent.py", appliance.workspace / "storage_agent.py")
    script = " && ".join(f"python storage_agent.py {command}" for command in commands)
    result = appliance.run_agent(script, timeout=240)
    outputs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outputs) == sum(1 for c in commands if not c.startswith("setup")), result.stdout
    return session_id_of(result), outputs


def storage_appliance(cloud: Cloud, agent_python: str, shared_dirs: dict[str, Path],
                      base: Path, workspace: Path) -> Appliance:
    """An appliance whose agent profile mints real tokens from a testbed service account."""
    assert cloud.identities is not None
    allow = ["bigquery.googleapis.com", "bigquerystorage.googleapis.com", "www.googleapis.com"]
    write_config(base / "appliance.yaml", cloud, base / "store", shared_dirs, agents={
        "storage-agent": {"project": cloud.project, "allow_hosts": allow,
                          "credentials": {"source": "service_account_key",
                                          "file": str(cloud.identities.service_account_key)}}})
    return Appliance(base / "appliance.yaml", base / "store", agent_python, workspace)


def events(appliance: Appliance, session_id: str, where: str) -> list[dict[str, Any]]:
    return appliance.query(
        "SELECT kind, statement_id, api_method, status, outcome, error_reason, error_message, "
        "rows_returned, rows_affected, request_bytes, response_bytes, project, dataset_id, "
        "table_id, statement_type, detail FROM events "
        f"WHERE session_id = '{session_id}' AND {where} ORDER BY seq")


def detail(event: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(str(event["detail"]))
    assert isinstance(value, dict)
    return value


@pytest.fixture(scope="module")
def read_session(cloud: Cloud, agent_python: str, shared_dirs: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[Appliance, str, list[Any]]:
    """One session that loads a 200k-row table, reads it, and reads a query's result."""
    workspace = Path(tempfile.mkdtemp(prefix="appliance-agent-", dir="/tmp"))
    workspace.chmod(0o755)
    appliance = storage_appliance(cloud, agent_python, shared_dirs,
                                  tmp_path_factory.mktemp("storage-read"), workspace)
    sql = f"SELECT x FROM UNNEST(GENERATE_ARRAY(1, {LARGE_ROWS})) AS x"
    try:
        session_id, outputs = run_storage_agent(
            appliance, cloud, f"setup {cloud.project} storage_read.people {LARGE_ROWS}",
            f"read {cloud.project} storage_read.people", f"arrow {cloud.project} '{sql}'")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return appliance, session_id, outputs


def test_read_rows_match_table(read_session: tuple[Appliance, str, list[Any]]) -> None:
    _, _, (read, _) = read_session
    assert read["rows"] == LARGE_ROWS
    assert read["id_sum"] == LARGE_ROWS * (LARGE_ROWS + 1) // 2
    assert read["resumed_rows"] == 2


def test_read_session_recorded_as_statement(
        read_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = read_session
    rows = appliance.query(
        "SELECT api_method, statement_type, outcome, dataset_id, table_id, rows_returned, "
        f"requests FROM statements WHERE session_id = '{session_id}' "
        f"AND api_method = '{READ}.CreateReadSession' AND table_id = 'people'")
    assert rows == [{"api_method": f"{READ}.CreateReadSession", "statement_type": "STORAGE_READ",
                     "outcome": "done", "dataset_id": "storage_read", "table_id": "people",
                     "rows_returned": LARGE_ROWS, "requests": 3}]


def test_read_session_request_fields(read_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = read_session
    (request,) = events(appliance, session_id, f"kind = 'request' AND api_method = "
                                               f"'{READ}.CreateReadSession' AND table_id = 'people'")
    fields = detail(request)["storage"]
    assert fields["selected_fields"] == ["id", "name"]
    assert fields["row_restriction"] == "id > 0"
    assert fields["data_format"] == "ARROW"


def test_resumed_read_not_double_counted(read_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = read_session
    outcomes = events(appliance, session_id, f"kind = 'response' AND api_method = "
                                             f"'{READ}.ReadRows' AND table_id = 'people'")
    assert [event["rows_returned"] for event in outcomes] == [LARGE_ROWS, 0]
    assert [detail(event)["storage"]["rows_repeated"] for event in outcomes] == [0, 2]
    assert [detail(event)["storage"]["offset"] for event in outcomes] == [0, LARGE_ROWS - 2]


def test_read_stream_digest_and_bytes(read_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = read_session
    first = events(appliance, session_id, f"kind = 'response' AND api_method = "
                                          f"'{READ}.ReadRows' AND table_id = 'people'")[0]
    stream = detail(first)["response_stream"]
    assert first["response_bytes"] == stream["bytes"]
    assert stream["bytes"] > LARGE_ROWS  # At least one byte per row has passed.
    assert len(stream["sha256"]) == 64
    assert "decode_error" not in stream
    assert detail(first)["grpc"]["name"] == "OK"


def test_query_result_read_linked_to_query(
        read_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, (_, arrow) = read_session
    assert arrow["rows"] == LARGE_ROWS
    assert arrow["x_sum"] == LARGE_ROWS * (LARGE_ROWS + 1) // 2
    statements = appliance.query(
        "SELECT statement_id, api_method, job_id, table_id, rows_returned FROM statements "
        f"WHERE session_id = '{session_id}' ORDER BY statement_index")
    query = next(s for s in statements if s["job_id"] == arrow["job_id"])
    reads = events(appliance, session_id, f"kind = 'request' AND api_method = "
                                          f"'{READ}.CreateReadSession'")
    linked = [detail(e)["storage"].get("source_statement_id") for e in reads]
    assert query["statement_id"] in linked


def test_query_result_rows_counted(read_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, (_, arrow) = read_session
    destination = arrow["destination"].split(".")[-1]
    rows = appliance.query(
        "SELECT rows_returned FROM statements WHERE session_id = "
        f"'{session_id}' AND api_method = '{READ}.CreateReadSession' "
        f"AND table_id = '{destination}'")
    assert rows == [{"rows_returned": LARGE_ROWS}]


def test_dataframe_through_storage_api(read_session: tuple[Appliance, str, list[Any]]) -> None:
    _, _, (_, arrow) = read_session
    assert arrow["dataframe"] == 5000


@pytest.fixture(scope="module")
def write_session(cloud: Cloud, agent_python: str, shared_dirs: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Appliance, str, list[Any]]:
    """One session that writes through the Write API and provokes its errors."""
    workspace = Path(tempfile.mkdtemp(prefix="appliance-agent-", dir="/tmp"))
    workspace.chmod(0o755)
    appliance = storage_appliance(cloud, agent_python, shared_dirs,
                                  tmp_path_factory.mktemp("storage-write"), workspace)
    try:
        session_id, outputs = run_storage_agent(
            appliance, cloud, f"write {cloud.project} storage_write.orders",
            f"errors {cloud.project} storage_write")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return appliance, session_id, outputs


def received(cloud: Cloud, write_stream: str) -> list[dict[str, Any]]:
    lines = cloud.storage_write_log.read_text().splitlines()
    return [entry for entry in map(json.loads, lines)
            if entry.get("write_stream") == write_stream and entry["event"] == "append"]


def test_appends_arrive_byte_exact(cloud: Cloud,
                                   write_session: tuple[Appliance, str, list[Any]]) -> None:
    _, _, (write, _) = write_session
    assert [entry["sha256"] for entry in received(cloud, write["write_stream"])] == \
        [sent["sha256"] for sent in write["sent"]]


def test_appended_rows_arrive(cloud: Cloud,
                              write_session: tuple[Appliance, str, list[Any]]) -> None:
    _, _, (write, _) = write_session
    values = [row for entry in received(cloud, write["write_stream"])[:3]
              for row in entry["values"]]
    assert values == [{"id": str(number), "name": name} for number, name in
                      [(1, "ada"), (2, "grace"), (3, "edsger"), (4, "barbara"), (5, "donald"),
                       (6, "frances")]]


def test_append_results_reach_agent(write_session: tuple[Appliance, str, list[Any]]) -> None:
    _, _, (write, _) = write_session
    assert [r["offset"] for r in write["responses"]] == [0, 2, 5, None]
    assert write["responses"][3]["error"] == 6  # ALREADY_EXISTS, in band.
    assert write["row_count"] == 6
    assert write["committed"] is True


def test_append_events_recorded(write_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, (write, _) = write_session
    messages = events(appliance, session_id, f"kind = 'stream_message' AND api_method = "
                                             f"'{WRITE}.AppendRows'")
    requests = [detail(e) for e in messages if detail(e)["direction"] == "request"]
    assert [(d["storage"].get("offset"), d["storage"]["rows"]) for d in requests] == \
        [(s["offset"], s["rows"]) for s in write["sent"]]
    assert [d["sha256"] for d in requests] == [s["sha256"] for s in write["sent"]]


def test_append_refusal_recorded(write_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = write_session
    messages = events(appliance, session_id, f"kind = 'stream_message' AND api_method = "
                                             f"'{WRITE}.AppendRows'")
    results = [detail(e)["storage"] for e in messages if detail(e)["direction"] == "response"]
    assert [r.get("offset") for r in results] == [0, 2, 5, None]
    assert results[3]["error"]["status"] == "ALREADY_EXISTS"


def test_write_statement_recorded(write_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = write_session
    rows = appliance.query(
        "SELECT api_method, statement_type, outcome, table_id, rows_affected, requests "
        f"FROM statements WHERE session_id = '{session_id}' AND table_id = 'orders'")
    assert rows == [{"api_method": f"{WRITE}.CreateWriteStream",
                     "statement_type": "STORAGE_WRITE", "outcome": "done",
                     "table_id": "orders", "rows_affected": 6, "requests": 5}]


def test_write_calls_attach_in_order(write_session: tuple[Appliance, str, list[Any]]) -> None:
    appliance, session_id, _ = write_session
    requests = events(appliance, session_id, "kind = 'request' AND table_id = 'orders'")
    assert [e["api_method"] for e in requests] == [
        f"{WRITE}.CreateWriteStream", f"{WRITE}.AppendRows", f"{WRITE}.GetWriteStream",
        f"{WRITE}.FinalizeWriteStream", f"{WRITE}.BatchCommitWriteStreams"]
    assert len({e["statement_id"] for e in requests}) == 1


@pytest.mark.parametrize(("case", "code", "reason"), [
    ("denied", "PERMISSION_DENIED", None),
    ("missing", "NOT_FOUND", "STREAM_NOT_FOUND"),
])
def test_errors_reach_agent_unchanged(write_session: tuple[Appliance, str, list[Any]],
                                      case: str, code: str, reason: str | None) -> None:
    _, _, (_, errors) = write_session
    assert errors[case]["code"] == code
    assert errors[case]["reason"] == reason


@pytest.mark.parametrize(("method", "code"), [
    ("CreateWriteStream", "PERMISSION_DENIED"),
    ("FinalizeWriteStream", "NOT_FOUND"),
])
def test_errors_recorded(write_session: tuple[Appliance, str, list[Any]], method: str,
                         code: str) -> None:
    appliance, session_id, (_, errors) = write_session
    case = "denied" if code == "PERMISSION_DENIED" else "missing"
    (outcome,) = events(appliance, session_id, f"kind = 'response' AND api_method = "
                                               f"'{WRITE}.{method}' AND outcome = 'error'")
    assert (outcome["error_reason"], outcome["error_message"]) == \
        (code, errors[case]["message"])
    assert detail(outcome)["trailers_only"] is True
