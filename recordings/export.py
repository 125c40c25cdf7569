"""Export sealed sessions, their digest chain and the public key to a directory or object store.

The destination gets the store's partitioned layout, so that many appliances can export into
one place and be queried together (docs/store.md shows how, with DuckDB and BigQuery):

    DEST/sessions/date=YYYY-MM-DD/<session_id>.parquet   byte for byte the sealed file
    DEST/digests/<key_id>.jsonl                          this store's whole digest chain
    DEST/keys/<key_id>.pub                               this store's public key

DEST is a local directory or an fsspec URL (`s3://bucket/prefix`, `gs://bucket/prefix`; the
`s3fs` or `gcsfs` package provides the scheme, and credentials come from their usual sources).
Each file is checked against its signed digest while it is copied, and a file that does not
match is not exported, so an export never carries a tampered session under a valid digest.
Files already at the destination with the signed size are skipped. The digest chain is written
last, so a reader of the destination never finds a digest whose file is not there yet.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import StoreError
from appliance.recordings import retention
from appliance.recordings.signing import Verifier, public_pem
from appliance.recordings.store import Store

logger = logging.getLogger(__name__)

_BLOCK = 1 << 20


@dataclass
class ExportResult:
    destination: str
    key_id: str
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "key_id": self.key_id, "copied": self.copied,
                "skipped": self.skipped, "refused": self.refused}


def _filesystem(destination: str) -> tuple[Any, str]:
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError as error:
        raise StoreError("Exporting needs the fsspec package; install it with "
                         "'pip install fsspec'.") from error
    try:
        filesystem, path = fsspec.core.url_to_fs(destination)
    except (ImportError, ValueError) as error:
        raise StoreError(f"Cannot export to {destination}: {error}. For s3:// install s3fs, "
                         "for gs:// install gcsfs.") from error
    return filesystem, str(path).rstrip("/")


def export(store: Store, destination: str, verifier: Verifier) -> ExportResult:
    """Copy every sealed session that matches its signed digest to `destination`."""
    store.check_readable()
    filesystem, base = _filesystem(destination)
    result = ExportResult(destination, verifier.key_id)
    current, _ = retention.sealed_sessions(store)
    try:
        for sid, entry in sorted(current.items()):
            name = str(entry["file"])
            target = f"{base}/{name}"
            if filesystem.exists(target) and filesystem.size(target) == entry["file_bytes"]:
                result.skipped.append(sid)
                continue
            if _copy_checked(store.root / name, filesystem, target, entry):
                result.copied.append(sid)
            else:
                result.refused.append(sid)
        filesystem.makedirs(f"{base}/keys", exist_ok=True)
        filesystem.pipe_file(f"{base}/keys/{verifier.key_id}.pub", public_pem(verifier.public_key))
        filesystem.makedirs(f"{base}/digests", exist_ok=True)
        filesystem.pipe_file(f"{base}/digests/{verifier.key_id}.jsonl",
                             store.digests_path.read_bytes())
    except OSError as error:
        raise StoreError(f"Exporting to {destination} failed: {error}") from error
    return result


def _copy_checked(source: Path, filesystem: Any, target: str, entry: dict[str, Any]) -> bool:
    """Copy `source` to `target` while hashing it; keep the copy only if it matches."""
    partial = f"{target}.partial"
    digest = hashlib.sha256()
    filesystem.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    try:
        with source.open("rb") as reader, filesystem.open(partial, "wb") as writer:
            for block in iter(lambda: reader.read(_BLOCK), b""):
                digest.update(block)
                writer.write(block)
    except FileNotFoundError:
        logger.error("Not exporting session %s: its file %s is missing", entry["session_id"],
                     source)
        if filesystem.exists(partial):
            filesystem.rm(partial)
        return False
    if digest.hexdigest() != entry["file_sha256"]:
        logger.error("Not exporting session %s: %s does not match its signed digest; run "
                     "'appliance sessions verify %s'", entry["session_id"], source,
                     entry["session_id"])
        filesystem.rm(partial)
        return False
    filesystem.mv(partial, target)
    return True
