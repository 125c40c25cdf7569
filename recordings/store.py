"""The root-owned recording store: live journals, sealed Parquet files, digests and the catalog.

Layout under the store directory (mode 0700, owned by root), documented in docs/store.md:

    journal/<session_id>.jsonl                      live and interrupted sessions
    journal/<session_id>.head                       the signed head of each live journal
    sessions/date=YYYY-MM-DD/<session_id>.parquet   sealed sessions, one file each
    digests.jsonl                                   the signed digest chain (recordings.digests)
    signing-key.pub                                 the public half of the signing key
    catalog.duckdb                                  session_index, store_meta and the views
    catalog.lock                                    serialises catalog and digest writers

A running session holds an exclusive flock on its journal, so a journal whose lock can be
taken belongs to a process that died: `recover` seals it as interrupted. The catalog is an index
for queries, rebuilt from the files if need be; verification never trusts it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from appliance.errors import StoreError
from appliance.recordings import digests, migrations, signing, views
from appliance.recordings import journal as journal_module
from appliance.recordings.journal import Journal, canonical, event_hash
from appliance.recordings.schema import EVENT_COLUMNS, SCHEMA_VERSION, SESSION_RECOVERED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SealedSession:
    """What sealing a session produced."""

    session_id: str
    parquet: Path
    events: int
    status: str


class Store:
    """One store directory; every method translates OS and DuckDB errors into StoreError."""

    def __init__(self, root: Path, signing_key: Path | None = None) -> None:
        self.root = root
        self.journal_dir = root / "journal"
        self.sessions_dir = root / "sessions"
        self.catalog_path = root / "catalog.duckdb"
        self.digests_path = root / digests.DIGESTS_NAME
        self.public_key_path = root / signing.PUBLIC_KEY_NAME
        self.signing_key = signing_key
        self._signer: signing.Signer | None = None

    @property
    def signer(self) -> signing.Signer:
        """The signing key, generated at first use; its public half is exported beside the store.

        Sealing, recovery, migration and pruning sign, so they need it; reading does not.
        """
        if self.signing_key is None:
            raise StoreError(f"No signing key is configured for the store {self.root}; set "
                             f"store.signing_key (default {signing.DEFAULT_SIGNING_KEY}).")
        if self._signer is None:
            self._signer = signing.load_or_create(self.signing_key)
            if self.root.is_dir():
                signing.export_public_key(self._signer, self.public_key_path)
        return self._signer

    # -- setup ---------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the store if needed and check it is private to root."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self.root.stat()
            if info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o077:
                os.chown(self.root, 0, 0)
                os.chmod(self.root, 0o700)
            for directory in (self.journal_dir, self.sessions_dir):
                directory.mkdir(mode=0o700, exist_ok=True)
        except PermissionError as error:
            raise StoreError(
                f"Cannot set up the store {self.root}: {error.strerror}. The store must be "
                "owned by root with mode 0700; run appliance as root."
            ) from error
        except OSError as error:
            raise StoreError(f"Cannot set up the store {self.root}: {error.strerror}.") from error

    def check_readable(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"The store {self.root} does not exist; run a session first or "
                             "set store.path in the configuration.")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreError(f"The store {self.root} is not readable by this user; it is "
                             "private to root, so run the command as root.")

    # -- journals ------------------------------------------------------------------------------

    def journal_path(self, session_id: str) -> Path:
        return self.journal_dir / f"{session_id}.jsonl"

    def open_journal(self, session_id: str) -> Journal:
        """Create the session's journal, locked as live until it is released."""
        signer = self.signer if self.signing_key is not None else None
        return Journal(self.journal_path(session_id), session_id, signer)

    def live_journals(self) -> list[Path]:
        return sorted(self.journal_dir.glob("*.jsonl")) if self.journal_dir.is_dir() else []

    # -- sealing -------------------------------------------------------------------------------

    def seal(self, session_id: str) -> SealedSession:
        """Turn a closed journal into its Parquet file, register it and remove the journal.

        The caller still holds the journal's liveness lock, so recovery in another process
        cannot seal the same session at the same time.
        """
        path = self.journal_path(session_id)
        contents = journal_module.read(path)
        if contents.torn_tail is not None or contents.problems:
            raise StoreError(f"Journal {path} has a torn or invalid record; it is kept for "
                             "recovery at the next start.")
        return self._seal_events(session_id, contents.events, path)

    def recover(self) -> list[SealedSession]:
        """Seal every journal left by a process that died, marking its session interrupted."""
        recovered = []
        for path in self.live_journals():
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # A running session owns it.
                if os.fstat(fd).st_nlink == 0:
                    continue  # Sealed and removed while this process waited for the lock.
                recovered.append(self._recover_one(path, fd))
            finally:
                os.close(fd)
        return recovered

    def _recover_one(self, path: Path, fd: int) -> SealedSession:
        session_id = path.stem
        contents = journal_module.read(path)
        detail: dict[str, Any] = {"reason": "the appliance process ended without teardown"}
        if contents.torn_tail is not None:
            torn = contents.torn_tail
            detail["torn_record_bytes"] = len(torn)
            detail["torn_record_sha256"] = hashlib.sha256(torn).hexdigest()
            logger.warning("Session %s: journal ends in a torn record of %d bytes; it is "
                           "excluded and its digest kept in the recovery event", session_id,
                           len(torn))
        if contents.problems:
            detail["invalid_records"] = contents.problems
        events = contents.events
        for kind, message in journal_module.check_head(path, session_id, events, self.signer):
            detail.setdefault("journal_head", []).append({"kind": kind, "message": message})
            log = logger.info if kind == "head_missing" else logger.error
            log("Session %s: %s", session_id, message)
        previous = events[-1]["hash"] if events else journal_module.genesis_hash(session_id)
        recovery = {
            "kind": SESSION_RECOVERED,
            "session_id": session_id,
            "seq": events[-1]["seq"] + 1 if events else 0,
            "ts_ns": _now_ns(),
            "detail": json.dumps(detail, sort_keys=True),
            "prev_hash": previous,
        }
        recovery["hash"] = event_hash(recovery)
        events.append(recovery)
        if contents.problems:
            logger.warning("Session %s: %d invalid journal lines were skipped", session_id,
                           len(contents.problems))
        # The torn tail is cut off before the recovery event is appended, so the journal on
        # disk stays a valid chain if sealing fails and recovery runs again.
        os.ftruncate(fd, contents.intact_length)
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, canonical(recovery) + b"\n")
        os.fsync(fd)
        logger.warning("Recovered interrupted session %s with %d events", session_id,
                       len(events))
        return self._seal_events(session_id, events, path, origin="recovery")

    def _seal_events(self, session_id: str, events: list[dict[str, Any]],
                     journal_path: Path, origin: str = "seal") -> SealedSession:
        started = events[0]["ts_ns"] if events else _now_ns()
        day = datetime.datetime.fromtimestamp(started / 1e9, datetime.UTC).date().isoformat()
        directory = self.sessions_dir / f"date={day}"
        target = directory / f"{session_id}.parquet"
        status = _status_of(events)
        facts = digests.session_facts(events)
        signer = self.signer
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_parquet(events, target)
            journal_module.fsync_directory(directory)
            with self.catalog(write=True) as connection:
                # The digest is appended first: a crash after it leaves the journal in place,
                # and sealing it again appends a newer digest that supersedes this one.
                entry = digests.append(self.digests_path, signer, {
                    "type": digests.SESSION,
                    "origin": origin,
                    "session_id": session_id,
                    "status": status,
                    "file": str(target.relative_to(self.root)),
                    "file_sha256": digests.sha256_file(target),
                    "file_bytes": target.stat().st_size,
                    **facts,
                    "schema_version": SCHEMA_VERSION,
                    "sealed_at_ns": _now_ns(),
                })
                register(connection, entry, day)
                views.create(connection, self, persistent=True)
            journal_path.unlink()
            journal_module.head_path(journal_path).unlink(missing_ok=True)
            journal_module.fsync_directory(journal_path.parent)
        except (OSError, duckdb.Error) as error:
            raise StoreError(f"Sealing session {session_id} into {target} failed: {error}. "
                             f"The journal {journal_path} is kept.") from error
        logger.info("Sealed session %s: %d events in %s, digest %s", session_id, len(events),
                    target, entry["digest_hash"])
        return SealedSession(session_id, target, len(events), status)

    # -- catalog -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def catalog(self, write: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the catalog under the store's catalog lock (exclusive when writing)."""
        if not write and not self.catalog_path.exists():
            with self.catalog(write=True):
                pass  # Creates the catalog and its tables.
        lock_path = self.root / "catalog.lock"
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StoreError(f"Cannot open {lock_path}: {error.strerror}.") from error
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            connection = duckdb.connect(str(self.catalog_path), read_only=not write)
            try:
                if write:
                    migrations.migrate(connection, self)
                else:
                    migrations.check_version(connection)
                yield connection
            finally:
                connection.close()
        except duckdb.Error as error:
            raise StoreError(f"The catalog {self.catalog_path} cannot be opened: {error}") \
                from error
        finally:
            os.close(lock_fd)

    @contextlib.contextmanager
    def query_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open an in-memory DuckDB with the store's views over sealed and live sessions."""
        self.check_readable()
        with self.catalog() as catalog:
            indexed = catalog.execute("SELECT file FROM session_index ORDER BY session_id") \
                .fetchall()
        connection = duckdb.connect(":memory:")
        try:
            views.create(connection, self, persistent=False,
                         parquet_files=[str(self.root / row[0]) for row in indexed])
            yield connection
        finally:
            connection.close()

    def sealed_files(self) -> list[str]:
        with self.catalog() as connection:
            return [str(self.root / row[0]) for row in
                    connection.execute("SELECT file FROM session_index").fetchall()]


