"""BigQuery REST decoding end to end: real client libraries as the agent, through the appliance,
against the local upstream, with the statements read back from the store.

The google-cloud-bigquery walk (tests/e2e/agents/bq_paths.py) runs once per module and the tests
below check its recording from different sides. pandas-gbq and the Node client run a session
each.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.cloud import Cloud
from tests.e2e.conftest import Appliance, session_id_of, write_config

pytestmark = pytest.mark.e2e

AGENTS = Path(__file__).parent / "agents"
DATASET = "decoding_walk"


@dataclass
class Walk:
    """One recorded run of bq_paths.py: the agent's own report and the recorded statements."""

    appliance: Appliance
    session_id: str
    said: dict[str, dict[str, Any]]
    statements: list[dict[str, Any]]
    text_replay: str

    def by_job(self, job_id: str) -> dict[str, Any]:
        found = [s for s in self.statements if s["job_id"] == job_id]
        assert len(found) == 1, f"{len(found)} statements for job {job_id}"
        return found[0]

    def by_sql(self, fragment: str) -> list[dict[str, Any]]:
        return [s for s in self.statements if fragment in (s["sql"] or "")]


@pytest.fixture(scope="module")
def walk(cloud: Cloud, agent_python: str, shared_dirs: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    directory = tmp_path_factory.mktemp("walk")
    workspace = Path(tempfile.mkdtemp(prefix="appliance-agent-", dir="/tmp"))
    workspace.chmod(0o755)
    try:
        write_config(directory / "appliance.yaml", cloud, directory / "store", shared_dirs)
        appliance = Appliance(directory / "appliance.yaml", directory / "store", agent_python,
                              workspace)
        shutil.copy(AGENTS / "bq_paths.py", workspace / "bq_paths.py")
        result = appliance.run_agent("python bq_paths.py", "--env", f"AGENT_DATASET={DATASET}")
        said = {}
        for line in result.stdout.splitlines():
            record = json.loads(line)
            said[record["step"]] = record
        session_id = session_id_of(result)
        full = appliance.cli("sessions", "replay", session_id, "--json").stdout
        text = appliance.cli("sessions", "replay", session_id).stdout
        statements = appliance.query(
            f"SELECT * FROM statements WHERE session_id = '{session_id}' "
            "ORDER BY statement_index")
        assert json.loads(full)["statements"]
        yield Walk(appliance, session_id, said, statements, text)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def test_walk_agent_finished(walk: Walk) -> None:
    assert "done" in walk.said


def test_paged_query_is_one_statement(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_select")
    assert statement["requests"] >= 3
    assert statement["rows_returned"] == 7
    assert statement["outcome"] == "done"


def test_result_pages_are_digested(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_select")
    assert statement["result_bytes"] > 0
    assert len(statement["result_digests"]) >= 3
    assert all(d.startswith("sha256:") and len(d) == 71 for d in statement["result_digests"])


def test_no_event_stores_result_rows(walk: Walk) -> None:
    rows = walk.appliance.query(
        f"SELECT count(*) AS n FROM events WHERE session_id = '{walk.session_id}' "
        "AND (detail LIKE '%result_rows%' OR detail LIKE '%resumable row%')")
    assert rows == [{"n": 0}]


def test_parameters_recorded_beside_sql(walk: Walk) -> None:
    [statement] = walk.by_sql("@min_id")
    parameters = json.loads(statement["parameters"])
    assert [p["name"] for p in parameters] == ["min_id", "names", "f"]
    assert parameters[2]["parameterType"]["type"] == "STRUCT"
    assert "@names" in statement["sql"]


def test_dry_run_recorded_as_estimate(walk: Walk) -> None:
    [statement] = [s for s in walk.statements if s["dry_run"]]
    assert statement["bytes_processed"] is None
    assert statement["estimated_bytes"] == walk.said["dry_run"]["bytes"]
    assert statement["destructive"] is False


def test_script_children_attach_to_parent(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_script")
    assert statement["statement_type"] == "SCRIPT"
    assert sorted(statement["child_job_ids"]) == walk.said["script"]["children"]
    others = [s for s in walk.statements if s["job_id"] in walk.said["script"]["children"]]
    assert others == []


@pytest.mark.parametrize(("job", "job_type", "upload_bytes"), [
    ("multipart", "LOAD", "multipart"),
    ("resumable", "LOAD", "resumable"),
])
def test_uploads_are_one_load_statement(walk: Walk, job: str, job_type: str,
                                        upload_bytes: str) -> None:
    statement = walk.by_job(f"{DATASET}_{job}")
    assert statement["job_type"] == job_type
    assert statement["upload_bytes"] == walk.said[upload_bytes]["bytes"]
    assert statement["outcome"] == "done"
    assert statement["source_format"] == "CSV"


def test_resumable_upload_chunks_attach(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_resumable")
    assert statement["requests"] >= 4


def test_extract_records_destination_uri(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_extract")
    assert json.loads(statement["destination_uris"]) == [f"gs://agent-bucket/{DATASET}/out.csv"]
    assert statement["job_type"] == "EXTRACT"


def test_copy_records_sources(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_copy")
    assert json.loads(statement["source_tables"]) == [f"demo-project.{DATASET}.loaded"]
    assert statement["table_id"] == "copied"


def test_bigquery_session_kept_apart(walk: Walk) -> None:
    session_id = walk.said["bq_session"]["session_id"]
    actions = [s["bq_session_action"] for s in walk.statements
               if s["bq_session_id"] == session_id]
    assert actions == ["create", "use", "abort"]
    assert session_id != walk.session_id


def test_legacy_host_decoded(walk: Walk) -> None:
    rows = walk.appliance.query(
        f"SELECT api_method FROM events WHERE session_id = '{walk.session_id}' "
        "AND host = 'www.googleapis.com' AND kind = 'request'")
    assert {"api_method": "jobs.query"} in rows


@pytest.mark.parametrize(("method", "fragment"), [
    ("jobs.query", "TRUNCATE TABLE"),
    ("tables.delete", None),
    ("datasets.delete", None),
])
def test_destructive_statements_flagged(walk: Walk, method: str, fragment: str | None) -> None:
    found = [s for s in walk.statements if s["api_method"] == method
             and (fragment is None or fragment in (s["sql"] or ""))]
    assert [s["destructive"] for s in found] == [True]


def test_replay_marks_destructive(walk: Walk) -> None:
    marked = [line for line in walk.text_replay.splitlines() if "DESTRUCTIVE" in line]
    assert len(marked) == 3


def test_job_label_visible_upstream(walk: Walk) -> None:
    labels = walk.said["labels"]["labels"]
    assert labels == {"team": "agents", "appliance-session": walk.session_id.lower()}


def test_sql_recorded_from_original_body(walk: Walk) -> None:
    statement = walk.by_job(f"{DATASET}_select")
    assert json.loads(statement["labels"]) == {"team": "agents"}


def test_tabledata_list_rows_counted(walk: Walk) -> None:
    [statement] = [s for s in walk.statements if s["api_method"] == "tabledata.list"]
    assert statement["rows_returned"] == walk.said["tabledata"]["rows"]


def test_pandas_gbq_read_recorded(appliance: Appliance) -> None:
    script = ("import pandas_gbq\n"
              "frame = pandas_gbq.read_gbq('SELECT x FROM UNNEST([1, 2, 3]) AS x', "
              "project_id='demo-project', use_bqstorage_api=False, progress_bar_type=None)\n"
              "print(len(frame))\n")
    (appliance.workspace / "read.py").write_text(script)
    result = appliance.run_agent("python read.py")
    assert result.stdout.strip() == "3"
    statements = appliance.replay(session_id_of(result))["statements"]
    queries = [s for s in statements if s["sql"] and "UNNEST" in s["sql"]]
    assert [(s["outcome"], s["rows_returned"]) for s in queries] == [("done", 3)]


NODE_SCRIPT = """
const {BigQuery} = require('@google-cloud/bigquery');
async function main() {
  const bq = new BigQuery({projectId: 'demo-project', location: 'US'});
  const [dataset] = await bq.createDataset('node_agent');
  const [table] = await dataset.createTable('items', {schema: 'id:integer,name:string'});
  await table.insert([{id: 1, name: 'one'}, {id: 2, name: 'two'}]);
  const [rows] = await bq.query({query: 'SELECT COUNT(*) AS n FROM `demo-project.node_agent.items`'});
  console.log(rows[0].n);
}
main().catch((error) => { console.error(error); process.exit(1); });
"""


def test_node_client_recorded(appliance: Appliance) -> None:
    modules = os.environ.get("APPLIANCE_AGENT_NODE_PATH", "/opt/appliance-agent-node/node_modules")
    if shutil.which("node") is None or not Path(modules, "@google-cloud/bigquery").exists():
        pytest.skip("node or @google-cloud/bigquery is not installed (make agent-node)")
    (appliance.workspace / "agent.js").write_text(NODE_SCRIPT)
    result = appliance.run_agent("node agent.js", "--env", f"NODE_PATH={modules}")
    assert result.stdout.strip() == "2"
    statements = appliance.replay(session_id_of(result))["statements"]
    methods = [s["api_method"] for s in statements]
    assert "tabledata.insertAll" in methods
    [query] = [s for s in statements if s["sql"] and "COUNT(*)" in s["sql"]]
    assert query["outcome"] == "done"
