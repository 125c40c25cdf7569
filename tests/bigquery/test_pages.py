"""Tests for the streaming result-page digest: row counts, skeletons and digests chunk by chunk."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.bigquery import pages
from appliance.bigquery.pages import PageDigest, summarise
from tests.bigquery.test_rest import FIXTURES, body_bytes, load_fixture


def streamed(body: bytes, encoding: str | None, size: int) -> pages.PageSummary:
    digest = PageDigest(encoding)
    for start in range(0, len(body), size):
        assert digest(body[start : start + size]) == body[start : start + size]
    digest(b"")
    return digest.summary()


ROW = {"f": [{"v": "1"}, {"v": 'a "quoted" ] } , value \\'}, {"v": None}]}


@pytest.mark.parametrize(
    ("page", "rows", "skeleton"),
    [
        ({"rows": [ROW, ROW, ROW], "totalRows": "3"}, 3, {"rows": [], "totalRows": "3"}),
        ({"totalRows": "0", "jobComplete": True}, None, {"totalRows": "0", "jobComplete": True}),
        ({"rows": []}, 0, {"rows": []}),
        ({"schema": {"rows": [1, 2]}, "rows": [ROW]}, 1, {"schema": {"rows": [1, 2]}, "rows": []}),
        ({"kind": "rows", "rows": [ROW, ROW]}, 2, {"kind": "rows", "rows": []}),
        ({"rows\\u0073": [ROW], "rows": [[1], "x", 3]}, 3, {"rows\\u0073": [ROW], "rows": []}),
    ],
)
@pytest.mark.parametrize("size", [1, 3, 64, 100_000])
def test_rows_counted_and_cut_from_skeleton(
    page: dict[str, Any], rows: int | None, skeleton: dict[str, Any], size: int
) -> None:
    body = json.dumps(page).encode()
    summary = streamed(body, None, size)
    assert summary.rows == rows
    assert json.loads(summary.skeleton or b"") == json.loads(json.dumps(skeleton))
    assert summary.error is None


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        (None, lambda data: data),
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
    ],
)
def test_digest_is_of_decoded_body(encoding: str | None, encode: Any) -> None:
    body = json.dumps({"rows": [ROW] * 50, "totalRows": "50"}).encode()
    wire = encode(body)
    summary = streamed(wire, encoding, 13)
    assert summary.digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert (summary.wire_bytes, summary.body_bytes, summary.rows) == (len(wire), len(body), 50)


def test_unknown_encoding_digests_wire_bytes() -> None:
    summary = summarise(b"\x00\x01", "br")
    assert (summary.digest_of, summary.rows, summary.skeleton) == ("wire", None, None)
    assert summary.error == "unsupported content encoding: 'br'"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"rows": [{"f": []}', "result page is not complete JSON"),
        (b'{"a": "unterminated', "result page is not complete JSON"),
    ],
)
def test_incomplete_page_reported(body: bytes, error: str) -> None:
    assert summarise(body, None).error == error


def test_corrupt_gzip_reported() -> None:
    summary = summarise(b"\x1f\x8bnot gzip at all", "gzip")
    assert summary.error is not None
    assert summary.error.startswith("body could not be decompressed")


def test_large_skeleton_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages, "MAX_SKELETON_BYTES", 100)
    body = json.dumps({"schema": "x" * 200, "rows": [ROW]}).encode()
    summary = summarise(body, None)
    assert summary.skeleton is None
    assert summary.error == "result page outside its rows is over 100 bytes"


def test_memory_does_not_grow_with_rows() -> None:
    digest = PageDigest(None)
    digest(b'{"totalRows": "200000", "rows": [')
    row = json.dumps(ROW).encode()
    for index in range(200_000):
        digest((b"," if index else b"") + row)
    digest(b"]}")
    digest(b"")
    summary = digest.summary()
    assert summary.rows == 200_000
    assert len(summary.skeleton or b"") < 64


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*.json")))
def test_fixture_pages_count_like_the_decoder(name: str) -> None:
    response = load_fixture(name)["response"]
    body = body_bytes(response)
    if not body.startswith(b"{") or response["status"] != 200:
        pytest.skip("not a JSON object response")
    payload = json.loads(body)
    summary = streamed(body, None, 5)
    expected = len(payload["rows"]) if "rows" in payload else None
    assert summary.rows == expected


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400), size=st.integers(min_value=1, max_value=50),
       encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity, gzip"]))
def test_random_bytes_never_raise(body: bytes, size: int, encoding: str | None) -> None:
    summary = streamed(body, encoding, size)
    assert summary.wire_bytes == len(body)
    assert "scan failed" not in (summary.error or "")


@settings(max_examples=200, deadline=None)
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["rows", "f", "v", "x"]) | st.text(max_size=5), children,
                      max_size=4),
    max_leaves=25,
), size=st.integers(min_value=1, max_value=20))
def test_random_json_skeleton_parses(value: Any, size: int) -> None:
    body = json.dumps({"kind": "page", "data": value}).encode()
    summary = streamed(body, None, size)
    assert summary.error is None
    assert json.loads(summary.skeleton or b"")["kind"] == "page"
