"""An example agent: the unmodified google-cloud-bigquery client with default settings.

It passes no endpoint and no credentials, so the client finds BigQuery at its real host name
and its credential through Application Default Credentials, as it would on a GCE VM. Run it
inside a recorded session:

    appliance run --agent-cmd "python examples/agent.py"
"""

from __future__ import annotations

import os

from google.cloud import bigquery

DATASET = os.environ.get("AGENT_DATASET", "customers")


def main() -> None:
    client = bigquery.Client()
    dataset = f"{client.project}.{DATASET}"
    table = f"{dataset}.profiles"

    client.create_dataset(dataset, exists_ok=True)
    client.create_table(
        bigquery.Table(table, schema=[
            bigquery.SchemaField("name", "STRING"),
            bigquery.SchemaField("tier", "STRING"),
            bigquery.SchemaField("spend", "INT64"),
        ]),
        exists_ok=True,
    )
    errors = client.insert_rows_json(table, [
        {"name": "ada", "tier": "silver", "spend": 12000},
        {"name": "grace", "tier": "silver", "spend": 800},
        {"name": "alan", "tier": "bronze", "spend": 20000},
    ])
    if errors:
        raise SystemExit(f"insert failed: {errors}")

    rows = client.query_and_wait(f"SELECT name, tier, spend FROM `{table}` ORDER BY name")
    print("before:", [(row.name, row.tier, row.spend) for row in rows])

    update = client.query(f"UPDATE `{table}` SET tier = 'gold' WHERE spend > 10000")
    update.result()
    print("updated rows:", update.num_dml_affected_rows)

    delete = client.query(f"DELETE FROM `{table}` WHERE spend < 1000")
    delete.result()
    print("deleted rows:", delete.num_dml_affected_rows)

    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter("tier", "STRING", "gold"),
    ])
    rows = client.query_and_wait(
        f"SELECT name FROM `{table}` WHERE tier = @tier ORDER BY name", job_config=config)
    print("gold:", [row.name for row in rows])


if __name__ == "__main__":
    main()
