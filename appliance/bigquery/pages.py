"""Count and digest BigQuery result pages as they stream through, without holding their rows.

A result page (jobs.query, jobs.getQueryResults, tabledata.list) can be hundreds of megabytes,
almost all of it in the top-level ``rows`` array. ``PageDigest`` is fed the body chunk by
chunk as it crosses the wire and returns each chunk unchanged. It undoes the
``Content-Encoding`` on a copy, hashes the decoded bytes with SHA-256, counts the elements of
``rows``, and keeps a *skeleton*: the page with the contents of ``rows`` cut out
(``"rows": []``), which is small and contains the job outcome and statistics for the decoder in
``appliance.bigquery.rest``. Memory stays bounded by ``MAX_SKELETON_BYTES`` whatever the page
size. Nothing here raises on traffic: a problem becomes ``error``.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

MAX_SKELETON_BYTES = 1024 * 1024
"""Largest page outside ``rows`` that is kept for decoding."""

_STRUCTURE = re.compile(rb'[\\"{}\[\],:]')
_STRING_END = re.compile(rb'[\\"]')
_MAX_KEY_BYTES = 64


@dataclass(frozen=True, slots=True)
class PageSummary:
    """What passed: wire and decoded sizes, the digest, the row count and the skeleton.

    ``digest`` is ``sha256:<hex>`` of the decoded body (what the agent's JSON parser read), or
    of the wire bytes when the encoding could not be undone (``digest_of`` names which).
    ``rows`` is None when the page has no ``rows`` array or could not be scanned.
    """

    wire_bytes: int
    body_bytes: int
    digest: str
    digest_of: str
    rows: int | None
    skeleton: bytes | None
    error: str | None


class _JsonScanner:
    """Tracks JSON structure across chunks, counting and cutting out the top-level rows."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.key = bytearray()
        self.key_too_long = False
        self.last_string: bytes | None = None
        self.current_key: bytes | None = None
        self.rows_depth: int | None = None
        self.rows: int | None = None
        self.expect_row = False
        self.skeleton = bytearray()
        self.overflow = False

    def feed(self, data: bytes) -> None:
        emit_from = 0
        position = 0
        length = len(data)
        while position < length:
            if self.in_string:
                position = self._in_string(data, position)
                continue
            match = _STRUCTURE.search(data, position)
            if match is None:
                if self._expects_row() and data[position:].strip():
                    self._count_row()
                break
            index = match.start()
            if self._expects_row() and data[position:index].strip():
                self._count_row()
            emit_from = self._structure(data, index, emit_from)
            position = index + 1
        if self.rows_depth is None:
            self._emit(data[emit_from:])

    def _in_string(self, data: bytes, position: int) -> int:
        if self.escaped:
            self.escaped = False
            self._key_bytes(data[position : position + 1])
            return position + 1
        match = _STRING_END.search(data, position)
        if match is None:
            self._key_bytes(data[position:])
            return len(data)
        index = match.start()
        self._key_bytes(data[position:index])
        if data[index : index + 1] == b"\\":
            self.escaped = True
            self._key_bytes(b"\\")
            return index + 1
        self.in_string = False
        self.last_string = None if self.key_too_long else bytes(self.key)
        return index + 1

    def _key_bytes(self, chunk: bytes) -> None:
        if self.depth != 1 or self.key_too_long:
            return
        if len(self.key) + len(chunk) > _MAX_KEY_BYTES:
            self.key_too_long = True
            return
        self.key += chunk

    def _structure(self, data: bytes, index: int, emit_from: int) -> int:
        char = data[index : index + 1]
        if char == b'"':
            if self._expects_row():
                self._count_row()
            self.in_string = True
            self.key.clear()
            self.key_too_long = False
        elif char == b":":
            if self.depth == 1:
                self.current_key = self.last_string
        elif char == b",":
            if self.rows_depth is not None and self.depth == self.rows_depth:
                self.expect_row = True
            if self.depth == 1:
                self.current_key = None
        elif char in (b"{", b"["):
            if self._expects_row():
                self._count_row()
            self.depth += 1
            if char == b"[" and self.depth == 2 and self.current_key == b"rows" \
                    and self.rows_depth is None:
                self._emit(data[emit_from : index + 1])
                self.rows_depth = 2
                self.rows = 0
                self.expect_row = True
        else:
            if self.rows_depth is not None and self.depth == self.rows_depth and char == b"]":
                self.rows_depth = None
                self.expect_row = False
                emit_from = index
            self.depth -= 1
        return emit_from

    def _expects_row(self) -> bool:
        return self.expect_row and self.depth == self.rows_depth

    def _count_row(self) -> None:
        self.rows = (self.rows or 0) + 1
        self.expect_row = False

    def _emit(self, chunk: bytes) -> None:
        if self.overflow or not chunk:
            return
        if len(self.skeleton) + len(chunk) > MAX_SKELETON_BYTES:
            self.overflow = True
            self.skeleton.clear()
            return
        self.skeleton += chunk

    def complete(self) -> bool:
        return self.depth == 0 and not self.in_string


class PageDigest:
    """A mitmproxy stream callable: returns every chunk unchanged and summarises the body.

    ``content_encoding`` is the response's Content-Encoding header. Call ``summary()`` after
    the final, empty chunk.
    """

    def __init__(self, content_encoding: str | None) -> None:
        self._wire = hashlib.sha256()
        self._body = hashlib.sha256()
        self._scanner = _JsonScanner()
        self._wire_bytes = 0
        self._body_bytes = 0
        self._error: str | None = None
        self._decompressors = _decompressors(content_encoding)
        if self._decompressors is None:
            self._error = f"unsupported content encoding: {content_encoding!r}"[:120]

    def __call__(self, chunk: bytes) -> bytes:
        try:
            self._feed(chunk)
        except Exception as error:  # noqa: BLE001 - the proxy must never fail on traffic.
            self._error = self._error or f"page scan failed: {type(error).__name__}"
        return chunk

    def _feed(self, chunk: bytes) -> None:
        self._wire.update(chunk)
        self._wire_bytes += len(chunk)
        if self._decompressors is None:
            return
        data = chunk
        for decompressor in self._decompressors:
            try:
                data = decompressor.decompress(data) if data else decompressor.flush()
            except zlib.error as error:
                self._error = self._error or f"body could not be decompressed: {error}"
                self._decompressors = None
                return
        self._body.update(data)
        self._body_bytes += len(data)
        if self._error is None:
            self._scanner.feed(data)

    def summary(self) -> PageSummary:
        decoded = self._decompressors is not None
        scanner = self._scanner
        error = self._error
        if error is None and not scanner.complete():
            error = "result page is not complete JSON"
        if error is None and scanner.overflow:
            error = f"result page outside its rows is over {MAX_SKELETON_BYTES} bytes"
        return PageSummary(
            wire_bytes=self._wire_bytes,
            body_bytes=self._body_bytes if decoded else self._wire_bytes,
            digest="sha256:" + (self._body if decoded else self._wire).hexdigest(),
            digest_of="body" if decoded else "wire",
            rows=scanner.rows if error is None else None,
            skeleton=bytes(scanner.skeleton) if error is None else None,
            error=error,
        )


def _decompressors(content_encoding: str | None) -> list[zlib._Decompress] | None:
    """Return decompressors that undo the encodings in order, or None for an unknown one."""
    result = []
    names = [name.strip().lower() for name in (content_encoding or "").split(",")]
    for name in reversed([name for name in names if name and name != "identity"]):
        if name in ("gzip", "x-gzip"):
            result.append(zlib.decompressobj(zlib.MAX_WBITS | 16))
        elif name == "deflate":
            result.append(zlib.decompressobj(zlib.MAX_WBITS))
        else:
            return None
    return result


def summarise(body: bytes, content_encoding: str | None) -> PageSummary:
    """Summarise a whole body at once, as the stream callable would."""
    digest = PageDigest(content_encoding)
    digest(body)
    digest(b"")
    return digest.summary()
