"""Fixtures for the addon tests: a real journal in a temporary store, and one session's context."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import AgentProfile
from appliance.context import Registry, SessionContext
from appliance.recordings.journal import Journal
from appliance.recordings.store import Store
# The testbed's stub token services on loopback, for tests that mint real tokens.
from tests.token_stubs import stubs  # noqa: F401

AGENT_ADDRESS = "198.18.0.2"
PROXY_ADDRESS = "198.18.0.1"
PLACEHOLDER_TOKEN = "ya29.appliance-placeholder.test-token"
PRINCIPAL = "agent-analyst@proj.iam.gserviceaccount.com"
# Allowed hosts map to test addresses, so the egress policy never queries a real resolver.
HOSTS = {"bigquery.googleapis.com": "198.18.100.10", "oauth2.googleapis.com": "198.18.100.11"}


def make_context(journal: Journal) -> SessionContext:
    profile = AgentProfile(name="analyst", project="proj", principal=PRINCIPAL,
                           allow_hosts=("bigquery.googleapis.com", "oauth2.googleapis.com"))
    return SessionContext(
        session_id=journal.session_id,
        tag="0a1b2c3d",
        profile=profile,
        unix_user="appliance-agent",
        operator="alice",
        agent_address=AGENT_ADDRESS,
        proxy_address=PROXY_ADDRESS,
        journal=journal,
        placeholder_token=PLACEHOLDER_TOKEN,
        hosts=dict(HOSTS),
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    store = Store(tmp_path / "store")
    store.ensure()
    opened = store.open_journal("sess-addons-test")
    try:
        yield opened
    finally:
        opened.close()
        opened.release()


@pytest.fixture
def context(journal: Journal) -> SessionContext:
    return make_context(journal)


@pytest.fixture
def registry(context: SessionContext) -> Registry:
    created = Registry()
    created.add(context)
    return created


@pytest.fixture
def full_disk_context() -> Iterator[SessionContext]:
    """Return a session whose journal lives on a full 64 KiB tmpfs (mounting needs root).

    The tmpfs is unmounted and its mount point removed when the test ends.
    """
    directory = Path(tempfile.mkdtemp(prefix="addons-tmpfs-"))
    mounted = False
    journal: Journal | None = None
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)],
                       check=True, capture_output=True)
        mounted = True
        journal = Journal(directory / "journal" / "sess-full-disk.jsonl", "sess-full-disk")
        fill(directory)
        yield make_context(journal)
    finally:
        if journal is not None:
            journal.close()
            journal.release()
        if mounted:
            subprocess.run(["umount", str(directory)], check=True, capture_output=True)
        directory.rmdir()


def fill(directory: Path) -> None:
    """Write a filler file until the file system under `directory` has no space left."""
    with open(directory / "filler", "wb", buffering=0) as filler, \
            contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)
