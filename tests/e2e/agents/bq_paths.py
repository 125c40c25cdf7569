"""An agent that walks the BigQuery REST paths google-cloud-bigquery uses, for e2e decoding tests.

It prints one JSON object per line (``{"step": ..., ...}``) with what the client saw, so the
test can compare the recording with the agent's own view. The dataset name comes from
AGENT_DATASET, so tests that share the upstream do not mix.
"""

from __future__ import annotations

import io
import json
import os

from google.api_core.client_options import ClientOptions
from google.cloud import bigquery
from google.cloud.bigquery import client as client_module

DATASET = os.environ["AGENT_DATASET"]


def say(step: str, **values: object) -> None:
    print(json.dumps({"step": step, **values}, default=str), flush=True)


def main() -> None:
    client = bigquery.Client(location="US")
    project = client.project
    dataset = f"{project}.{DATASET}"
    people = f"{dataset}.people"

    client.create_dataset(dataset)
    client.create_table(bigquery.Table(people, schema=[
        bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "STRING")]))
    errors = client.insert_rows_json(people, [{"id": n, "name": f"p{n}"} for n in range(1, 8)])
    say("insert", errors=errors)

    job = client.query(f"SELECT id, name FROM `{people}` ORDER BY id",
                       job_id=f"{DATASET}_select", job_config=bigquery.QueryJobConfig(
                           labels={"team": "agents"}))
    rows = list(job.result(page_size=3))
    say("paged", job_id=job.job_id, rows=len(rows))

    parameters = [
        bigquery.ScalarQueryParameter("min_id", "INT64", 2),
        bigquery.ArrayQueryParameter("names", "STRING", ["p2", "p3", "p5"]),
        bigquery.StructQueryParameter("f", bigquery.ScalarQueryParameter("max_id", "INT64", 4)),
    ]
    result = client.query_and_wait(
        f"SELECT id FROM `{people}` WHERE id >= @min_id AND name IN UNNEST(@names) "
        "AND id <= @f.max_id", job_config=bigquery.QueryJobConfig(query_parameters=parameters))
    say("params", rows=[row.id for row in result])

    dry = client.query(f"SELECT name FROM `{people}`",
                       job_config=bigquery.QueryJobConfig(dry_run=True))
    say("dry_run", bytes=dry.total_bytes_processed)

    script = client.query(
        f"DECLARE n INT64 DEFAULT 3;\n"
        f"CREATE TABLE `{dataset}.scratch` AS SELECT id FROM `{people}` WHERE id <= n;\n"
        f"SELECT COUNT(*) AS c FROM `{dataset}.scratch`;", job_id=f"{DATASET}_script")
    script.result()
    children = list(client.list_jobs(parent_job=script.job_id))
    say("script", children=sorted(child.job_id for child in children))
    client.get_job(children[0].job_id)

    data = b"".join(b"%d,loaded %d\n" % (n, n) for n in range(1, 31))
    load_config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.CSV,
        schema=[bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "STRING")],
        write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
    client.load_table_from_file(io.BytesIO(data), f"{dataset}.loaded", job_config=load_config,
                                size=len(data), job_id=f"{DATASET}_multipart").result()
    say("multipart", bytes=len(data))

    # Several chunks of 256 KiB, so the upload gets 308 replies before the final response.
    client_module._DEFAULT_CHUNKSIZE = 256 * 1024
    big = b"".join(b"%d,resumable row %060d\n" % (n, n) for n in range(1, 8001))
    client.load_table_from_file(io.BytesIO(big), f"{dataset}.loaded", job_config=load_config,
                                job_id=f"{DATASET}_resumable").result()
    say("resumable", bytes=len(big))

    client.copy_table(f"{dataset}.loaded", f"{dataset}.copied",
                      job_id=f"{DATASET}_copy").result()
    client.extract_table(f"{dataset}.loaded", f"gs://agent-bucket/{DATASET}/out.csv",
                         job_id=f"{DATASET}_extract").result()
    say("copied")

    page = client.list_rows(f"{dataset}.loaded", max_results=25, page_size=10)
    say("tabledata", rows=len(list(page)))

    session_job = client.query("SELECT 1 AS one", job_config=bigquery.QueryJobConfig(
        create_session=True))
    session_job.result()
    session_id = session_job.session_info.session_id
    in_session = bigquery.QueryJobConfig(connection_properties=[
        bigquery.ConnectionProperty("session_id", session_id)])
    client.query("SELECT 2 AS two", job_config=in_session).result()
    client.query("CALL BQ.ABORT_SESSION()", job_config=in_session).result()
    say("bq_session", session_id=session_id)

    legacy = bigquery.Client(location="US", client_options=ClientOptions(
        api_endpoint="https://www.googleapis.com"))
    legacy.query_and_wait(f"SELECT COUNT(*) FROM `{people}`")
    say("legacy")

    client.query_and_wait(f"TRUNCATE TABLE `{dataset}.copied`")
    client.delete_table(f"{dataset}.scratch")

    labelled = [listed for listed in client.list_jobs(max_results=200)
                if listed.job_id == f"{DATASET}_select"]
    say("labels", labels=labelled[0].labels if labelled else None)
    client.delete_dataset(dataset, delete_contents=True)
    say("done")


if __name__ == "__main__":
    main()
