"""A synthetic BigQuery Storage Read server, for read streams of a gigabyte and more.

local-bigquery builds every Arrow batch from DuckDB in Python, which is far too slow to measure
a proxy at gigabytes, so this server answers the two calls a read needs from the published
google-cloud-bigquery-storage protos: CreateReadSession returns one ARROW stream, and ReadRows
streams one pre-built record batch (rows of an int64 and a wide string) again and again until
the size the table name asks for has been sent: table `synthetic_<MiB>` streams that many MiB,
any other table `--bytes`. Run it with the upstream venv's Python inside the cloud namespace:

    python bench/storage_server.py --address 198.19.109.30 --cert server.pem --key key.pem \
        --bytes 1073741824

Prints "storage server ready" when it listens; runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pyarrow as pa
from google.cloud.bigquery_storage_v1 import types

SERVICE = "google.cloud.bigquery.storage.v1.BigQueryRead"


def record_batch(rows: int, width: int) -> tuple[bytes, bytes]:
    """Return the serialized Arrow schema and one serialized record batch."""
    schema = pa.schema([("n", pa.int64()), ("payload", pa.string())])
    batch = pa.record_batch([pa.array(range(rows), pa.int64()),
                             pa.array(["x" * width] * rows, pa.string())], schema=schema)
    return schema.serialize().to_pybytes(), batch.serialize().to_pybytes()


class Service:
    def __init__(self, total_bytes: int, rows: int, width: int) -> None:
        self.schema, batch = record_batch(rows, width)
        self.rows = rows
        self.batch_bytes = len(batch)
        self.default_batches = self.batches_for(total_bytes)
        self.sessions: dict[str, int] = {}
        self.message = types.ReadRowsResponse.serialize(types.ReadRowsResponse(
            arrow_record_batch=types.ArrowRecordBatch(serialized_record_batch=batch,
                                                      row_count=rows),
            row_count=rows))

    def batches_for(self, total_bytes: int) -> int:
        return max(1, -(-total_bytes // self.batch_bytes))

    def create_read_session(self, request: Any, _context: Any) -> Any:
        table = request.read_session.table.rsplit("/", 1)[-1]
        size = table.removeprefix("synthetic_")
        batches = self.batches_for(int(size) << 20) if size.isdigit() else self.default_batches
        name = f"{request.parent}/locations/us/sessions/bench{len(self.sessions)}"
        self.sessions[f"{name}/streams/0"] = batches
        return types.ReadSession(
            name=name, table=request.read_session.table,
            data_format=types.DataFormat.ARROW,
            arrow_schema=types.ArrowSchema(serialized_schema=self.schema),
            streams=[types.ReadStream(name=f"{name}/streams/0")],
            estimated_row_count=batches * self.rows)

    def read_rows(self, request: Any, _context: Any) -> Iterator[bytes]:
        batches = self.sessions.get(request.read_stream, self.default_batches)
        for _ in range(request.offset // self.rows, batches):
            yield self.message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--rows", type=int, default=1000, help="rows per record batch")
    parser.add_argument("--width", type=int, default=1000, help="bytes per payload string")
    args = parser.parse_args()
    service = Service(args.bytes, args.rows, args.width)
    handlers = {
        "CreateReadSession": grpc.unary_unary_rpc_method_handler(
            service.create_read_session,
            request_deserializer=types.CreateReadSessionRequest.deserialize,
            response_serializer=types.ReadSession.serialize),
        "ReadRows": grpc.unary_stream_rpc_method_handler(
            service.read_rows, request_deserializer=types.ReadRowsRequest.deserialize,
            response_serializer=lambda message: message),
    }
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    with open(args.key, "rb") as key, open(args.cert, "rb") as cert:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    server.add_secure_port(f"{args.address}:{args.port}", credentials)
    server.start()
    print(f"storage server ready: record batches of {service.batch_bytes} bytes", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait(5)


if __name__ == "__main__":
    main()
