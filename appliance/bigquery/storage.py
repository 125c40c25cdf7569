"""Decode the BigQuery Storage Read and Write gRPC APIs from the bytes on the wire.

Everything here is pure: functions over bytes, headers and dicts, and `MessageStream`, an
incremental parser that is fed one HTTP/2 body chunk at a time and never does I/O. The
addon in appliance.addons.storage calls it from the proxy hooks.

A gRPC body is a sequence of length-prefixed messages: one flag byte (0 plain, 1 compressed
with the `grpc-encoding` of the headers), a 4-byte big-endian length, then the protobuf
message. Chunks may split a prefix or a message anywhere. Messages are decoded with the
message classes published in google-cloud-bigquery-storage and summarised into plain dicts;
row payloads (Arrow, Avro, protobuf rows) are counted, never kept.

Anything that cannot be decoded (a bad flag byte, a truncated message, a corrupt or
oversized compressed payload, bytes that are not the expected protobuf) is reported as a
decode failure in the result, never raised.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from google.cloud.bigquery_storage_v1 import types
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

API = "bigquerystorage.v1"
READ_SERVICE = "google.cloud.bigquery.storage.v1.BigQueryRead"
WRITE_SERVICE = "google.cloud.bigquery.storage.v1.BigQueryWrite"

# A message larger than this is counted and digested but neither buffered nor decoded, so
# one flow's memory stays bounded whatever the agent or the server sends.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Maximum number of stream names, fields or row errors copied into a summary.
MAX_LISTED = 100
PREFIX_BYTES = 5

_STORAGE_HOST = re.compile(
    r"bigquerystorage(?:\.mtls|\.[a-z0-9-]+\.rep(?:\.mtls)?)?\.googleapis\.com"
    r"|bigquerystorage-[a-z0-9-]+\.p\.googleapis\.com")
_TABLE = re.compile(r"projects/(?P<project>[^/]+)/datasets/(?P<dataset>[^/]+)"
                    r"/tables/(?P<table>[^/]+)(?:/streams/(?P<stream>[^/]+))?")
_SESSION = re.compile(r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
                      r"/sessions/(?P<session>[^/]+)(?:/streams/(?P<stream>[^/]+))?")
_PARENT = re.compile(r"projects/(?P<project>[^/]+)")

UNARY, SERVER_STREAMING, BIDI = "unary", "server_streaming", "bidi"
REQUEST, RESPONSE = "request", "response"

GRPC_STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
UNAVAILABLE = 14

Summary = dict[str, Any]
Summariser = Callable[[Any], Summary]


# Resource names.

@dataclass(frozen=True, slots=True)
class Resource:
    """What a Storage API resource name tells: its table or read session, and its stream."""

    project: str | None = None
    location: str | None = None
    dataset_id: str | None = None
    table_id: str | None = None
    session: str | None = None
    stream: str | None = None


def parse_resource(name: str | None) -> Resource:
    """Split a table, write stream, read session or read stream name into its parts."""
    if not name:
        return Resource()
    if match := _TABLE.fullmatch(name):
        return Resource(project=match["project"], dataset_id=match["dataset"],
                        table_id=match["table"], stream=match["stream"])
    if match := _SESSION.fullmatch(name):
        session = f"projects/{match['project']}/locations/{match['location']}/sessions/" \
                  f"{match['session']}"
        return Resource(project=match["project"], location=match["location"], session=session,
                        stream=name if match["stream"] else None)
    if match := _PARENT.fullmatch(name):
        return Resource(project=match["project"])
    return Resource()


def table_of_stream(write_stream: str) -> str | None:
    """Return the table name a write stream belongs to, or None for another kind of name."""
    match = _TABLE.fullmatch(write_stream)
    if match is None:
        return None
    return f"projects/{match['project']}/datasets/{match['dataset']}/tables/{match['table']}"


def is_storage_host(host: str) -> bool:
    """Tell whether `host` serves the BigQuery Storage API (global, mTLS, regional, PSC)."""
    return bool(_STORAGE_HOST.fullmatch(host.strip().lower().rstrip(".")))


def is_grpc(content_type: str | None) -> bool:
    """Tell whether a content type is gRPC over HTTP/2; gRPC-Web frames trailers differently
    and is left to the generic recorder."""
    kind = (content_type or "").lower()
    return kind.startswith("application/grpc") and not kind.startswith("application/grpc-web")


def routing_parameters(values: list[str]) -> dict[str, str]:
    """Return the `x-goog-request-params` routing headers as one dict; the first value of a
    key wins. Clients name the resource of a call there, so it is known before any message
    arrives; the messages themselves stay authoritative."""
    parameters: dict[str, str] = {}
    for value in values:
        for key, item in parse_qsl(value, keep_blank_values=True):
            if item:
                parameters.setdefault(key, item)
    return parameters


# Summaries of each message type. Each takes a decoded protobuf message.

def _timestamp(value: Timestamp) -> str:
    return str(value.ToJsonString())


def _listed(values: Any) -> list[Any]:
    return list(values)[:MAX_LISTED]


def _enum_name(message: Message, field_name: str) -> str | None:
    descriptor = message.DESCRIPTOR.fields_by_name[field_name].enum_type
    number = getattr(message, field_name)
    value = descriptor.values_by_number.get(number) if descriptor is not None else None
    return value.name if value is not None else str(number)


def _create_read_session_request(request: Any) -> Summary:
    session = request.read_session
    options = session.read_options
    summary: Summary = {
        "parent": request.parent,
        "table": session.table,
        "data_format": _enum_name(session, "data_format"),
        "selected_fields": _listed(options.selected_fields),
        "row_restriction": options.row_restriction or None,
        "snapshot_time": (_timestamp(session.table_modifiers.snapshot_time)
                          if session.table_modifiers.HasField("snapshot_time") else None),
        "max_stream_count": request.max_stream_count,
        "preferred_min_stream_count": request.preferred_min_stream_count,
        "trace_id": session.trace_id or None,
    }
    if options.HasField("sample_percentage"):
        summary["sample_percentage"] = options.sample_percentage
    if options.HasField("response_compression_codec"):
        summary["response_compression_codec"] = _enum_name(options, "response_compression_codec")
    return summary


def _avro_fields(schema_json: str) -> list[str] | None:
    try:
        document = json.loads(schema_json)
    except ValueError:
        return None
    fields = document.get("fields") if isinstance(document, dict) else None
    if not isinstance(fields, list):
        return None
    return [str(item.get("name")) for item in fields if isinstance(item, dict)][:MAX_LISTED]


def _read_session(session: Any) -> Summary:
    summary: Summary = {
        "read_session": session.name,
        "table": session.table,
        "data_format": _enum_name(session, "data_format"),
        "streams": _listed(stream.name for stream in session.streams),
        "stream_count": len(session.streams),
        "estimated_row_count": session.estimated_row_count,
        "estimated_total_bytes_scanned": session.estimated_total_bytes_scanned,
        "estimated_total_physical_file_size": session.estimated_total_physical_file_size,
        "expire_time": (_timestamp(session.expire_time)
                        if session.HasField("expire_time") else None),
        "selected_fields": _listed(session.read_options.selected_fields),
        "row_restriction": session.read_options.row_restriction or None,
    }
    if session.HasField("avro_schema"):
        summary["schema_fields"] = _avro_fields(session.avro_schema.schema)
    return summary


def _read_rows_request(request: Any) -> Summary:
    return {"read_stream": request.read_stream, "offset": request.offset}


def _read_rows_response(response: Any) -> Summary:
    kind = response.WhichOneof("rows")
    payload = 0
    if kind == "arrow_record_batch":
        payload = len(response.arrow_record_batch.serialized_record_batch)
    elif kind == "avro_rows":
        payload = len(response.avro_rows.serialized_binary_rows)
    summary: Summary = {"rows": response.row_count, "format": kind, "payload_bytes": payload}
    if response.HasField("stats"):
        summary["progress"] = [response.stats.progress.at_response_start,
                               response.stats.progress.at_response_end]
    if response.HasField("uncompressed_byte_size"):
        summary["uncompressed_byte_size"] = response.uncompressed_byte_size
    if response.throttle_state.throttle_percent:
        summary["throttle_percent"] = response.throttle_state.throttle_percent
    return summary


def _split_request(request: Any) -> Summary:
    return {"read_stream": request.name, "fraction": request.fraction}


def _split_response(response: Any) -> Summary:
    return {"primary_stream": response.primary_stream.name or None,
            "remainder_stream": response.remainder_stream.name or None}


def _create_write_stream_request(request: Any) -> Summary:
    return {"parent": request.parent, "table": request.parent,
            "stream_type": _enum_name(request.write_stream, "type_")}


def _write_stream(stream: Any) -> Summary:
    return {
        "write_stream": stream.name,
        "stream_type": _enum_name(stream, "type_"),
        "write_mode": _enum_name(stream, "write_mode"),
        "create_time": _timestamp(stream.create_time) if stream.HasField("create_time") else None,
        "commit_time": _timestamp(stream.commit_time) if stream.HasField("commit_time") else None,
        "location": stream.location or None,
        "schema_fields": _listed(item.name for item in stream.table_schema.fields),
    }


def count_arrow_rows(batch: bytes) -> int | None:
    """Read the row count of one Arrow IPC RecordBatch message from its flatbuffer header.

    Returns None when the bytes are not an Arrow RecordBatch message.
    """
    try:
        position = 0
        length = struct.unpack_from("<i", batch, 0)[0]
        if length == -1:  # The continuation marker of the current IPC format.
            position = 4
            length = struct.unpack_from("<i", batch, 4)[0]
        start = position + 4
        if length <= 0 or start + length > len(batch):
            return None
        metadata = batch[start:start + length]
        message = struct.unpack_from("<I", metadata, 0)[0]
        if _flatbuffer_field(metadata, message, 1, "<B") != 3:  # MessageHeader.RecordBatch
            return None
        header = _flatbuffer_table(metadata, message, 2)
        if header is None:
            return None
        value = _flatbuffer_field(metadata, header, 0, "<q")
        return 0 if value is None else value
    except (struct.error, IndexError):
        return None


def _flatbuffer_slot(buffer: bytes, table: int, index: int) -> int | None:
    vtable = table - struct.unpack_from("<i", buffer, table)[0]
    vtable_size = struct.unpack_from("<H", buffer, vtable)[0]
    slot = 4 + 2 * index
    if slot + 2 > vtable_size:
        return None
    offset = struct.unpack_from("<H", buffer, vtable + slot)[0]
    return table + offset if offset else None


def _flatbuffer_field(buffer: bytes, table: int, index: int, kind: str) -> int | None:
    position = _flatbuffer_slot(buffer, table, index)
    return None if position is None else int(struct.unpack_from(kind, buffer, position)[0])


def _flatbuffer_table(buffer: bytes, table: int, index: int) -> int | None:
    position = _flatbuffer_slot(buffer, table, index)
    if position is None:
        return None
    return position + int(struct.unpack_from("<I", buffer, position)[0])


def _append_rows_request(request: Any) -> Summary:
    kind = request.WhichOneof("rows")
    summary: Summary = {"write_stream": request.write_stream or None, "format": None,
                        "rows": 0, "payload_bytes": 0}
    if request.HasField("offset"):
        summary["offset"] = request.offset.value
    if kind == "proto_rows":
        rows = request.proto_rows.rows.serialized_rows
        summary.update(format="proto", rows=len(rows),
                       payload_bytes=sum(len(row) for row in rows))
        schema = request.proto_rows.writer_schema.proto_descriptor
        if request.proto_rows.HasField("writer_schema"):
            summary["writer_schema"] = {"message": schema.name,
                                        "fields": _listed(item.name for item in schema.field)}
    elif kind == "arrow_rows":
        batch = request.arrow_rows.rows
        rows = count_arrow_rows(batch.serialized_record_batch)
        summary.update(format="arrow", payload_bytes=len(batch.serialized_record_batch),
                       rows=rows if rows is not None else batch.row_count)
        if rows is None:
            summary["rows_from"] = "row_count field"
        if request.arrow_rows.HasField("writer_schema"):
            summary["writer_schema"] = {
                "arrow_schema_bytes": len(request.arrow_rows.writer_schema.serialized_schema)}
    if request.trace_id:
        summary["trace_id"] = request.trace_id
    if request.missing_value_interpretations:
        summary["missing_value_interpretations"] = dict(request.missing_value_interpretations)
    return summary


def _status(status: Any) -> Summary:
    return {"code": status.code, "status": status_name(status.code), "message": status.message}


def _append_rows_response(response: Any) -> Summary:
    summary: Summary = {"write_stream": response.write_stream or None}
    if response.HasField("append_result"):
        result = response.append_result
        summary["offset"] = result.offset.value if result.HasField("offset") else None
    if response.HasField("error"):
        summary["error"] = _status(response.error)
    if response.row_errors:
        summary["row_errors"] = len(response.row_errors)
        summary["row_error_samples"] = [
            {"index": error.index, "code": _enum_name(error, "code"), "message": error.message}
            for error in list(response.row_errors)[:10]]
    if response.HasField("updated_schema"):
        summary["updated_schema_fields"] = _listed(
            item.name for item in response.updated_schema.fields)
    return summary


def _get_write_stream_request(request: Any) -> Summary:
    return {"write_stream": request.name, "view": _enum_name(request, "view")}


def _finalize_request(request: Any) -> Summary:
    return {"write_stream": request.name}


def _finalize_response(response: Any) -> Summary:
    return {"row_count": response.row_count}


def _batch_commit_request(request: Any) -> Summary:
    return {"parent": request.parent, "table": request.parent,
            "write_streams": _listed(request.write_streams),
            "write_stream_count": len(request.write_streams)}


def _batch_commit_response(response: Any) -> Summary:
    return {
        "commit_time": (_timestamp(response.commit_time)
                        if response.HasField("commit_time") else None),
        "stream_errors": [{"code": _enum_name(error, "code"), "entity": error.entity,
                           "message": error.error_message}
                          for error in list(response.stream_errors)[:MAX_LISTED]],
    }


def _flush_request(request: Any) -> Summary:
    return {"write_stream": request.write_stream,
            "offset": request.offset.value if request.HasField("offset") else None}


def _flush_response(response: Any) -> Summary:
    return {"offset": response.offset}


# Methods.

@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of the Storage API: its name in the record, shape and message decoders."""

    path: str
    api_method: str
    kind: str
    request_type: type[Message] | None = None
    response_type: type[Message] | None = None
    summarise_request: Summariser | None = None
    summarise_response: Summariser | None = None
    starts_statement: bool = False

    @property
    def known(self) -> bool:
        return self.request_type is not None


