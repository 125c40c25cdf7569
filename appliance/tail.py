"""Follow the journals of running sessions and turn new events into statement lines.

`Follower.poll` reads whatever complete lines were appended to each live journal since the last
poll. A journal file is kept open until its session ends, so the events written just before the
journal is sealed and unlinked are still read. A partial final line is left for the next poll.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from appliance.recordings.schema import (
    BLOCKED,
    FLOW_ERROR,
    REQUEST,
    RESPONSE,
    SESSION_END,
    SESSION_RECOVERED,
    SESSION_START,
)
from appliance.recordings.store import Store

logger = logging.getLogger(__name__)

ENDING_KINDS = (SESSION_END, SESSION_RECOVERED)


@dataclass
class _Open:
    handle: IO[bytes]
    pending: bytes = b""
    ended: bool = False


@dataclass
class Follower:
    """Reads new events of every live journal, or of one session's journal."""

    store: Store
    session_id: str | None = None
    _open: dict[Path, _Open] = field(default_factory=dict)
    _finished: set[Path] = field(default_factory=set)

    def _discover(self) -> None:
        for path in self.store.live_journals():
            if path in self._open or path in self._finished:
                continue
            if self.session_id is not None and path.stem != self.session_id:
                continue
            try:
                self._open[path] = _Open(path.open("rb"))
            except FileNotFoundError:
                continue  # Sealed between the listing and the open.

    def poll(self) -> list[dict[str, Any]]:
        """Return the events appended since the last call, in journal order per session."""
        self._discover()
        events: list[dict[str, Any]] = []
        for path, state in list(self._open.items()):
            data = state.pending + state.handle.read()
            lines = data.split(b"\n")
            state.pending = lines.pop()
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    logger.warning("Skipping an unreadable line of journal %s", path)
                    continue
                if isinstance(event, dict):
                    events.append(event)
                    state.ended = state.ended or event.get("kind") in ENDING_KINDS
            if state.ended or not path.exists():
                state.handle.close()
                del self._open[path]
                self._finished.add(path)
        return events

    def following(self) -> bool:
        """Tell whether any journal is still open (some followed session has not ended)."""
        return bool(self._open)

    def close(self) -> None:
        for state in self._open.values():
            state.handle.close()
        self._open.clear()


@dataclass
class StatementLines:
    """Turns events into the lines `sessions tail` prints, one per noteworthy change."""

    _outcomes: dict[tuple[str, str], str] = field(default_factory=dict)
    _requested: set[tuple[str, str]] = field(default_factory=set)

    def line(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Return the printable record for `event`, or None when it adds nothing new."""
        kind = event.get("kind")
        base = {"session_id": event.get("session_id"), "seq": event.get("seq"),
                "ts_ns": event.get("ts_ns"), "kind": kind,
                "statement_id": event.get("statement_id")}

        if kind == SESSION_START:
            detail = _detail(event)
            return {**base, "agent": detail.get("agent"), "unix_user": detail.get("unix_user"),
                    "command": detail.get("command")}
        if kind in ENDING_KINDS:
            return {**base, "exit_code": _detail(event).get("exit_code")}
        if kind == BLOCKED or (kind == FLOW_ERROR and event.get("host")):
            detail = _detail(event)
            return {**base, "host": event.get("host"), "path": event.get("path"),
                    "reason": detail.get("reason") or detail.get("error")}

        statement = event.get("statement_id")
        if not statement:
            return None
        key = (str(event.get("session_id")), str(statement))
        if kind == REQUEST:
            if key in self._requested:
                return None  # A later poll or page of a statement already shown.
            self._requested.add(key)
            target = ".".join(str(event[k]) for k in ("project", "dataset_id", "table_id")
                              if event.get(k))
            return {**base, "api_method": event.get("api_method"), "sql": event.get("sql"),
                    "target": target or None, "dry_run": event.get("dry_run")}

        if kind == RESPONSE and event.get("outcome"):
            if self._outcomes.get(key) == event["outcome"]:
                return None
            self._outcomes[key] = event["outcome"]
            return {**base, "api_method": event.get("api_method"),
                    "statement_type": event.get("statement_type"),
                    "outcome": event.get("outcome"), "job_id": event.get("job_id"),
                    "rows_affected": event.get("rows_affected"),
                    "rows_returned": event.get("rows_returned"),
                    "error_reason": event.get("error_reason"),
                    "error_message": event.get("error_message")}
        return None


def _detail(event: dict[str, Any]) -> dict[str, Any]:
    try:
        detail = json.loads(event.get("detail") or "{}")
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}