def register(connection: duckdb.DuckDBPyConnection, entry: dict[str, Any], day: str) -> None:
    """Index a session digest entry in the catalog's session_index."""
    connection.execute(
        "INSERT OR REPLACE INTO session_index (session_id, date, file, events, status, "
        "last_hash, file_sha256, sealed_at, digest_hash, started_ns, ended_ns) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [entry["session_id"], day, entry["file"], entry["events"], entry["status"],
         entry["last_hash"], entry["file_sha256"],
         datetime.datetime.fromtimestamp(entry["sealed_at_ns"] / 1e9, datetime.UTC)
         .replace(tzinfo=None),
         entry["digest_hash"], entry["first_ts_ns"], entry["last_ts_ns"]],
    )


def _status_of(events: list[dict[str, Any]]) -> str:
    kinds = {event.get("kind") for event in events}
    if SESSION_RECOVERED in kinds:
        return "interrupted"
    return "completed" if "session_end" in kinds else "incomplete"


def _write_parquet(events: list[dict[str, Any]], target: Path) -> None:
    """Write events, each with its canonical `record`, to `target` atomically."""
    # The rows file sits beside the partition folders, not in one, so DuckDB's hive-partition
    # detection does not add a `date` column from its path.
    with tempfile.NamedTemporaryFile("wb", dir=target.parent.parent, suffix=".jsonl",
                                     delete=False) as rows:
        for event in events:
            row = {column: event.get(column) for column in EVENT_COLUMNS}
            row["record"] = canonical(event).decode("utf-8")
            rows.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    partial = target.with_suffix(".parquet.partial")
    columns = ", ".join(f"'{name}': '{kind}'" for name, kind in EVENT_COLUMNS.items())
    try:
        connection = duckdb.connect(":memory:")
        try:
            connection.execute(
                f"COPY (SELECT * FROM read_json(?, columns={{{columns}}}, "
                "format='newline_delimited', hive_partitioning=false, "
                "maximum_object_size=1073741824) ORDER BY seq) "
                "TO '" + str(partial).replace("'", "''") + "' (FORMAT parquet, "
                "COMPRESSION zstd)",
                [rows.name],
            )
        finally:
            connection.close()
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(partial, 0o600)
        os.replace(partial, target)
    finally:
        os.unlink(rows.name)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _now_ns() -> int:
    return time.time_ns()
