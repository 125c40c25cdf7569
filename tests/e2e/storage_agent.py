"""An agent for the Storage API e2e tests: the published clients, used as shipped.

    python storage_agent.py setup PROJECT DATASET.TABLE ROWS
    python storage_agent.py read PROJECT DATASET.TABLE
    python storage_agent.py arrow PROJECT SQL
    python storage_agent.py write PROJECT DATASET.TABLE
    python storage_agent.py errors PROJECT DATASET

Each prints one JSON document of what the client saw, for the test to compare with the
recording and, for writes, with what the testbed's Write server reports it received. The
clients find the appliance CA through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH and their token
through the metadata emulator, as any agent does.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
from collections.abc import Iterator
from typing import Any

from google.api_core import exceptions
from google.cloud import bigquery, bigquery_storage_v1
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

ROW_BATCHES = [[(1, "ada"), (2, "grace")], [(3, "edsger"), (4, "barbara"), (5, "donald")],
               [(6, "frances")]]


def setup(project: str, table: str, rows: str) -> None:
    """Create DATASET.TABLE with ROWS rows (id, name) through the REST API."""
    client = bigquery.Client(project=project)
    client.create_dataset(table.split(".")[0], exists_ok=True)
    client.query(f"CREATE OR REPLACE TABLE `{project}.{table}` AS SELECT x AS id, "
                 f"CONCAT('name-', CAST(x AS STRING)) AS name "
                 f"FROM UNNEST(GENERATE_ARRAY(1, {int(rows)})) AS x").result()


def read(project: str, table: str) -> dict[str, Any]:
    """Read a table with two selected fields and a row restriction; count rows per stream."""
    dataset_id, table_id = table.split(".")
    client = bigquery_storage_v1.BigQueryReadClient()
    session = client.create_read_session(
        parent=f"projects/{project}",
        read_session=types.ReadSession(
            table=f"projects/{project}/datasets/{dataset_id}/tables/{table_id}",
            data_format=types.DataFormat.ARROW,
            read_options=types.ReadSession.TableReadOptions(
                selected_fields=["id", "name"], row_restriction="id > 0"),
        ),
        max_stream_count=1,
    )
    values: list[int] = []
    streams = []
    for stream in session.streams:
        rows = 0
        for page in client.read_rows(stream.name).rows(session).pages:
            frame = page.to_arrow()
            rows += frame.num_rows
            values += frame.column("id").to_pylist()
        streams.append({"name": stream.name, "rows": rows})
    # Resume the first stream at an offset: the rows from there come again.
    resumed = 0
    if session.streams:
        for response in client.read_rows(session.streams[0].name, offset=len(values) - 2):
            resumed += response.row_count
    return {"session": session.name, "streams": streams, "rows": len(values),
            "id_sum": sum(values), "resumed_rows": resumed}


def arrow(project: str, sql: str) -> dict[str, Any]:
    """Run a query and fetch its result through the Storage API, as to_arrow/to_dataframe do."""
    client = bigquery.Client(project=project)
    job = client.query(sql)
    reader = bigquery_storage_v1.BigQueryReadClient()
    table = job.result().to_arrow(bqstorage_client=reader)
    result: dict[str, Any] = {"job_id": job.job_id, "rows": table.num_rows,
                              "destination": str(job.destination),
                              "x_sum": sum(table.column("x").to_pylist())}
    try:
        frame = client.query(sql + " LIMIT 5000").result().to_dataframe(bqstorage_client=reader)
    except ImportError as error:
        result["dataframe"] = f"unavailable: {error}"
    else:
        result["dataframe"] = len(frame.index)
    return result


def _row_class() -> Any:
    proto = descriptor_pb2.DescriptorProto(name="Row")
    proto.field.add(name="id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    proto.field.add(name="name", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    file = descriptor_pb2.FileDescriptorProto(name="agent_row.proto", package="agent")
    file.message_type.add().CopyFrom(proto)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("agent.Row")), proto


def _append_requests(stream: str, acknowledged: queue.Queue[Any],
                     sent: list[dict[str, Any]]) -> Iterator[types.AppendRowsRequest]:
    """Yield one request per batch, each only after the previous one was acknowledged, so the
    call completes only if the proxy passes every message on as it comes."""
    row, proto = _row_class()
    offset = 0
    batches = [*ROW_BATCHES, ROW_BATCHES[0]]  # The last one repeats offset 0: refused.
    for index, batch in enumerate(batches):
        request = types.AppendRowsRequest(
            offset=offset if index < len(ROW_BATCHES) else 0,
            proto_rows=types.AppendRowsRequest.ProtoData(
                rows=types.ProtoRows(serialized_rows=[
                    row(id=number, name=name).SerializeToString() for number, name in batch])))
        if index == 0:
            request.write_stream = stream
            request.proto_rows.writer_schema = types.ProtoSchema(proto_descriptor=proto)
        sent.append({"offset": request.offset, "rows": len(batch), "sha256": hashlib.sha256(
            types.AppendRowsRequest.serialize(request)).hexdigest()})
        yield request
        acknowledged.get(timeout=30)
        offset += len(batch)


def write(project: str, table: str) -> dict[str, Any]:
    dataset_id, table_id = table.split(".")
    parent = f"projects/{project}/datasets/{dataset_id}/tables/{table_id}"
    client = bigquery_storage_v1.BigQueryWriteClient()
    stream = client.create_write_stream(
        parent=parent, write_stream=types.WriteStream(type_=types.WriteStream.Type.PENDING))
    acknowledged: queue.Queue[Any] = queue.Queue()
    sent: list[dict[str, Any]] = []
    responses = []
    # The routing header AppendRowsStream sends; the generated client adds an empty one.
    routing = (("x-goog-request-params", f"write_stream={stream.name}"),)
    for response in client.append_rows(iter(_append_requests(stream.name, acknowledged, sent)),
                                       metadata=routing):
        responses.append({"offset": response.append_result.offset
                          if "append_result" in response else None,
                          "error": response.error.code if "error" in response else None,
                          "message": response.error.message if "error" in response else None})
        acknowledged.put(response)
        if len(responses) == len(sent) == len(ROW_BATCHES) + 1:
            break
    got = client.get_write_stream(name=stream.name)
    finalized = client.finalize_write_stream(name=stream.name)
    commit = client.batch_commit_write_streams(request=types.BatchCommitWriteStreamsRequest(
        parent=parent, write_streams=[stream.name]))
    return {"write_stream": stream.name, "sent": sent, "responses": responses,
            "type": got.type_.name, "row_count": finalized.row_count,
            "committed": bool(commit.commit_time), "stream_errors": len(commit.stream_errors)}


def _error(call: Any) -> dict[str, Any]:
    try:
        call()
    except exceptions.GoogleAPICallError as error:
        return {"code": error.grpc_status_code.name if error.grpc_status_code else None,
                "message": error.message, "reason": error.reason}
    return {"code": "OK"}


def errors(project: str, dataset: str) -> dict[str, Any]:
    client = bigquery_storage_v1.BigQueryWriteClient()
    missing = f"projects/{project}/datasets/{dataset}/tables/t/streams/missing"
    return {
        "denied": _error(lambda: client.create_write_stream(
            parent=f"projects/{project}/datasets/{dataset}/tables/denied_t",
            write_stream=types.WriteStream(type_=types.WriteStream.Type.PENDING))),
        "missing": _error(lambda: client.finalize_write_stream(name=missing)),
    }


def main() -> None:
    command, project, argument, *rest = sys.argv[1:]
    if command == "setup":
        setup(project, argument, *rest)
        return
    action = {"read": read, "arrow": arrow, "write": write, "errors": errors}[command]
    print(json.dumps(action(project, argument)))


if __name__ == "__main__":
    main()
