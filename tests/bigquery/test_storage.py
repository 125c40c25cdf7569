"""Tests for appliance.bigquery.storage: gRPC framing and Storage Read/Write message decoding.

Every message is built and serialized with the published google-cloud-bigquery-storage
classes, so the bytes are the ones a client or BigQuery puts on the wire.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import zlib
from typing import Any

import pyarrow as pa
import pytest
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import any_pb2, descriptor_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.bigquery import storage

READ = "/google.cloud.bigquery.storage.v1.BigQueryRead/"
WRITE = "/google.cloud.bigquery.storage.v1.BigQueryWrite/"
TABLE = "projects/proj/datasets/sales/tables/orders"
SESSION = "projects/proj/locations/us/sessions/CAISDG"
STREAM = f"{SESSION}/streams/GgJpYhoCZ2k"


def serialized(message: Any) -> bytes:
    return bytes(type(message).serialize(message))


def create_read_session_request() -> Any:
    snapshot = timestamp_pb2.Timestamp(seconds=1_764_000_000)
    return types.CreateReadSessionRequest(
        parent="projects/proj",
        read_session=types.ReadSession(
            table=TABLE,
            data_format=types.DataFormat.ARROW,
            table_modifiers=types.ReadSession.TableModifiers(snapshot_time=snapshot),
            read_options=types.ReadSession.TableReadOptions(
                selected_fields=["order_id", "amount"], row_restriction="amount > 100",
                sample_percentage=10.0),
        ),
        max_stream_count=4,
    )


def read_session() -> Any:
    return types.ReadSession(
        name=SESSION, table=TABLE, data_format=types.DataFormat.AVRO,
        avro_schema=types.AvroSchema(schema='{"type": "record", "name": "r", "fields": '
                                            '[{"name": "order_id", "type": "long"}]}'),
        streams=[types.ReadStream(name=STREAM), types.ReadStream(name=f"{SESSION}/streams/b")],
        estimated_row_count=1200, estimated_total_bytes_scanned=96_000)


def arrow_batch(rows: int) -> bytes:
    batch = pa.record_batch([pa.array(range(rows), type=pa.int64())], names=["order_id"])
    return bytes(batch.serialize().to_pybytes())


def read_rows_response(rows: int) -> Any:
    return types.ReadRowsResponse(
        row_count=rows,
        arrow_record_batch=types.ArrowRecordBatch(serialized_record_batch=arrow_batch(rows)),
        stats=types.StreamStats(progress=types.StreamStats.Progress(at_response_start=0.0,
                                                                    at_response_end=0.5)))


def row_descriptor() -> descriptor_pb2.DescriptorProto:
    proto = descriptor_pb2.DescriptorProto(name="Order")
    proto.field.add(name="order_id", number=1,
                    type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    proto.field.add(name="note", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    return proto


def append_request(rows: int, offset: int | None = None, first: bool = True) -> Any:
    request = types.AppendRowsRequest(proto_rows=types.AppendRowsRequest.ProtoData(
        rows=types.ProtoRows(serialized_rows=[b"\x08" + bytes([n]) for n in range(rows)])))
    if offset is not None:
        request.offset = offset
    if first:
        request.write_stream = f"{TABLE}/streams/s1"
        request.proto_rows.writer_schema = types.ProtoSchema(proto_descriptor=row_descriptor())
    return request


def decode_one(path: str, direction: str, message: Any) -> storage.Summary:
    messages, truncated = storage.decode_body(storage.method_of(path), direction,
                                              storage.frame(serialized(message)))
    assert truncated is None
    assert messages[0].error is None
    return messages[0].fields


# Names, hosts and methods.

@pytest.mark.parametrize(("name", "expected"), [
    (TABLE, storage.Resource(project="proj", dataset_id="sales", table_id="orders")),
    (f"{TABLE}/streams/_default", storage.Resource(project="proj", dataset_id="sales",
                                                   table_id="orders", stream="_default")),
    (SESSION, storage.Resource(project="proj", location="us", session=SESSION)),
    (STREAM, storage.Resource(project="proj", location="us", session=SESSION, stream=STREAM)),
    ("projects/proj", storage.Resource(project="proj")),
    ("tables/orders", storage.Resource()),
    ("", storage.Resource()),
])
def test_resource_names_parsed(name: str, expected: storage.Resource) -> None:
    assert storage.parse_resource(name) == expected


@pytest.mark.parametrize(("host", "expected"), [
    ("bigquerystorage.googleapis.com", True),
    ("BigQueryStorage.googleapis.com.", True),
    ("bigquerystorage.mtls.googleapis.com", True),
    ("bigquerystorage.europe-west3.rep.googleapis.com", True),
    ("bigquerystorage-myendpoint.p.googleapis.com", True),
    ("bigquery.googleapis.com", False),
    ("bigquerystorage.googleapis.com.example.test", False),
])
def test_storage_hosts_recognised(host: str, expected: bool) -> None:
    assert storage.is_storage_host(host) is expected


@pytest.mark.parametrize(("content_type", "expected"), [
    ("application/grpc", True), ("application/grpc+proto", True),
    ("application/grpc-web", False), ("application/json", False), (None, False)])
def test_grpc_content_types(content_type: str | None, expected: bool) -> None:
    assert storage.is_grpc(content_type) is expected


def test_known_method_named_after_service() -> None:
    method = storage.method_of(WRITE + "AppendRows")
    assert (method.api_method, method.kind) == ("BigQueryWrite.AppendRows", storage.BIDI)


def test_unknown_method_metered_generically() -> None:
    method = storage.method_of("/google.cloud.bigquery.storage.v1beta2.BigQueryWrite/AppendRows")
    assert (method.api_method, method.kind, method.known) == (
        "grpc:google.cloud.bigquery.storage.v1beta2.BigQueryWrite.AppendRows", storage.BIDI,
        False)


def test_routing_header_values_merged() -> None:
    assert storage.routing_parameters(["", "write_stream=projects%2Fp%2Fx&a=1", "a=2"]) == \
        {"write_stream": "projects/p/x", "a": "1"}


# Message summaries.

def test_create_read_session_request_fields() -> None:
    fields = decode_one(READ + "CreateReadSession", storage.REQUEST,
                        create_read_session_request())
    assert fields == {
        "parent": "projects/proj", "table": TABLE, "data_format": "ARROW",
        "selected_fields": ["order_id", "amount"], "row_restriction": "amount > 100",
        "snapshot_time": "2025-11-24T16:00:00Z", "max_stream_count": 4,
        "preferred_min_stream_count": 0, "trace_id": None, "sample_percentage": 10.0}


def test_read_session_response_fields() -> None:
    fields = decode_one(READ + "CreateReadSession", storage.RESPONSE, read_session())
    assert (fields["read_session"], fields["streams"], fields["stream_count"],
            fields["estimated_row_count"], fields["schema_fields"]) == (
        SESSION, [STREAM, f"{SESSION}/streams/b"], 2, 1200, ["order_id"])


def test_read_rows_request_offset() -> None:
    fields = decode_one(READ + "ReadRows", storage.REQUEST,
                        types.ReadRowsRequest(read_stream=STREAM, offset=700))
    assert fields == {"read_stream": STREAM, "offset": 700}


def test_read_rows_response_counts_rows() -> None:
    fields = decode_one(READ + "ReadRows", storage.RESPONSE, read_rows_response(25))
    assert (fields["rows"], fields["format"], fields["progress"]) == (
        25, "arrow_record_batch", [0.0, 0.5])


def test_append_request_proto_rows() -> None:
    fields = decode_one(WRITE + "AppendRows", storage.REQUEST, append_request(3, offset=10))
    assert fields == {"write_stream": f"{TABLE}/streams/s1", "format": "proto", "rows": 3,
                      "payload_bytes": 6, "offset": 10,
                      "writer_schema": {"message": "Order", "fields": ["order_id", "note"]}}


def test_append_request_arrow_rows_counted_from_batch() -> None:
    request = types.AppendRowsRequest(write_stream=f"{TABLE}/streams/_default",
                                      arrow_rows=types.AppendRowsRequest.ArrowData(
                                          rows=types.ArrowRecordBatch(
                                              serialized_record_batch=arrow_batch(42))))
    fields = decode_one(WRITE + "AppendRows", storage.REQUEST, request)
    assert (fields["format"], fields["rows"]) == ("arrow", 42)


def test_append_response_in_band_error() -> None:
    response = types.AppendRowsResponse(
        error=status_pb2.Status(code=6, message="offset 0 exists"),
        row_errors=[types.RowError(index=1, code=types.RowError.RowErrorCode.FIELDS_ERROR,
                                   message="bad note")])
    fields = decode_one(WRITE + "AppendRows", storage.RESPONSE, response)
    assert fields["error"] == {"code": 6, "status": "ALREADY_EXISTS",
                               "message": "offset 0 exists"}
    assert fields["row_error_samples"] == [{"index": 1, "code": "FIELDS_ERROR",
                                            "message": "bad note"}]


def test_append_response_offset() -> None:
    response = types.AppendRowsResponse(
        append_result=types.AppendRowsResponse.AppendResult(offset=5))
    assert decode_one(WRITE + "AppendRows", storage.RESPONSE, response)["offset"] == 5


def test_batch_commit_stream_errors() -> None:
    response = types.BatchCommitWriteStreamsResponse(stream_errors=[types.StorageError(
        code=types.StorageError.StorageErrorCode.STREAM_FINALIZED, entity="s1",
        error_message="finalized")])
    fields = decode_one(WRITE + "BatchCommitWriteStreams", storage.RESPONSE, response)
    assert fields == {"commit_time": None, "stream_errors": [
        {"code": "STREAM_FINALIZED", "entity": "s1", "message": "finalized"}]}


@pytest.mark.parametrize(("path", "direction", "message", "expected"), [
    (WRITE + "CreateWriteStream", storage.REQUEST,
     types.CreateWriteStreamRequest(parent=TABLE, write_stream=types.WriteStream(
         type_=types.WriteStream.Type.PENDING)),
     {"parent": TABLE, "table": TABLE, "stream_type": "PENDING"}),
    (WRITE + "FinalizeWriteStream", storage.REQUEST,
     types.FinalizeWriteStreamRequest(name=f"{TABLE}/streams/s1"),
     {"write_stream": f"{TABLE}/streams/s1"}),
    (WRITE + "FinalizeWriteStream", storage.RESPONSE,
     types.FinalizeWriteStreamResponse(row_count=9), {"row_count": 9}),
    (WRITE + "FlushRows", storage.REQUEST,
     types.FlushRowsRequest(write_stream=f"{TABLE}/streams/s1", offset=4),
     {"write_stream": f"{TABLE}/streams/s1", "offset": 4}),
    (WRITE + "BatchCommitWriteStreams", storage.REQUEST,
     types.BatchCommitWriteStreamsRequest(parent=TABLE, write_streams=["a", "b"]),
     {"parent": TABLE, "table": TABLE, "write_streams": ["a", "b"], "write_stream_count": 2}),
    (READ + "SplitReadStream", storage.RESPONSE,
     types.SplitReadStreamResponse(primary_stream=types.ReadStream(name="p"),
                                   remainder_stream=types.ReadStream(name="r")),
     {"primary_stream": "p", "remainder_stream": "r"}),
])
def test_message_summaries(path: str, direction: str, message: Any,
                           expected: storage.Summary) -> None:
    assert decode_one(path, direction, message) == expected


# Framing.

def read_rows_body(*rows: int) -> bytes:
    return b"".join(storage.frame(serialized(read_rows_response(n))) for n in rows)


def test_stream_split_at_every_byte() -> None:
    body = read_rows_body(3, 4)
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE)
    messages = [m for i in range(len(body)) for m in meter.feed(body[i:i + 1])]
    assert [m.fields["rows"] for m in messages] == [3, 4]
    assert meter.finish() is None
    assert (meter.rows, meter.messages, meter.bytes) == (7, 2, len(body))


def test_stream_digest_covers_every_byte() -> None:
    body = read_rows_body(3, 4)
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE)
    meter.feed(body[:7])
    meter.feed(body[7:])
    assert meter.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(("encoding", "compress"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_message_decoded(encoding: str, compress: Any) -> None:
    payload = compress(serialized(read_rows_response(6)))
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE,
                                  encoding)
    (message,) = meter.feed(storage.frame(payload, compressed=True))
    assert (message.compressed, message.fields["rows"]) == (True, 6)


@pytest.mark.parametrize(("encoding", "payload", "error"), [
    ("identity", b"abc", "grpc-encoding is 'identity'"),
    ("snappy", b"abc", "grpc-encoding is 'snappy'"),
    ("gzip", b"not gzip at all", "corrupt gzip payload"),
    ("gzip", gzip.compress(b"x" * 100)[:20], "truncated gzip payload"),
])
def test_bad_compressed_message_is_decode_failure(encoding: str, payload: bytes,
                                                  error: str) -> None:
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE,
                                  encoding)
    (message,) = meter.feed(storage.frame(payload, compressed=True))
    assert error in str(message.error)


def test_decompression_bomb_refused() -> None:
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE,
                                  "gzip", max_message=1000)
    (message,) = meter.feed(storage.frame(gzip.compress(b"\0" * 100_000), compressed=True))
    assert "inflates to more than 1000 bytes" in str(message.error)


def test_oversized_message_counted_not_buffered() -> None:
    big, small = serialized(read_rows_response(500)), serialized(read_rows_response(2))
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE,
                                  max_message=len(big) - 1)
    body = storage.frame(big) + storage.frame(small)
    messages = [m for i in range(0, len(body), 100) for m in meter.feed(body[i:i + 100])]
    assert [m.error is not None for m in messages] == [True, False]
    assert meter.rows == 2
    assert meter.bytes == len(body)


def test_invalid_flag_stops_parsing() -> None:
    body = read_rows_body(3) + b"\x07\x00\x00\x00\x01x" + read_rows_body(4)
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE)
    messages = meter.feed(body)
    assert [m.fields["rows"] for m in messages] == [3]
    assert "flag byte 0x07" in str(meter.summary()["decode_error"])
    assert meter.bytes == len(body)


@pytest.mark.parametrize(("cut", "error"), [
    (3, "inside a gRPC message prefix"), (9, "inside a gRPC message of")])
def test_truncated_body_reported(cut: int, error: str) -> None:
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE)
    meter.feed(read_rows_body(3)[:cut])
    assert error in str(meter.finish())


def test_wrong_message_type_is_decode_failure() -> None:
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE)
    (message,) = meter.feed(storage.frame(b"\xff\xff\xff"))
    assert "not a valid ReadRowsResponse" in str(message.error)


def test_append_messages_digested_one_by_one() -> None:
    first, second = serialized(append_request(2, 0)), serialized(append_request(1, 2, False))
    meter = storage.MessageStream(storage.method_of(WRITE + "AppendRows"), storage.REQUEST,
                                  digest_messages=True)
    messages = meter.feed(storage.frame(first) + storage.frame(second))
    assert [m.sha256 for m in messages] == [hashlib.sha256(first).hexdigest(),
                                            hashlib.sha256(second).hexdigest()]


# Status.

def test_status_from_trailers() -> None:
    status = storage.grpc_status({"grpc-status": "5", "grpc-message": "Not%20found%3A%20t"})
    assert (status and status.name, status and status.message, status and status.outcome) == (
        "NOT_FOUND", "Not found: t", "error")


def test_status_details_reason_read() -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="STREAM_NOT_FOUND"))
    encoded = base64.b64encode(status_pb2.Status(code=5, details=[detail])
                               .SerializeToString()).decode().rstrip("=")
    status = storage.grpc_status({"grpc-status": "5", "grpc-status-details-bin": encoded})
    assert status is not None and status.reason == "STREAM_NOT_FOUND"


@pytest.mark.parametrize(("fields", "outcome"), [
    ({"grpc-status": "0"}, "done"), ({"grpc-status": "1"}, "cancelled"),
    ({"grpc-status": "14"}, "error"), ({"grpc-status": "x"}, "unknown")])
def test_status_outcomes(fields: dict[str, str], outcome: str) -> None:
    status = storage.grpc_status(fields)
    assert status is not None and status.outcome == outcome


def test_corrupt_status_details_reported() -> None:
    status = storage.grpc_status({"grpc-status": "3", "grpc-status-details-bin": "!!"})
    assert status is not None and "not a google.rpc.Status" in str(status.error)


def test_no_status_without_grpc_status() -> None:
    assert storage.grpc_status({"content-type": "application/grpc"}) is None


def test_local_error_is_trailers_only() -> None:
    headers = storage.local_error("not sent: disk full")
    status = storage.grpc_status(headers)
    assert status is not None and (status.name, status.message) == (
        "UNAVAILABLE", "not sent: disk full")


# REST job resources.

@pytest.mark.parametrize(("body", "expected"), [
    ((b'{"configuration": {"query": {"destinationTable": {"projectId": "p", '
      b'"datasetId": "_a1", "tableId": "anon9"}}}}'), "projects/p/datasets/_a1/tables/anon9"),
    (b'{"configuration": {"load": {}}}', None),
    (b'{"configuration": {"query": {"destinationTable": {"projectId": 1}}}}', None),
    (b"[]", None), (b"not json", None)])
def test_query_destination(body: bytes, expected: str | None) -> None:
    assert storage.query_destination(body) == expected


# Property-based: nothing escapes, whatever the bytes.

METHOD_PATHS = sorted(storage.METHODS) + ["/unknown.Service/Method"]


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(METHOD_PATHS), direction=st.sampled_from([storage.REQUEST,
                                                                        storage.RESPONSE]),
       encoding=st.sampled_from([None, "gzip", "deflate", "snappy"]),
       chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_raise(path: str, direction: str, encoding: str | None,
                                  chunks: list[bytes]) -> None:
    meter = storage.MessageStream(storage.method_of(path), direction, encoding,
                                  max_message=4096)
    for chunk in chunks:
        meter.feed(chunk)
    meter.finish()
    assert meter.bytes == sum(map(len, chunks))


VALID_BODIES = [
    (READ + "ReadRows", storage.RESPONSE, read_rows_body(3, 4)),
    (READ + "CreateReadSession", storage.REQUEST,
     storage.frame(serialized(create_read_session_request()))),
    (READ + "CreateReadSession", storage.RESPONSE, storage.frame(serialized(read_session()))),
    (WRITE + "AppendRows", storage.REQUEST, storage.frame(serialized(append_request(2, 0)))),
]


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(VALID_BODIES), data=st.data())
def test_mutated_messages_never_raise(case: tuple[str, str, bytes], data: st.DataObject) -> None:
    path, direction, body = case
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    messages, _ = storage.decode_body(storage.method_of(path), direction, bytes(mutated))
    assert all(isinstance(m.fields, dict) for m in messages)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, len(read_rows_body(3, 4))), max_size=10))
def test_any_chunking_decodes_alike(cuts: list[int]) -> None:
    body = read_rows_body(3, 4)
    bounds = [0, *sorted(cuts), len(body)]
    meter = storage.MessageStream(storage.method_of(READ + "ReadRows"), storage.RESPONSE)
    messages = [m for a, b in itertools.pairwise(bounds) for m in meter.feed(body[a:b])]
    assert [m.fields["rows"] for m in messages] == [3, 4]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_arrow_row_count_never_raises(data: bytes) -> None:
    count = storage.count_arrow_rows(data)
    assert count is None or isinstance(count, int)
