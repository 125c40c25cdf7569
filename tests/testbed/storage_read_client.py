"""Read a table through the BigQuery Storage Read API and print what arrived as JSON.

test_cloud.py runs this in a private mount namespace whose /etc/hosts maps the Google host
names to the testbed cloud, because gRPC resolves names in C, out of reach of a Python
monkeypatch. The clients are used as shipped: no endpoint override, only the CA from
GRPC_DEFAULT_SSL_ROOTS_FILE_PATH and REQUESTS_CA_BUNDLE.
"""

from __future__ import annotations

import argparse
import json

from google.cloud import bigquery, bigquery_storage
from google.oauth2.credentials import Credentials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--table", required=True, help="dataset.table")
    args = parser.parse_args()
    dataset, table = args.table.split(".")
    credentials = Credentials(token="testbed-placeholder-token")
    result: dict[str, object] = {}

    reader = bigquery_storage.BigQueryReadClient(credentials=credentials)
    session = reader.create_read_session(
        parent=f"projects/{args.project}",
        read_session=bigquery_storage.types.ReadSession(
            table=f"projects/{args.project}/datasets/{dataset}/tables/{table}",
            data_format=bigquery_storage.types.DataFormat.ARROW,
        ),
        max_stream_count=1,
    )
    rows = 0
    for stream in session.streams:
        for response in reader.read_rows(stream.name):
            rows += response.row_count
    result["read_rows"] = rows

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        result["to_arrow"] = None
    else:
        client = bigquery.Client(project=args.project, credentials=credentials)
        # An explicit Storage client: create_bqstorage_client=True would fall back to REST.
        arrow = client.list_rows(f"{args.project}.{args.table}").to_arrow(bqstorage_client=reader)
        result["to_arrow"] = sorted(arrow.column("name").to_pylist())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
