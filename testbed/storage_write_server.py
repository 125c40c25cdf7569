"""The testbed's BigQuery Storage endpoint: the Write API in memory, the Read API relayed.

local-bigquery serves the Read API, but the testbed needs a Write API whose server can report
exactly which bytes it received. This one gRPC server (grpcio, HTTP/2 over TLS, the published
google-cloud-bigquery-storage messages) listens where clients expect the Storage API,
bigquerystorage.googleapis.com:443, and routes by method:

- google.cloud.bigquery.storage.v1.BigQueryWrite: CreateWriteStream, AppendRows,
  GetWriteStream, FinalizeWriteStream, BatchCommitWriteStreams and FlushRows, implemented
  here in memory with BigQuery's semantics for COMMITTED, PENDING, BUFFERED and `_default`
  streams, offsets, finalization and batch commits;
- every other method: relayed byte for byte to local-bigquery's gRPC API on
  `--read-backend` (the same address, another port), with metadata, status, message and
  trailers passed back unchanged.

Every append is written to `--received-log` as one JSON line: write stream, offset, row
count, the SHA-256 of the AppendRowsRequest message exactly as received, and the rows
decoded with the writer schema. Commits and finalizations are logged too. Tests read the file
to check that what arrived is what the agent sent.

Errors the tests provoke, as BigQuery answers them:
- CreateWriteStream on a table whose id starts with `denied_`: PERMISSION_DENIED, sent as a
  trailers-only response;
- any call naming an unknown write stream: NOT_FOUND with a google.rpc.ErrorInfo detail in
  grpc-status-details-bin;
- an append at an offset other than the stream's end: an in-band error in its
  AppendRowsResponse (ALREADY_EXISTS or OUT_OF_RANGE), the call itself continuing.

Run inside the cloud namespace by testbed/cloud.py. "storage ready" on stdout means it listens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    timestamp_pb2,
    wrappers_pb2,
)
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

WRITE_SERVICE = "google.cloud.bigquery.storage.v1.BigQueryWrite"
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
DENIED_PREFIX = "denied_"
MAX_LOGGED_ROWS = 1000
Type = types.WriteStream.Type
StorageErrorCode = types.StorageError.StorageErrorCode


@dataclass
class Stream:
    """One write stream and what it holds."""

    name: str
    table: str
    type: int
    created: timestamp_pb2.Timestamp
    count: int = 0
    flushed: int = 0
    finalized: bool = False
    committed: timestamp_pb2.Timestamp | None = None


class Aborted(Exception):
    """An RPC fails with this status; `detail` becomes a google.rpc.ErrorInfo reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _table_of(name: str) -> str:
    parts = name.split("/")
    if len(parts) < 6 or parts[0] != "projects" or parts[2] != "datasets" \
            or parts[4] != "tables":
        raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid table or stream name: {name}")
    return "/".join(parts[:6])


