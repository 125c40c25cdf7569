"""Per-session state shared by the addons, and the source-address registry that finds it.

Attribution comes from the connection boundary: the proxy looks a flow's session up by the
client's source address, which the session's /30 fixes, never by anything the agent sends.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.config import AgentProfile

if TYPE_CHECKING:
    from appliance.credentials import TokenSource
    from appliance.recordings.journal import Journal


@dataclass
class SessionContext:
    """Everything the proxy needs to know about one running session."""

    session_id: str
    tag: str
    profile: AgentProfile
    unix_user: str
    operator: str
    agent_address: str
    proxy_address: str
    journal: Journal
    placeholder_token: str
    hosts: dict[str, str] = field(default_factory=dict)
    # Addresses the session's resolver handed out per name; egress accepts them as well.
    dns_answers: dict[str, set[str]] = field(default_factory=dict)
    # The session's network namespace and the sandbox's host pid, for process attribution.
    namespace_path: str | None = None
    sandbox_pid: int | None = None
    # The principal the session's real token belongs to, and the source that mints that token.
    principal: str | None = None
    tokens: TokenSource | None = None
    _statement_numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    statements: int = 0

    def next_statement_id(self) -> str:
        """Allocate the next statement id of this session (`st-000001`, ...)."""
        number = next(self._statement_numbers)
        self.statements = number
        return f"st-{number:06d}"


class Registry:
    """Maps an agent's source address to its running session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_address: dict[str, SessionContext] = {}

    def add(self, context: SessionContext) -> None:
        with self._lock:
            self._by_address[context.agent_address] = context

    def remove(self, context: SessionContext) -> None:
        with self._lock:
            self._by_address.pop(context.agent_address, None)

    def lookup(self, address: str) -> SessionContext | None:
        """Return the session whose agent uses `address`, or None for any other source."""
        address = address.removeprefix("::ffff:")
        with self._lock:
            return self._by_address.get(address)

    def all(self) -> list[SessionContext]:
        with self._lock:
            return list(self._by_address.values())


def fingerprint(secret: str) -> str:
    """Return a short, one-way fingerprint of a credential, safe to log and record."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:16]
