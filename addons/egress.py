"""Egress policy: only the profile's allowlisted hosts are reached, and only at their own address.

A flow may go upstream when

- it is TLS and its SNI names a host the agent profile allows (`allow_hosts`),
- the HTTP Host header, if any, names the same host as the SNI, and
- the address the agent connected to is one the appliance itself resolves that host to
  (configured `network.hosts` overrides first, else the host's resolver), so a request cannot
  name an allowed host while aiming at another address.

Anything else is refused before any upstream connection exists: HTTP gets a readable 403 in
Google's JSON error format, other TCP is closed. Every refusal is recorded as a `blocked` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from mitmproxy import connection, http, tcp
from mitmproxy.proxy import server_hooks

from appliance.addons.common import address, flow_state, session_of
from appliance.context import Registry, SessionContext
from appliance.recordings.schema import BLOCKED

logger = logging.getLogger(__name__)


class Egress:
    """Decides, per flow and per upstream connection, whether traffic may leave."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def resolve(self, context: SessionContext, host: str) -> set[str]:
        """Return the IPv4 addresses the appliance accepts for `host`."""
        if host in context.hosts:
            return {context.hosts[host]}
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, family=socket.AF_INET,
                                           type=socket.SOCK_STREAM)
        except OSError:
            return set()
        return {str(info[4][0]) for info in infos}

    async def verdict(self, context: SessionContext, sni: str | None, host_header: str | None,
                      destination: tuple[str, int] | None) -> str | None:
        """Return why a connection must be refused, or None when it may go upstream."""
        if not sni:
            return "no TLS server name (SNI): only TLS to allowlisted hosts may leave"
        sni = sni.lower().rstrip(".")
        if host_header is not None and host_header.lower().rstrip(".") != sni:
            return f"HTTP Host {host_header!r} does not match TLS server name {sni!r}"
        if not context.profile.allows_host(sni):
            return f"host {sni!r} is not in the allowlist of agent profile " \
                   f"{context.profile.name!r}"
        if destination is None:
            return "no original destination address"
        if destination[0] not in await self.resolve(context, sni):
            return f"destination {destination[0]} is not an address of {sni!r}"
        return None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow_state(flow).get("local"):
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        host_header = flow.request.host_header
        if host_header is not None and ":" in host_header:
            host_header = host_header.rsplit(":", 1)[0]
        reason = await self.verdict(context, flow.client_conn.sni, host_header,
                                    flow.server_conn.address)
        if reason is None:
            flow_state(flow)["approved"] = True
            return
        flow_state(flow)["blocked"] = reason
        logger.info("Session %s flow %s: blocked %s %s: %s", context.session_id, flow.id,
                    flow.request.method, flow.request.pretty_url, reason)
        flow.response = http.Response.make(
            403,
            json.dumps({"error": {"code": 403, "status": "PERMISSION_DENIED",
                                  "message": f"Blocked by the session recorder: {reason}.",
                                  "errors": [{"reason": "egressBlocked", "domain": "appliance",
                                              "message": reason}]}}).encode(),
            {"Content-Type": "application/json; charset=UTF-8"},
        )

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Refuse any upstream connection not approved above (raw TCP, odd protocols)."""
        context = session_of(self.registry, data.client)
        if context is None:
            data.server.error = "connection from an address that belongs to no session"
            return
        reason = await self.verdict(context, data.server.sni or data.client.sni, None,
                                    data.server.address)
        if reason is not None:
            data.server.error = f"blocked by the session recorder: {reason}"
            await _record_blocked(context, data.client, data.server.address,
                                  data.server.sni or data.client.sni, reason)

    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            flow.kill()
            return
        reason = await self.verdict(context, flow.client_conn.sni, None, flow.server_conn.address)
        if reason is not None:
            logger.info("Session %s flow %s: blocked TCP to %s: %s", context.session_id,
                        flow.id, address(flow.server_conn.address), reason)
            await _record_blocked(context, flow.client_conn, flow.server_conn.address,
                                  flow.client_conn.sni, reason, flow_id=flow.id)
            flow.kill()


async def _record_blocked(context: SessionContext, client: connection.Client,
                          destination: tuple[str, int] | None, sni: str | None, reason: str,
                          flow_id: str | None = None) -> None:
    await context.journal.append({
        "kind": BLOCKED,
        "flow_id": flow_id,
        "client": address(client.peername),
        "server": address(destination),
        "host": sni,
        "detail": json.dumps({"reason": reason, "transport": "tcp"}),
    })