class WriteService:
    """The BigQuery Write API over in-memory streams; every method takes and returns bytes."""

    def __init__(self, received_log: Path) -> None:
        self.lock = threading.Lock()
        self.streams: dict[str, Stream] = {}
        self.log_path = received_log
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, entry: dict[str, Any]) -> None:
        with self.lock, self.log_path.open("a") as file:
            file.write(json.dumps(entry, sort_keys=True) + "\n")

    def stream(self, name: str) -> Stream:
        with self.lock:
            if name.endswith("/streams/_default") and name not in self.streams:
                self.streams[name] = Stream(name, _table_of(name), Type.COMMITTED, _now())
            found = self.streams.get(name)
        if found is None:
            raise Aborted(grpc.StatusCode.NOT_FOUND,
                          f"Requested entity was not found. Entity: {name}", "STREAM_NOT_FOUND")
        return found

    def _describe(self, stream: Stream) -> types.WriteStream:
        return types.WriteStream(name=stream.name, type_=stream.type,
                                 create_time=stream.created, commit_time=stream.committed,
                                 location="US")

    # Unary methods.

    def create_write_stream(self, data: bytes) -> bytes:
        request = types.CreateWriteStreamRequest.deserialize(data)
        table = _table_of(request.parent)
        if table.rsplit("/", 1)[1].startswith(DENIED_PREFIX):
            raise Aborted(grpc.StatusCode.PERMISSION_DENIED,
                          f"Permission bigquery.tables.updateData denied on table {table} (or "
                          "it may not exist).")
        kind = int(request.write_stream.type_) or Type.PENDING
        now = _now()
        stream = Stream(f"{table}/streams/{uuid.uuid4().hex}", table, kind, now,
                        committed=now if kind == Type.COMMITTED else None)
        with self.lock:
            self.streams[stream.name] = stream
        self.log({"event": "create", "write_stream": stream.name, "type": Type(kind).name})
        return types.WriteStream.serialize(self._describe(stream))

    def get_write_stream(self, data: bytes) -> bytes:
        request = types.GetWriteStreamRequest.deserialize(data)
        return types.WriteStream.serialize(self._describe(self.stream(request.name)))

    def finalize_write_stream(self, data: bytes) -> bytes:
        request = types.FinalizeWriteStreamRequest.deserialize(data)
        if request.name.endswith("/streams/_default"):
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT,
                          f"The default stream cannot be finalized. Entity: {request.name}")
        stream = self.stream(request.name)
        stream.finalized = True
        self.log({"event": "finalize", "write_stream": stream.name, "row_count": stream.count})
        return types.FinalizeWriteStreamResponse.serialize(
            types.FinalizeWriteStreamResponse(row_count=stream.count))

    def batch_commit_write_streams(self, data: bytes) -> bytes:
        request = types.BatchCommitWriteStreamsRequest.deserialize(data)
        errors = []
        streams = []
        for name in request.write_streams:
            stream = self.streams.get(name)
            if stream is None:
                errors.append(types.StorageError(code=StorageErrorCode.STREAM_NOT_FOUND,
                                                 entity=name,
                                                 error_message="Stream not found"))
            elif stream.type != Type.PENDING or not stream.finalized or stream.committed:
                errors.append(types.StorageError(
                    code=StorageErrorCode.INVALID_STREAM_STATE, entity=name,
                    error_message="Stream is not a finalized, uncommitted PENDING stream"))
            else:
                streams.append(stream)
        if errors:
            self.log({"event": "commit_refused", "write_streams": list(request.write_streams)})
            return types.BatchCommitWriteStreamsResponse.serialize(
                types.BatchCommitWriteStreamsResponse(stream_errors=errors))
        now = _now()
        for stream in streams:
            stream.committed = now
        self.log({"event": "commit", "write_streams": [s.name for s in streams],
                  "rows": sum(s.count for s in streams)})
        return types.BatchCommitWriteStreamsResponse.serialize(
            types.BatchCommitWriteStreamsResponse(commit_time=now))

    def flush_rows(self, data: bytes) -> bytes:
        request = types.FlushRowsRequest.deserialize(data)
        stream = self.stream(request.write_stream)
        offset = request.offset if "offset" in request else stream.count - 1
        if stream.type != Type.BUFFERED or offset >= stream.count or offset < stream.flushed:
            raise Aborted(grpc.StatusCode.OUT_OF_RANGE,
                          f"Offset {offset} is out of range. Entity: {stream.name}")
        stream.flushed = offset + 1
        self.log({"event": "flush", "write_stream": stream.name, "offset": offset})
        return types.FlushRowsResponse.serialize(types.FlushRowsResponse(offset=offset))

    # AppendRows.

    def append_rows(self, requests: Iterator[bytes]) -> Iterator[bytes]:
        name: str | None = None
        decode: Any = None
        for index, data in enumerate(requests):
            request = types.AppendRowsRequest.pb().FromString(data)
            name = request.write_stream or name
            if not name:
                raise Aborted(grpc.StatusCode.INVALID_ARGUMENT,
                              "The first AppendRowsRequest must name a write stream.")
            stream = self.stream(name)
            if request.proto_rows.HasField("writer_schema"):
                decode = _row_decoder(request.proto_rows.writer_schema.proto_descriptor)
            rows = list(request.proto_rows.rows.serialized_rows)
            offset = request.offset.value if request.HasField("offset") else None
            response = self._append(stream, len(rows), offset)
            self.log({
                "event": "append",
                "write_stream": name,
                "index": index,
                "offset": offset,
                "rows": len(rows),
                "sha256": hashlib.sha256(data).hexdigest(),
                "accepted": not response.HasField("error"),
                "values": [decode(row) for row in rows[:MAX_LOGGED_ROWS]] if decode else None,
            })
            yield response.SerializeToString()

    def _append(self, stream: Stream, rows: int, offset: int | None) -> Any:
        response = types.AppendRowsResponse.pb()(write_stream=stream.name)
        with self.lock:
            if stream.finalized:
                response.error.CopyFrom(status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT, message=f"Stream is finalized: {stream.name}"))
            elif offset is not None and offset < stream.count:
                response.error.CopyFrom(status_pb2.Status(
                    code=code_pb2.ALREADY_EXISTS,
                    message=f"The offset {offset} is within stream, expected offset "
                            f"{stream.count}. Entity: {stream.name}"))
            elif offset is not None and offset > stream.count:
                response.error.CopyFrom(status_pb2.Status(
                    code=code_pb2.OUT_OF_RANGE,
                    message=f"The offset {offset} is beyond stream, expected offset "
                            f"{stream.count}. Entity: {stream.name}"))
            else:
                if not stream.name.endswith("/_default"):
                    response.append_result.offset.CopyFrom(
                        wrappers_pb2.Int64Value(value=stream.count))
                else:
                    response.append_result.SetInParent()
                stream.count += rows
        return response


