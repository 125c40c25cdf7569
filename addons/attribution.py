"""Attribute each connection: reject unknown sources, and find the agent process behind it.

The session comes from the client's source address alone. For a connection from a session,
the process inside the namespace that owns the client socket is looked up as soon as the
connection arrives, with appliance.processes in a worker thread, so the event loop never reads
/proc. Its description goes into each flow's state under `process`, from where the egress
policy and the recorder copy it into the flow's events.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import connection, dns, http, tcp

from appliance import processes
from appliance.addons.common import METADATA_KEY, flow_state, session_of
from appliance.context import Registry, SessionContext

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 2.0


class Attribution:
    """The first addon: a connection from an unknown source never reaches the others."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.lookups: dict[str, asyncio.Task[dict[str, Any]]] = {}

    def client_connected(self, client: connection.Client) -> None:
        context = session_of(self.registry, client)
        if context is None:
            logger.warning("Rejected connection from %s: no running session uses that address",
                           client.peername)
            client.error = "connection from an address that belongs to no session"
            return
        self.lookups[client.id] = asyncio.create_task(self._lookup(context, client))

    def client_disconnected(self, client: connection.Client) -> None:
        task = self.lookups.pop(client.id, None)
        if task is not None and not task.done():
            task.cancel()

    async def _lookup(self, context: SessionContext, client: connection.Client) -> dict[str, Any]:
        if context.sandbox_pid is None or not client.peername:
            return {"error": "the agent has not started yet"}
        address, port = client.peername[0].removeprefix("::ffff:"), client.peername[1]
        try:
            found = await asyncio.wait_for(
                asyncio.to_thread(processes.owner, context.sandbox_pid, address, port),
                LOOKUP_TIMEOUT_SECONDS)
        except TimeoutError:
            found = {"error": f"the process lookup took longer than "
                              f"{LOOKUP_TIMEOUT_SECONDS:.0f} s"}
        except OSError as error:
            found = {"error": f"the process lookup failed: {error}"}
        logger.debug("Session %s: connection from port %d belongs to %s", context.session_id,
                     port, found.get("pid", found.get("error")))
        return found

    async def process_of(self, client: connection.Client) -> dict[str, Any] | None:
        """Return the process that owns `client`'s socket, waiting for its lookup."""
        task = self.lookups.get(client.id)
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            return None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow_state(flow)["process"] = await self.process_of(flow.client_conn)

    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        flow.metadata.setdefault(METADATA_KEY, {})["process"] = \
            await self.process_of(flow.client_conn)

    async def dns_request(self, flow: dns.DNSFlow) -> None:
        flow.metadata.setdefault(METADATA_KEY, {})["process"] = \
            await self.process_of(flow.client_conn)
