"""Retention: remove whole sealed sessions older than a policy, and sign each removal.

A session is old when its last event (the signed `last_ts_ns` of its digest) lies more than the
policy's number of days in the past. Each removal first appends a signed `prune` entry to the
digest chain naming the session's digest, then deletes the Parquet file and the catalog row, so
verification shows the session as pruned rather than deleted. Live journals are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from appliance.errors import StoreError
from appliance.recordings import digests, views
from appliance.recordings.journal import fsync_directory
from appliance.recordings.store import Store

logger = logging.getLogger(__name__)

DAY_NS = 86_400 * 1_000_000_000


@dataclass(frozen=True)
class Pruned:
    session_id: str
    file: str
    last_ts_ns: int | None
    digest_hash: str | None  # of the prune entry; None in a dry run

    def as_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "file": self.file,
                "last_ts_ns": self.last_ts_ns, "prune_digest_hash": self.digest_hash}


def sealed_sessions(store: Store) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Return the newest digest of every session not pruned, and the files of pruned ones."""
    current: dict[str, dict[str, Any]] = {}
    pruned: dict[str, str] = {}
    for entry in digests.read(store.digests_path).entries:
        sid = str(entry.get("session_id"))
        if entry.get("type") == digests.SESSION:
            current[sid] = entry
            pruned.pop(sid, None)
        elif entry.get("type") == digests.PRUNE and sid in current \
                and current[sid].get("digest_hash") == entry.get("pruned_digest_hash"):
            pruned[sid] = str(current.pop(sid)["file"])
    return current, pruned


def prune(store: Store, older_than_days: int, reason: str, dry_run: bool = False,
          now_ns: int | None = None) -> list[Pruned]:
    """Remove sealed sessions whose last event is older than `older_than_days` days."""
    if older_than_days < 1:
        raise StoreError(f"A retention of {older_than_days} days would remove sessions "
                         "recorded today; use at least 1 day.")
    cutoff = (now_ns if now_ns is not None else time.time_ns()) - older_than_days * DAY_NS
    store.check_readable()
    signer = None if dry_run else store.signer
    removed: list[Pruned] = []
    with store.catalog(write=not dry_run) as connection:
        current, pruned = sealed_sessions(store)
        if signer is not None:
            # A prune stopped after signing a removal left the file; finish that removal.
            for sid, file in sorted(pruned.items()):
                if (store.root / file).exists():
                    logger.warning("Removing the file of session %s, whose pruning was signed "
                                   "but not finished", sid)
                    _remove(store, connection, sid, store.root / file)
        for sid, entry in sorted(current.items()):
            ended = entry.get("last_ts_ns") or entry.get("sealed_at_ns")
            if not isinstance(ended, int) or ended >= cutoff \
                    or store.journal_path(sid).exists():
                continue
            if signer is None:
                removed.append(Pruned(sid, str(entry["file"]), ended, None))
                continue
            record = digests.append(store.digests_path, signer, {
                "type": digests.PRUNE,
                "session_id": sid,
                "pruned_digest_hash": entry["digest_hash"],
                "file": entry["file"],
                "file_sha256": entry["file_sha256"],
                "older_than_days": older_than_days,
                "reason": reason,
                "pruned_at_ns": time.time_ns(),
            })
            _remove(store, connection, sid, store.root / str(entry["file"]))
            removed.append(Pruned(sid, str(entry["file"]), ended, record["digest_hash"]))
            logger.warning("Pruned session %s (%s), last event at %d ns; removal signed as "
                           "digest %s", sid, reason, ended, record["digest_hash"])
        if removed and not dry_run:
            views.create(connection, store, persistent=True)
    return removed


def _remove(store: Store, connection: duckdb.DuckDBPyConnection, sid: str, path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # Only succeeds once the date partition is empty.
        connection.execute("DELETE FROM session_index WHERE session_id = ?", [sid])
    except (OSError, duckdb.Error) as error:
        raise StoreError(f"Pruning session {sid} failed after its removal was signed: "
                         f"{error}. Run the prune again to finish it.") from error
