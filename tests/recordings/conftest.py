"""Fixtures for the recording tests: a real store in a temporary directory and a session writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.recordings.journal import Journal
from appliance.recordings.schema import SESSION_END, SESSION_START
from appliance.recordings.store import SealedSession, Store

# 2024-02-29T12:00:00Z in nanoseconds: a leap day, so a wrong date partition shows.
START_NS = 1_709_208_000_000_000_000
MILLISECOND_NS = 1_000_000

SESSION_DETAIL = {
    "agent": "analyst",
    "principal": "agent-analyst@proj.iam.gserviceaccount.com",
    "unix_user": "appliance-agent",
    "operator": "alice",
    "command": "python agent.py",
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    created = Store(tmp_path / "store", signing_key=tmp_path / "keys" / "signing-key.pem")
    created.ensure()
    return created


def start_event(project: str = "proj") -> dict[str, Any]:
    return {"kind": SESSION_START, "ts_ns": START_NS, "project": project,
            "detail": json.dumps(SESSION_DETAIL, sort_keys=True)}


@pytest.fixture
def write_session(store: Store) -> Iterator[Callable[..., Journal | SealedSession]]:
    """Return a function that records a session with the given events.

    With `seal=True` (the default) the session ends, is sealed and its SealedSession returned.
    With `seal=False` the open, locked Journal is returned, and the fixture closes it at the end.
    """
    opened: list[Journal] = []

    def write(session_id: str, events: list[dict[str, Any]], seal: bool = True,
              end: bool = True) -> Journal | SealedSession:
        journal = store.open_journal(session_id)
        opened.append(journal)
        journal.append_sync(start_event())
        for number, event in enumerate(events, start=1):
            journal.append_sync({"ts_ns": START_NS + number * MILLISECOND_NS, **event})
        if not seal:
            return journal
        if end:
            journal.append_sync({"kind": SESSION_END,
                                 "ts_ns": START_NS + (len(events) + 1) * MILLISECOND_NS,
                                 "detail": json.dumps({"exit_code": 3})})
        journal.close()
        try:
            return store.seal(session_id)
        finally:
            journal.release()

    try:
        yield write
    finally:
        for journal in opened:
            journal.close()
            journal.release()
