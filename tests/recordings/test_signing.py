"""Tests for the store's signing key, the signed journal head and the digest chain on sealing."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import StoreError
from appliance.recordings import digests, signing
from appliance.recordings.journal import check_head, head_path, read
from appliance.recordings.schema import SCHEMA_VERSION
from appliance.recordings.store import SealedSession, Store

WriteSession = Callable[..., Any]


def test_key_created_private_at_first_use(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "signing-key.pem"

    signer = signing.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(signer.key_id) == 32


def test_key_reused_on_second_load(tmp_path: Path) -> None:
    path = tmp_path / "signing-key.pem"

    first = signing.load_or_create(path)
    second = signing.load_or_create(path)

    assert first.key_id == second.key_id


def test_group_readable_key_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing-key.pem"
    signing.load_or_create(path)
    os.chmod(path, 0o640)

    with pytest.raises(StoreError, match="mode 640"):
        signing.load_or_create(path)


def test_public_key_exported_beside_store(store: Store) -> None:
    signer = store.signer

    assert signing.load_public_key(store.public_key_path).key_id == signer.key_id


def test_store_without_key_refuses_to_sign(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="store.signing_key"):
        _ = Store(tmp_path / "store").signer


def test_signature_of_other_type_rejected(store: Store) -> None:
    document = {"type": "journal_head", "events": 1}
    signature = store.signer.sign(document)

    assert not store.signer.verify({**document, "type": "session"}, signature)


# -- the journal head --------------------------------------------------------------------------


def test_journal_head_covers_appended_events(store: Store, write_session: WriteSession) -> None:
    journal = write_session("sess-head", [{"kind": "request"}] * 3, seal=False)

    head = json.loads(head_path(journal.path).read_bytes())

    assert head["events"] == 4
    assert head["last_hash"] == journal.last_hash
    assert check_head(journal.path, "sess-head", read(journal.path).events, store.signer) == []


def test_journal_head_detects_rewritten_event(store: Store,
                                              write_session: WriteSession) -> None:
    journal = write_session("sess-head", [{"kind": "request"}] * 3, seal=False)
    events = read(journal.path).events
    events[-1] = {**events[-1], "hash": "0" * 64}

    problems = check_head(journal.path, "sess-head", events, store.signer)

    assert [kind for kind, _ in problems] == ["journal_rewritten"]


def test_journal_head_forgery_detected(store: Store, write_session: WriteSession) -> None:
    journal = write_session("sess-head", [{"kind": "request"}] * 3, seal=False)
    path = head_path(journal.path)
    head = json.loads(path.read_bytes())
    path.write_text(json.dumps({**head, "events": 2}))

    problems = check_head(journal.path, "sess-head", read(journal.path).events, store.signer)

    assert [kind for kind, _ in problems] == ["head_invalid"]


# -- digests on sealing -------------------------------------------------------------------------


def test_seal_appends_signed_digest(store: Store, write_session: WriteSession) -> None:
    sealed = write_session("sess-digest", [{"kind": "request"}])
    assert isinstance(sealed, SealedSession)

    entry = digests.read(store.digests_path).entries[0]

    assert entry["session_id"] == "sess-digest"
    assert entry["file_sha256"] == digests.sha256_file(sealed.parquet)
    assert entry["events"] == 3
    assert entry["event_kinds"] == {"request": 1, "session_end": 1, "session_start": 1}
    assert entry["schema_version"] == SCHEMA_VERSION
    assert entry["prev_digest_hash"] == digests.genesis(store.signer.key_id)
    assert store.signer.verify(digests.body_of(entry), entry["signature"])


def test_digests_chain_across_sessions(store: Store, write_session: WriteSession) -> None:
    write_session("sess-a", [])
    write_session("sess-b", [])

    first, second = digests.read(store.digests_path).entries

    assert second["prev_digest_hash"] == first["digest_hash"]
    assert second["index"] == 1


def test_torn_digest_tail_cut_before_append(store: Store, write_session: WriteSession) -> None:
    write_session("sess-a", [])
    with open(store.digests_path, "ab") as handle:
        handle.write(b'{"type":"sess')

    write_session("sess-b", [])
    contents = digests.read(store.digests_path)

    assert contents.torn_tail is None
    assert [e["session_id"] for e in contents.entries] == ["sess-a", "sess-b"]


def test_seal_removes_journal_head(store: Store, write_session: WriteSession) -> None:
    write_session("sess-a", [])

    assert not head_path(store.journal_path("sess-a")).exists()


def test_catalog_indexes_digest(store: Store, write_session: WriteSession) -> None:
    write_session("sess-a", [])
    entry = digests.read(store.digests_path).entries[0]

    with store.catalog() as connection:
        row = connection.execute("SELECT digest_hash, started_ns, ended_ns FROM session_index"
                                 ).fetchone()

    assert row == (entry["digest_hash"], entry["first_ts_ns"], entry["last_ts_ns"])

