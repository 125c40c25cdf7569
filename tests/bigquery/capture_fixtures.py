"""Capture BigQuery REST v2 request/response pairs from a real client and a local server.

The fixtures in ``fixtures/`` whose ``source`` is ``"captured"`` come from this script: it runs
google-cloud-bigquery against local-bigquery (a BigQuery-compatible server on loopback) and saves
every HTTP exchange the client makes. To re-run it::

    local-bigquery serve --host 127.0.0.1 --port 9050 --data-dir "$(mktemp -d)" &
    python tests/bigquery/capture_fixtures.py --endpoint http://127.0.0.1:9050

Always pass ``--host 127.0.0.1`` to local-bigquery, because it binds 0.0.0.0 by default. Start it
on an empty data directory, because the scenarios create a dataset with a fixed name. DuckDB cannot
download extensions here, so the icu, ducklake and spatial extensions must be in
``$HOME/.duckdb/extensions/v<duckdb version>/<platform>/`` before the server starts (the
``duckdb-extension-*`` packages on PyPI ship them).

The script patches ``uuid.uuid4`` with a seeded generator, so the client-side ids (``requestId``,
``insertId``, generated job ids) repeat from run to run. Server-side values such as timestamps and
server-generated job ids change with every run, so tests that assert them must be updated after a
new capture. Each saved URL has its scheme and host replaced by ``https://bigquery.googleapis.com``,
the endpoint the client uses by default; ``captured_from`` keeps the address actually used.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import pathlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import GoogleAPIError
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PROJECT = "local"
DATASET = "agent_ds"
REQUEST_HEADERS = (
    "content-type",
    "content-encoding",
    "x-goog-api-client",
    "content-range",
    "content-length",
    "x-upload-content-length",
)
RESPONSE_HEADERS = ("content-type", "content-encoding", "location", "range")
# Upload data is not kept in fixtures, only its size: the decoder never reads it.
UPLOAD_DATA_TYPES = ("application/octet-stream", "*/*")
PUBLIC_ORIGIN = ("https", "bigquery.googleapis.com")

_exchanges: list[dict[str, Any]] = []


def _body_record(body: bytes | str | None) -> dict[str, str]:
    if body is None:
        return {"body": ""}
    if isinstance(body, str):
        body = body.encode()
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def _request_body_record(
    request: requests.PreparedRequest, body: bytes | str | None
) -> dict[str, Any]:
    if "upload_id=" in str(request.url) and body:
        return {"body": "", "body_omitted_bytes": len(body)}
    return _body_record(body)


def _public_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((*PUBLIC_ORIGIN, parts.path, parts.query, parts.fragment))


def _install_recorder(endpoint: str) -> None:
    original_send = requests.Session.send

    def recording_send(
        session: requests.Session, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        response = original_send(session, request, **kwargs)
        body = request.body
        if not isinstance(body, (bytes, str, type(None))):
            raise TypeError(f"streamed request bodies are not captured: {type(body).__name__}")
        _exchanges.append(
            {
                "source": "captured",
                "captured_from": endpoint,
                "request": {
                    "method": request.method,
                    "url": _public_url(str(request.url)),
                    "headers": {
                        name: value.decode() if isinstance(value, bytes) else value
                        for name, value in request.headers.items()
                        if name.lower() in REQUEST_HEADERS
                    },
                    **_request_body_record(request, body),
                },
                "response": {
                    "status": response.status_code,
                    "headers": {
                        name: value
                        for name, value in response.headers.items()
                        if name.lower() in RESPONSE_HEADERS
                    },
                    **_body_record(response.content),
                },
            }
        )
        return response

    requests.Session.send = recording_send  # type: ignore[method-assign,assignment]


def _seed_uuid4() -> None:
    generator = random.Random(20240601)
    uuid.uuid4 = lambda: uuid.UUID(int=generator.getrandbits(128), version=4)


def _save(scenario: str) -> None:
    for index, exchange in enumerate(_exchanges, start=1):
        exchange["scenario"] = scenario
        path = FIXTURES / f"{scenario}-{index:02d}.json"
        path.write_text(json.dumps(exchange, indent=2, ensure_ascii=False) + "\n")
    print(f"{scenario}: {len(_exchanges)} exchanges")
    _exchanges.clear()


def _table(name: str) -> str:
    return f"{PROJECT}.{DATASET}.{name}"


def scenario_datasets_insert(client: bigquery.Client) -> None:
    dataset = bigquery.Dataset(f"{PROJECT}.{DATASET}")
    dataset.labels = {"team": "agents"}
    client.create_dataset(dataset)


def scenario_tables_insert(client: bigquery.Client) -> None:
    schema = [
        bigquery.SchemaField("id", "INT64", mode="REQUIRED"),
        bigquery.SchemaField("name", "STRING"),
        bigquery.SchemaField("score", "FLOAT64"),
    ]
    client.create_table(bigquery.Table(_table("people"), schema=schema))


def scenario_tabledata_insertall(client: bigquery.Client) -> None:
    rows = [{"id": n, "name": f"person {n}", "score": n / 2} for n in range(1, 26)]
    errors = client.insert_rows_json(_table("people"), rows)
    assert not errors, errors


def scenario_jobs_insert_query(client: bigquery.Client) -> None:
    config = bigquery.QueryJobConfig(labels={"agent": "nightly"})
    sql = "SELECT id, name FROM `local.agent_ds.people` WHERE id <= 3 ORDER BY id"
    client.query(sql, job_config=config, job_id="capture_select_1", job_retry=None).result()


def scenario_jobs_get(client: bigquery.Client) -> None:
    client.get_job("capture_select_1", location="US")


def scenario_jobs_query(client: bigquery.Client) -> None:
    client.query_and_wait("SELECT COUNT(*) AS n FROM `local.agent_ds.people`")


def scenario_query_paging(client: bigquery.Client) -> None:
    job = client.query(
        "SELECT id FROM `local.agent_ds.people` ORDER BY id",
        job_id="capture_paging_1",
        job_retry=None,
    )
    list(job.result(page_size=10))


def scenario_tabledata_list(client: bigquery.Client) -> None:
    list(client.list_rows(_table("people"), max_results=12, page_size=5))


def scenario_dml_update(client: bigquery.Client) -> None:
    client.query_and_wait("UPDATE `local.agent_ds.people` SET score = score + 1 WHERE id > 20")


def scenario_dry_run(client: bigquery.Client) -> None:
    config = bigquery.QueryJobConfig(dry_run=True, use_query_cache=False)
    client.query("SELECT name FROM `local.agent_ds.people` WHERE id = 7", job_config=config)


def scenario_params_named(client: bigquery.Client) -> None:
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter("min_id", "INT64", 5),
            bigquery.ArrayQueryParameter("names", "STRING", ["person 6", "person 7"]),
            bigquery.StructQueryParameter(
                "filter",
                bigquery.ScalarQueryParameter("max_score", "FLOAT64", 9.5),
                bigquery.ScalarQueryParameter("label", "STRING", 'O\'Brien "quoted"'),
            ),
        ]
    )
    sql = (
        "SELECT id, name FROM `local.agent_ds.people`\n"
        "WHERE id >= @min_id AND name IN UNNEST(@names) AND score < @filter.max_score"
    )
    client.query_and_wait(sql, job_config=config)


def scenario_params_positional(client: bigquery.Client) -> None:
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter(None, "INT64", 3),
            bigquery.ArrayQueryParameter(None, "INT64", [1, 2, 3]),
        ]
    )
    sql = "SELECT id FROM `local.agent_ds.people` WHERE id > ? AND id IN UNNEST(?) -- ünïcode"
    client.query(sql, job_config=config, job_id="capture_positional_1", job_retry=None).result()


def scenario_query_error(client: bigquery.Client) -> None:
    try:
        client.query_and_wait("SELEC 1")
    except GoogleAPIError as error:
        print("expected error:", type(error).__name__)


def scenario_job_error(client: bigquery.Client) -> None:
    job = client.query(
        "SELECT * FROM `local.agent_ds.missing_table`", job_id="capture_error_1", job_retry=None
    )
    try:
        job.result()
    except GoogleAPIError as error:
        print("expected error:", type(error).__name__)


def _slow_query(side: int) -> str:
    return (
        f"SELECT SUM(MOD(a * b, 7)) AS s FROM UNNEST(GENERATE_ARRAY(1, {side})) AS a, "
        f"UNNEST(GENERATE_ARRAY(1, {side})) AS b"
    )


def scenario_job_incomplete(client: bigquery.Client) -> None:
    # About 25 s of work (measured with local-bigquery 0.3.2 on 2 cores), so the job is still
    # running when jobs.insert returns after its 1 s wait, and the calls below see it unfinished.
    client.query(_slow_query(60000), job_id="capture_slow_1", job_retry=None)
    path = f"/projects/{PROJECT}/queries/capture_slow_1"
    client._connection.api_request(  # type: ignore[no-untyped-call]
        "GET", path, query_params={"maxResults": 0, "timeoutMs": 1, "location": "US"}
    )
    client.get_job("capture_slow_1", location="US")


def scenario_jobs_list(client: bigquery.Client) -> None:
    list(client.list_jobs(max_results=2))


def scenario_jobs_cancel(client: bigquery.Client) -> None:
    client.cancel_job("capture_slow_1", location="US")


def scenario_query_incomplete(client: bigquery.Client) -> None:
    # About 6 s of work on the same machine. query_and_wait sends no timeoutMs, so the request goes
    # through the client's connection directly, with a 10 ms timeoutMs that makes jobComplete false.
    body = {
        "query": _slow_query(30000),
        "useLegacySql": False,
        "timeoutMs": 10,
        "requestId": str(uuid.uuid4()),
        "location": "US",
    }
    response = client._connection.api_request(  # type: ignore[no-untyped-call]
        "POST", f"/projects/{PROJECT}/queries", data=body
    )
    job_id = response["jobReference"]["jobId"]
    client.get_job(job_id, location="US").result()


def scenario_job_creation_optional(client: bigquery.Client) -> None:
    client.default_job_creation_mode = "JOB_CREATION_OPTIONAL"
    try:
        client.query_and_wait("SELECT 17 AS answer")
    finally:
        client.default_job_creation_mode = None


def scenario_load_multipart(client: bigquery.Client) -> None:
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.CSV,
        schema=[bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "STRING")],
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
    )
    data = io.BytesIO(b"1,alpha\n2,beta\n")
    job = client.load_table_from_file(
        data,
        _table("loaded"),
        job_config=config,
        size=len(data.getvalue()),
        job_id="capture_load_1",
    )
    job.result()


def scenario_tables_patch(client: bigquery.Client) -> None:
    table = client.get_table(_table("people"))
    table.description = "people the agent touched"
    client.update_table(table, ["description"])


def scenario_tables_delete(client: bigquery.Client) -> None:
    client.delete_table(_table("loaded"))


def scenario_datasets_delete(client: bigquery.Client) -> None:
    client.delete_dataset(f"{PROJECT}.{DATASET}", delete_contents=True)


def _unsaved(action: Callable[[], object]) -> None:
    """Run set-up calls whose exchanges are not saved as fixtures."""
    action()
    _exchanges.clear()


def _ensure_people(client: bigquery.Client) -> None:
    def create() -> None:
        client.create_dataset(f"{PROJECT}.{DATASET}", exists_ok=True)
        schema = [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "STRING")]
        client.create_table(bigquery.Table(_table("people"), schema=schema), exists_ok=True)
        client.insert_rows_json(_table("people"), [{"id": n, "name": f"p{n}"} for n in (1, 2)])

    _unsaved(create)


def scenario_script_children(client: bigquery.Client) -> None:
    _ensure_people(client)
    job = client.query(
        "DECLARE n INT64 DEFAULT 2;\n"
        "CREATE TABLE `local.agent_ds.scratch` AS SELECT id FROM `local.agent_ds.people` "
        "WHERE id <= n;\nSELECT COUNT(*) AS c FROM `local.agent_ds.scratch`;",
        job_id="capture_script_1",
        job_retry=None,
    )
    job.result()
    children = list(client.list_jobs(parent_job="capture_script_1"))
    client.get_job(children[0].job_id, location="US")


def scenario_extract_gcs(client: bigquery.Client) -> None:
    _ensure_people(client)
    client.extract_table(
        _table("people"), "gs://agent-bucket/people-*.csv", job_id="capture_extract_1"
    ).result()


def scenario_copy_tables(client: bigquery.Client) -> None:
    _ensure_people(client)
    config = bigquery.CopyJobConfig(write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE)
    client.copy_table(
        _table("people"), _table("people_copy"), job_config=config, job_id="capture_copy_1"
    ).result()


def scenario_load_resumable(client: bigquery.Client) -> None:
    _ensure_people(client)
    from google.cloud.bigquery import client as client_module

    client_module._DEFAULT_CHUNKSIZE = 256 * 1024  # type: ignore[attr-defined]
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.CSV,
        schema=[bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "STRING")],
    )
    data = b"".join(b"%d,resumable %060d\n" % (n, n) for n in range(1, 4001))
    client.load_table_from_file(
        io.BytesIO(data), _table("loaded_resumable"), job_config=config,
        job_id="capture_resumable_1",
    ).result()


def scenario_bq_session(client: bigquery.Client) -> None:
    job = client.query(
        "SELECT 1 AS one", job_config=bigquery.QueryJobConfig(create_session=True),
        job_id="capture_session_1", job_retry=None,
    )
    job.result()
    session = bigquery.QueryJobConfig(
        connection_properties=[
            bigquery.ConnectionProperty("session_id", job.session_info.session_id)
        ]
    )
    client.query_and_wait("SELECT 2 AS two", job_config=session)
    client.query_and_wait("CALL BQ.ABORT_SESSION()", job_config=session)


def scenario_ddl_drop(client: bigquery.Client) -> None:
    _ensure_people(client)
    client.query_and_wait("CREATE OR REPLACE TABLE `local.agent_ds.doomed` AS SELECT 1 AS x")
    client.query(
        "DROP TABLE `local.agent_ds.doomed`", job_id="capture_drop_1", job_retry=None
    ).result()
    client.query_and_wait("TRUNCATE TABLE `local.agent_ds.people`")


def scenario_query_dry_run(client: bigquery.Client) -> None:
    _ensure_people(client)
    config = bigquery.QueryJobConfig(dry_run=True)
    client.query_and_wait("SELECT name FROM `local.agent_ds.people`", job_config=config)


SCENARIOS: list[Callable[[bigquery.Client], None]] = [
    scenario_datasets_insert,
    scenario_tables_insert,
    scenario_tabledata_insertall,
    scenario_jobs_insert_query,
    scenario_jobs_get,
    scenario_jobs_query,
    scenario_query_paging,
    scenario_tabledata_list,
    scenario_dml_update,
    scenario_dry_run,
    scenario_params_named,
    scenario_params_positional,
    scenario_query_error,
    scenario_job_error,
    scenario_job_incomplete,
    scenario_jobs_list,
    scenario_jobs_cancel,
    scenario_query_incomplete,
    scenario_job_creation_optional,
    scenario_load_multipart,
    scenario_tables_patch,
    scenario_tables_delete,
    scenario_datasets_delete,
    scenario_script_children,
    scenario_extract_gcs,
    scenario_copy_tables,
    scenario_load_resumable,
    scenario_bq_session,
    scenario_ddl_drop,
    scenario_query_dry_run,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="local-bigquery URL on loopback")
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    args = parser.parse_args()
    host = urlsplit(args.endpoint).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--endpoint must be a loopback address, not {host!r}")
    _seed_uuid4()
    _install_recorder(args.endpoint)
    client = bigquery.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=args.endpoint),
        location="US",
    )
    FIXTURES.mkdir(exist_ok=True)
    for scenario in SCENARIOS:
        name = scenario.__name__.removeprefix("scenario_")
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        scenario(client)
        _save(name)
        if time.monotonic() - started > 30:
            print(f"{name}: slow scenario ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