def _row_decoder(descriptor: descriptor_pb2.DescriptorProto) -> Any:
    package = f"rows_{uuid.uuid4().hex}"
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package)
    file.message_type.add().CopyFrom(descriptor)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    message = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{package}.{descriptor.name}"))
    return lambda data: json_format.MessageToDict(message.FromString(data),
                                                  preserving_proto_field_name=True)


def _abort(context: grpc.ServicerContext, error: Aborted) -> None:
    if error.reason is None:
        context.abort(error.code, error.message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="bigquery.googleapis.com"))
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(
        code=error.code.value[0], message=error.message, details=[detail])))


class Router(grpc.GenericRpcHandler):
    """Serves the Write API here and relays every other method to the Read backend."""

    def __init__(self, write: WriteService, backend: grpc.Channel) -> None:
        self.write = write
        self.backend = backend
        self.unary = {
            "CreateWriteStream": write.create_write_stream,
            "GetWriteStream": write.get_write_stream,
            "FinalizeWriteStream": write.finalize_write_stream,
            "BatchCommitWriteStreams": write.batch_commit_write_streams,
            "FlushRows": write.flush_rows,
        }

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        service, _, name = method.strip("/").partition("/")
        if service != WRITE_SERVICE:
            return grpc.stream_stream_rpc_method_handler(self._relay(method))
        if name == "AppendRows":
            return grpc.stream_stream_rpc_method_handler(self._append_rows)
        if name in self.unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(self.unary[name]))
        return None

    @staticmethod
    def _unary(function: Any) -> Any:
        def handler(request: bytes, context: grpc.ServicerContext) -> bytes | None:
            try:
                return bytes(function(request))
            except Aborted as error:
                _abort(context, error)
            return None
        return handler

    def _append_rows(self, requests: Iterator[bytes],
                     context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            yield from self.write.append_rows(requests)
        except Aborted as error:
            _abort(context, error)

    def _relay(self, method: str) -> Any:
        """Relay any call shape: on the wire a unary call is a stream of one message."""
        call_backend = self.backend.stream_stream(method)

        def relay(requests: Iterator[bytes],
                  context: grpc.ServicerContext) -> Iterator[bytes]:
            metadata = [(key, value) for key, value in context.invocation_metadata()
                        if not key.startswith(":")]
            # Without a client deadline time_remaining() is effectively infinite, which grpc
            # turns into a deadline in the past; pass only real deadlines on.
            remaining = context.time_remaining()
            timeout = remaining if remaining is not None and remaining < 86400 else None
            call = call_backend(requests, metadata=metadata, timeout=timeout)
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as error:
                context.set_trailing_metadata(tuple(error.trailing_metadata() or ()))
                context.abort(error.code(), error.details() or "")
            context.set_trailing_metadata(tuple(call.trailing_metadata() or ()))
        return relay


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="IP address to listen on")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--read-backend", required=True,
                        help="HOST:PORT of local-bigquery's gRPC API, reached over TLS")
    parser.add_argument("--backend-name", default="bigquerystorage.googleapis.com",
                        help="TLS server name of the backend's certificate")
    parser.add_argument("--cert", required=True, type=Path, help="PEM certificate chain")
    parser.add_argument("--key", required=True, type=Path, help="PEM private key")
    parser.add_argument("--ca", required=True, type=Path, help="CA that signed the backend")
    parser.add_argument("--received-log", required=True, type=Path)
    parser.add_argument("--token-secret", type=Path,
                        help="verify bearer tokens like the upstream (testbed/token_verifier.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = grpc.secure_channel(
        args.read_backend, grpc.ssl_channel_credentials(args.ca.read_bytes()),
        options=[*UNLIMITED, ("grpc.ssl_target_name_override", args.backend_name)])
    interceptors = []
    if args.token_secret:
        import token_verifier

        checker = token_verifier.TokenChecker(args.token_secret.read_text().strip().encode())
        interceptors.append(token_verifier.grpc_interceptor(checker))
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32),
                         options=UNLIMITED, interceptors=interceptors)
    server.add_generic_rpc_handlers([Router(WriteService(args.received_log), backend)])
    credentials = grpc.ssl_server_credentials([(args.key.read_bytes(), args.cert.read_bytes())])
    server.add_secure_port(f"{args.address}:{args.port}", credentials)
    server.start()
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _number, _frame: stopped.set())
    print("storage ready", flush=True)
    stopped.wait()
    server.stop(grace=2).wait(5)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