def _method(service: str, name: str, kind: str, request: Any, response: Any,
            summarise_request: Summariser, summarise_response: Summariser,
            starts_statement: bool = False) -> Method:
    short = service.rsplit(".", 1)[1]
    return Method(f"/{service}/{name}", f"{short}.{name}", kind, request.pb(), response.pb(),
                  summarise_request, summarise_response, starts_statement)


METHODS: dict[str, Method] = {method.path: method for method in (
    _method(READ_SERVICE, "CreateReadSession", UNARY, types.CreateReadSessionRequest,
            types.ReadSession, _create_read_session_request, _read_session, True),
    _method(READ_SERVICE, "ReadRows", SERVER_STREAMING, types.ReadRowsRequest,
            types.ReadRowsResponse, _read_rows_request, _read_rows_response),
    _method(READ_SERVICE, "SplitReadStream", UNARY, types.SplitReadStreamRequest,
            types.SplitReadStreamResponse, _split_request, _split_response),
    _method(WRITE_SERVICE, "CreateWriteStream", UNARY, types.CreateWriteStreamRequest,
            types.WriteStream, _create_write_stream_request, _write_stream, True),
    _method(WRITE_SERVICE, "AppendRows", BIDI, types.AppendRowsRequest,
            types.AppendRowsResponse, _append_rows_request, _append_rows_response),
    _method(WRITE_SERVICE, "GetWriteStream", UNARY, types.GetWriteStreamRequest,
            types.WriteStream, _get_write_stream_request, _write_stream),
    _method(WRITE_SERVICE, "FinalizeWriteStream", UNARY, types.FinalizeWriteStreamRequest,
            types.FinalizeWriteStreamResponse, _finalize_request, _finalize_response),
    _method(WRITE_SERVICE, "BatchCommitWriteStreams", UNARY,
            types.BatchCommitWriteStreamsRequest, types.BatchCommitWriteStreamsResponse,
            _batch_commit_request, _batch_commit_response),
    _method(WRITE_SERVICE, "FlushRows", UNARY, types.FlushRowsRequest, types.FlushRowsResponse,
            _flush_request, _flush_response),
)}


