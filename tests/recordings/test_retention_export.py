"""Retention (`store prune`) and export (`store export`) over a real store, to a directory and,
through s3fs, to a local S3 server (moto, on 127.0.0.1) when it is installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from appliance.errors import StoreError
from appliance.recordings import digests, retention
from appliance.recordings.export import export
from appliance.recordings.signing import load_public_key
from appliance.recordings.store import SealedSession, Store
from appliance.recordings.verify import FAILURE, NOTICE, verify_store

WriteSession = Callable[..., Any]
# 2024-02-29 plus 40 days: sessions of the fixture are 40 days old.
NOW_NS = 1_709_208_000_000_000_000 + 40 * retention.DAY_NS


@pytest.fixture
def sealed(store: Store, write_session: WriteSession) -> list[SealedSession]:
    return [write_session(f"sess-{n}", [{"kind": "request", "sql": "SELECT 1"}])
            for n in range(2)]


def statuses(report: Any, severity: str) -> set[tuple[str, str | None]]:
    return {(f.kind, f.session_id) for s in report.sessions for f in s.findings
            if f.severity == severity}


# -- retention -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("days", "removed"), [(30, 2), (41, 0)])
def test_prune_by_age(store: Store, sealed: list[SealedSession], days: int,
                      removed: int) -> None:
    pruned = retention.prune(store, days, "test", now_ns=NOW_NS)

    assert len(pruned) == removed
    assert sum(s.parquet.exists() for s in sealed) == 2 - removed


def test_prune_records_signed_removal(store: Store, sealed: list[SealedSession]) -> None:
    retention.prune(store, 30, "older than 30 days (test)", now_ns=NOW_NS)

    entries = digests.read(store.digests_path).entries
    prunes = [e for e in entries if e["type"] == digests.PRUNE]

    assert [e["session_id"] for e in prunes] == ["sess-0", "sess-1"]
    assert prunes[0]["pruned_digest_hash"] == entries[0]["digest_hash"]
    assert prunes[0]["reason"] == "older than 30 days (test)"


def test_prune_removes_catalog_rows(store: Store, sealed: list[SealedSession]) -> None:
    retention.prune(store, 30, "test", now_ns=NOW_NS)

    with store.catalog() as connection:
        count = connection.execute("SELECT count(*) FROM session_index").fetchone()

    assert count == (0,)


def test_prune_dry_run_removes_nothing(store: Store, sealed: list[SealedSession]) -> None:
    pruned = retention.prune(store, 30, "test", dry_run=True, now_ns=NOW_NS)

    assert [p.session_id for p in pruned] == ["sess-0", "sess-1"]
    assert all(s.parquet.exists() for s in sealed)
    assert len(digests.read(store.digests_path).entries) == 2


def test_prune_skips_live_journal(store: Store, write_session: WriteSession) -> None:
    write_session("sess-live", [], seal=False)

    assert retention.prune(store, 1, "test", now_ns=NOW_NS) == []


def test_prune_rejects_zero_days(store: Store) -> None:
    with pytest.raises(StoreError, match="at least 1 day"):
        retention.prune(store, 0, "test")


def test_pruned_store_verifies(store: Store, sealed: list[SealedSession]) -> None:
    retention.prune(store, 30, "test", now_ns=NOW_NS)

    report = verify_store(store.root, load_public_key(store.public_key_path), "test")

    assert report.ok
    assert statuses(report, NOTICE) == {("pruned", "sess-0"), ("pruned", "sess-1")}


# -- export --------------------------------------------------------------------------------------


def test_export_copies_partitioned_layout(store: Store, sealed: list[SealedSession],
                                          tmp_path: Path) -> None:
    target = tmp_path / "fleet"

    result = export(store, str(target), store.signer)

    assert result.copied == ["sess-0", "sess-1"]
    for session in sealed:
        copy = target / session.parquet.relative_to(store.root)
        assert copy.read_bytes() == session.parquet.read_bytes()
    assert (target / "digests" / f"{store.signer.key_id}.jsonl").read_bytes() == \
        store.digests_path.read_bytes()
    assert (target / "keys" / f"{store.signer.key_id}.pub").exists()


def test_export_verifies_with_public_key_only(store: Store, sealed: list[SealedSession],
                                              tmp_path: Path) -> None:
    target = tmp_path / "fleet"
    export(store, str(target), store.signer)

    report = verify_store(target, load_public_key(store.public_key_path), "auditor")

    assert report.ok
    assert [s.session_id for s in report.sessions] == ["sess-0", "sess-1"]


def test_export_second_run_skips_copied(store: Store, sealed: list[SealedSession],
                                        tmp_path: Path) -> None:
    export(store, str(tmp_path / "fleet"), store.signer)

    result = export(store, str(tmp_path / "fleet"), store.signer)

    assert result.copied == []
    assert result.skipped == ["sess-0", "sess-1"]


def test_export_refuses_tampered_file(store: Store, sealed: list[SealedSession],
                                      tmp_path: Path) -> None:
    with open(sealed[1].parquet, "r+b") as handle:
        handle.seek(100)
        handle.write(b"X")
    target = tmp_path / "fleet"

    result = export(store, str(target), store.signer)
    report = verify_store(target, load_public_key(store.public_key_path), "auditor")

    assert result.refused == ["sess-1"]
    assert statuses(report, FAILURE) == {("file_missing", "sess-1")}


def seal_one(store: Store, session_id: str) -> None:
    journal = store.open_journal(session_id)
    journal.append_sync({"kind": "session_start", "ts_ns": NOW_NS})
    journal.close()
    try:
        store.seal(session_id)
    finally:
        journal.release()


@pytest.fixture
def fleet(store: Store, sealed: list[SealedSession], tmp_path: Path) -> Path:
    """Two appliances, each with its own key, exported into one directory."""
    other = Store(tmp_path / "other", signing_key=tmp_path / "other-key.pem")
    other.ensure()
    seal_one(other, "sess-other")
    target = tmp_path / "fleet"
    export(store, str(target), store.signer)
    export(other, str(target), other.signer)
    return target


def test_fleet_exports_query_together(fleet: Path) -> None:
    rows = duckdb.sql(
        f"SELECT CAST(date AS VARCHAR), count(DISTINCT session_id) FROM read_parquet("
        f"'{fleet}/sessions/*/*.parquet', hive_partitioning = true) GROUP BY 1 ORDER BY 1"
    ).fetchall()

    assert rows == [("2024-02-29", 2), ("2024-04-09", 1)]
    assert len(list((fleet / "digests").glob("*.jsonl"))) == 2


def test_fleet_export_verifies_per_key(store: Store, fleet: Path) -> None:
    report = verify_store(fleet, load_public_key(store.public_key_path), "auditor")

    assert report.ok
    assert [s.session_id for s in report.sessions] == ["sess-0", "sess-1"]


# -- export to a local S3 server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 and yield its endpoint URL."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    port = _free_port()
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pytest.importorskip("s3fs")
    with local_s3() as endpoint:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("fleet-bucket")
        yield endpoint


def test_export_to_s3_queryable(store: Store, sealed: list[SealedSession],
                                s3_endpoint: str) -> None:
    import s3fs

    result = export(store, "s3://fleet-bucket/appliances", store.signer)
    filesystem = s3fs.S3FileSystem()
    connection = duckdb.connect(":memory:")
    connection.register_filesystem(filesystem)
    rows = connection.execute(
        "SELECT CAST(date AS VARCHAR), count(*) FROM read_parquet('s3://fleet-bucket/"
        "appliances/sessions/*/*.parquet', hive_partitioning = true) GROUP BY 1").fetchall()

    assert result.copied == ["sess-0", "sess-1"]
    assert rows == [("2024-02-29", 6)]
    assert filesystem.cat(f"fleet-bucket/appliances/digests/{store.signer.key_id}.jsonl") == \
        store.digests_path.read_bytes()


def test_s3_export_verifies_after_download(store: Store, sealed: list[SealedSession],
                                           s3_endpoint: str, tmp_path: Path) -> None:
    import s3fs

    export(store, "s3://fleet-bucket/appliances", store.signer)
    s3fs.S3FileSystem().get("fleet-bucket/appliances/", str(tmp_path / "copy"), recursive=True)

    report = verify_store(tmp_path / "copy", load_public_key(store.public_key_path), "auditor")

    assert report.ok
    assert os.path.exists(tmp_path / "copy" / "sessions")