def method_of(path: str) -> Method:
    """Return the method a gRPC request path names; unknown paths get a generic method that
    is still metered, with the path as its name and both directions treated as streams."""
    known = METHODS.get(path.split("?", 1)[0])
    if known is not None:
        return known
    parts = path.strip("/").split("/")
    name = ".".join(parts[-2:]) if len(parts) >= 2 else path
    return Method(path, f"grpc:{name}"[:200], BIDI)


# Framing.

@dataclass(frozen=True, slots=True)
class Decoded:
    """One gRPC message as seen in a stream: its place, size and summary, or why it failed."""

    index: int
    wire_bytes: int
    compressed: bool
    fields: Summary = field(default_factory=dict)
    sha256: str | None = None
    error: str | None = None


def decompress(payload: bytes, encoding: str | None,
               limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """Decompress one message body; raise ValueError naming what is wrong."""
    name = (encoding or "identity").strip().lower()
    if name == "gzip":
        wbits = 31
    elif name == "deflate":
        wbits = 15
    else:
        raise ValueError(f"message is flagged compressed but grpc-encoding is {name!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(payload, limit)
    except zlib.error as error:
        raise ValueError(f"corrupt {name} payload: {error}") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"{name} payload inflates to more than {limit} bytes")
    if not inflater.eof:
        raise ValueError(f"truncated {name} payload")
    return data


def decode_message(method: Method, direction: str, payload: bytes) -> Summary:
    """Parse one uncompressed message of `method` in `direction` and summarise it.

    Raises ValueError when the bytes are not that message.
    """
    message_type = method.request_type if direction == REQUEST else method.response_type
    summarise = method.summarise_request if direction == REQUEST else method.summarise_response
    if message_type is None or summarise is None:
        return {}
    try:
        message = message_type.FromString(payload)
        return summarise(message)
    except (DecodeError, ValueError, OverflowError) as error:
        raise ValueError(f"not a valid {message_type.DESCRIPTOR.name}: "
                         f"{type(error).__name__}: {error}") from None


class MessageStream:
    """Meters one direction of one gRPC call, fed the body chunk by chunk as it passes.

    It counts bytes and messages, keeps a SHA-256 of every byte, and returns each complete
    message's summary from `feed`. Only the current unfinished message is buffered, and not
    even that beyond `max_message` bytes. After a framing error the rest of the body is
    counted and digested but no longer parsed.
    """

    def __init__(self, method: Method, direction: str, encoding: str | None = None,
                 max_message: int = MAX_MESSAGE_BYTES, digest_messages: bool = False) -> None:
        self.method = method
        self.direction = direction
        self.encoding = encoding
        self.max_message = max_message
        self.digest_messages = digest_messages
        self.bytes = 0
        self.messages = 0
        self.rows = 0
        self.failures = 0
        self.first_failure: str | None = None
        self._digest = hashlib.sha256()
        self._buffer = bytearray()
        self._skipping = 0
        self._skipped_header: tuple[bool, int] | None = None
        self._broken = False

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def feed(self, data: bytes) -> list[Decoded]:
        """Account for `data` and return the messages it completed."""
        self.bytes += len(data)
        self._digest.update(data)
        if self._broken or not data:
            return []
        view = memoryview(data)
        done: list[Decoded] = []
        if self._skipping:
            skipped = min(self._skipping, len(view))
            self._skipping -= skipped
            view = view[skipped:]
            if not self._skipping:
                done.append(self._finish_oversized())
        self._buffer += view
        return done + self._drain()

    def _drain(self) -> list[Decoded]:
        done: list[Decoded] = []
        while len(self._buffer) >= PREFIX_BYTES and not self._broken:
            flag = self._buffer[0]
            length = int.from_bytes(self._buffer[1:PREFIX_BYTES], "big")
            if flag not in (0, 1):
                self._fail(f"invalid gRPC message prefix: flag byte {flag:#04x} at message "
                           f"{self.messages}; the rest of the body was not parsed")
                self._broken = True
                self._buffer.clear()
                break
            if length > self.max_message:
                available = len(self._buffer) - PREFIX_BYTES
                self._skipping = length - min(available, length)
                self._skipped_header = (flag == 1, length)
                del self._buffer[:PREFIX_BYTES + min(available, length)]
                if not self._skipping:
                    done.append(self._finish_oversized())
                    continue
                break
            if len(self._buffer) < PREFIX_BYTES + length:
                break
            payload = bytes(self._buffer[PREFIX_BYTES:PREFIX_BYTES + length])
            del self._buffer[:PREFIX_BYTES + length]
            done.append(self._message(flag == 1, payload))
        return done

    def _finish_oversized(self) -> Decoded:
        assert self._skipped_header is not None
        compressed, length = self._skipped_header
        self._skipped_header = None
        error = f"message of {length} bytes exceeds the decoding limit of " \
                f"{self.max_message} bytes; counted but not decoded"
        self._fail(error)
        decoded = Decoded(self.messages, PREFIX_BYTES + length, compressed, error=error)
        self.messages += 1
        return decoded

    def _message(self, compressed: bool, payload: bytes) -> Decoded:
        index = self.messages
        self.messages += 1
        digest = hashlib.sha256(payload).hexdigest() if self.digest_messages else None
        try:
            plain = decompress(payload, self.encoding, self.max_message) if compressed \
                else payload
            fields = decode_message(self.method, self.direction, plain)
        except ValueError as error:
            self._fail(f"message {index}: {error}")
            return Decoded(index, PREFIX_BYTES + len(payload), compressed, sha256=digest,
                           error=str(error))
        rows = fields.get("rows")
        if isinstance(rows, int):
            self.rows += rows
        return Decoded(index, PREFIX_BYTES + len(payload), compressed, fields, digest)

    def _fail(self, error: str) -> None:
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = error

    def finish(self) -> str | None:
        """Declare the body complete; return the truncation error if it ended mid-message."""
        if self._broken:
            return None
        pending = len(self._buffer) + self._skipping
        if not pending:
            return None
        expected = None
        if len(self._buffer) >= PREFIX_BYTES:
            expected = int.from_bytes(self._buffer[1:PREFIX_BYTES], "big")
        elif self._skipped_header is not None:
            expected = self._skipped_header[1]
        self._buffer.clear()
        self._skipping = 0
        error = ("body ended inside a gRPC message prefix" if expected is None
                 else f"body ended inside a gRPC message of {expected} bytes")
        self._fail(error)
        return error

    def summary(self) -> Summary:
        """Return the totals of this direction, as recorded at the end of the call."""
        summary: Summary = {"bytes": self.bytes, "messages": self.messages,
                            "sha256": self.sha256}
        if self.failures:
            summary["decode_failures"] = self.failures
            summary["decode_error"] = self.first_failure
        return summary


def frame(payload: bytes, compressed: bool = False) -> bytes:
    """Return `payload` as one gRPC length-prefixed message."""
    return bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload


def decode_body(method: Method, direction: str, body: bytes,
                encoding: str | None = None) -> tuple[list[Decoded], str | None]:
    """Decode a complete body at once; return its messages and the truncation error."""
    stream = MessageStream(method, direction, encoding)
    messages = stream.feed(body)
    return messages, stream.finish()


# Status.

@dataclass(frozen=True, slots=True)
class GrpcStatus:
    """The outcome of a call from `grpc-status`, `grpc-message` and the details trailer."""

    code: int | None
    message: str | None = None
    details: tuple[str, ...] = ()
    reason: str | None = None
    error: str | None = None

    @property
    def name(self) -> str | None:
        return status_name(self.code) if self.code is not None else None

    @property
    def outcome(self) -> str:
        if self.code is None:
            return "unknown"
        if self.code == 0:
            return "done"
        return "cancelled" if self.code == 1 else "error"

    def as_record(self) -> Summary:
        return {key: value for key, value in dataclasses.asdict(self).items()
                if value not in (None, ())} | ({"name": self.name} if self.name else {})


def status_name(code: int) -> str:
    return GRPC_STATUS_NAMES[code] if 0 <= code < len(GRPC_STATUS_NAMES) else f"CODE_{code}"


def grpc_status(fields: Mapping[str, str] | None) -> GrpcStatus | None:
    """Read the gRPC status from trailers (or from the headers of a trailers-only response).

    Returns None when `fields` carry no `grpc-status`.
    """
    if not fields or "grpc-status" not in fields:
        return None
    raw = fields["grpc-status"].strip()
    message = unquote(fields["grpc-message"]) if "grpc-message" in fields else None
    if not raw.isdigit():
        return GrpcStatus(None, message, error=f"grpc-status {raw[:40]!r} is not a number")
    details: tuple[str, ...] = ()
    reason = None
    error = None
    encoded = fields.get("grpc-status-details-bin")
    if encoded:
        try:
            status = status_pb2.Status.FromString(
                base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True))
            details = tuple(item.type_url for item in status.details[:MAX_LISTED])
            for item in status.details:
                info = error_details_pb2.ErrorInfo()
                if item.Unpack(info):
                    reason = info.reason
                    break
        except (binascii.Error, DecodeError) as failure:
            error = f"grpc-status-details-bin is not a google.rpc.Status: {failure}"
    return GrpcStatus(int(raw), message, details, reason, error)


def local_error(message: str, code: int = UNAVAILABLE) -> dict[str, str]:
    """Return the headers of a trailers-only gRPC error response the proxy answers itself."""
    return {"content-type": "application/grpc", "grpc-status": str(code),
            "grpc-message": quote(message, safe=" !#$&'()*+,/:;=?@[]~")}


# REST job resources, read only for the table a query wrote its result to.

def query_destination(body: bytes) -> str | None:
    """Return the destination table of a BigQuery REST job resource, as a Storage table name.

    The Storage Read API reads a query's result from that table (for a query without a named
    destination, an anonymous one), which is how a read session is linked to its query.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    configuration = document.get("configuration")
    query = configuration.get("query") if isinstance(configuration, dict) else None
    table = query.get("destinationTable") if isinstance(query, dict) else None
    if not isinstance(table, dict):
        return None
    parts = [table.get(key) for key in ("projectId", "datasetId", "tableId")]
    if not all(isinstance(part, str) and part for part in parts):
        return None
    return "projects/{}/datasets/{}/tables/{}".format(*parts)
