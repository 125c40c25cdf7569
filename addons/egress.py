"""Egress policy: only the profile's allowlisted hosts are reached, and only at their own address.

A flow may go upstream when

- it is TLS to port 443 and its SNI names a host the agent profile allows (`allow_hosts`),
- the HTTP Host header and the request target's authority, if any, name the same host as the
  SNI, and the method is not CONNECT. The proxy is transparent, so a CONNECT is an attempt to
  use it as a forward proxy to somewhere else,
- the address the agent connected to is one the appliance itself resolves that host to
  (configured `network.hosts` overrides, the session resolver's own answers, else the host's
  resolver), so a request cannot name an allowed host while aiming at another address, and
- that address is not the appliance itself (the proxy's or the agent's address, loopback),
  so a connection can never be sent back into the proxy and loop.

Anything else is refused before any upstream connection exists: HTTP gets a readable 403 in
Google's JSON error format, other TCP is closed. Every refusal is recorded as a `blocked` event
(by the recorder for HTTP requests, here for the rest), with the process that owned the
connection when the attribution addon found it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from typing import Any

from mitmproxy import connection, dns, http, tcp
from mitmproxy.net.dns import response_codes
from mitmproxy.proxy import server_hooks

from appliance.addons.common import METADATA_KEY, address, flow_state, session_of
from appliance.context import Registry, SessionContext
from appliance.recordings.schema import BLOCKED

logger = logging.getLogger(__name__)

# Google's APIs are HTTPS on 443 only; any other port of an allowed host's address is refused.
ALLOWED_PORTS = frozenset({443})


def _host_part(value: str | None) -> str | None:
    """Return the host of a Host header or authority, without port or brackets."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("["):
        return value[1:].split("]", 1)[0].lower()
    if value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return value.lower().rstrip(".")


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

    def is_appliance(self, context: SessionContext, destination: str) -> bool:
        """Tell whether `destination` is the appliance's own side of the session."""
        if destination in (context.proxy_address, context.agent_address):
            return True
        try:
            parsed = ipaddress.ip_address(destination.removeprefix("::ffff:"))
        except ValueError:
            return False
        return parsed.is_loopback or parsed.is_unspecified or any(
            destination in (other.proxy_address, other.agent_address)
            for other in self.registry.all())

    async def verdict(self, context: SessionContext, sni: str | None, host_header: str | None,
                      destination: tuple[str, int] | None,
                      authority: str | None = None) -> str | None:
        """Return why a connection must be refused, or None when it may go upstream."""
        if destination is not None and self.is_appliance(context, destination[0]):
            return f"destination {destination[0]}:{destination[1]} is the appliance itself; " \
                   "connections to the proxy are never forwarded"
        if not sni:
            return "no TLS server name (SNI): only TLS to allowlisted hosts may leave"
        sni = sni.lower().rstrip(".")
        for label, value in (("HTTP Host", host_header), ("request authority", authority)):
            named = _host_part(value)
            if named is not None and named != sni:
                return f"{label} {value!r} does not match TLS server name {sni!r}"
        if not context.profile.allows_host(sni):
            return f"host {sni!r} is not in the allowlist of agent profile " \
                   f"{context.profile.name!r}"
        if destination is None:
            return "no original destination address"
        if destination[1] not in ALLOWED_PORTS:
            return f"port {destination[1]} is not allowed; only HTTPS on port 443 may leave"
        if destination[0] not in context.dns_answers.get(sni, ()) \
                and destination[0] not in await self.resolve(context, sni):
            return f"destination {destination[0]} is not an address of {sni!r}"
        return None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow_state(flow).get("local"):
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        if flow.request.method == "CONNECT":
            await self._refuse_connect(context, flow)
            return
        reason = await self.verdict(context, flow.client_conn.sni, flow.request.host_header,
                                    flow.server_conn.address, flow.request.authority or None)
        if reason is None:
            flow_state(flow)["approved"] = True
            return
        flow_state(flow)["blocked"] = reason
        logger.info("Session %s flow %s: blocked %s %s: %s", context.session_id, flow.id,
                    flow.request.method, flow.request.pretty_url, reason)
        flow.response = _forbidden(reason)

    async def _refuse_connect(self, context: SessionContext, flow: http.HTTPFlow) -> None:
        """Refuse and record a CONNECT, which mitmproxy ends without a request hook."""
        target = flow.request.authority or flow.request.host_header or ""
        reason = f"HTTP CONNECT to {target!r}: the proxy is transparent and tunnels nowhere"
        flow_state(flow)["blocked"] = reason
        flow.response = _forbidden(reason)
        logger.info("Session %s flow %s: blocked CONNECT %s", context.session_id, flow.id,
                    target)
        await _record_blocked(context, flow.client_conn, flow.server_conn.address,
                              flow.client_conn.sni, reason, flow_id=flow.id,
                              process=flow_state(flow).get("process"),
                              extra={"method": "CONNECT", "target": target})

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
                                  flow.client_conn.sni, reason, flow_id=flow.id,
                                  process=flow.metadata.get(METADATA_KEY, {}).get("process"))
            flow.kill()


    async def dns_request(self, flow: dns.DNSFlow) -> None:
        """Refuse DNS that reached the proxy: DNS over TCP to a server other than the session's
        resolver (mitmproxy parses it because of port 53). It never goes upstream."""
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            flow.kill()
            return
        names = [question.name for question in flow.request.questions]
        reason = "DNS to a server other than the session resolver"
        flow.response = flow.request.fail(response_codes.REFUSED)
        logger.info("Session %s flow %s: refused DNS to %s for %s", context.session_id, flow.id,
                    address(flow.server_conn.address), names)
        await _record_blocked(context, flow.client_conn, flow.server_conn.address,
                              names[0] if names else None, reason, flow_id=flow.id,
                              process=flow.metadata.get(METADATA_KEY, {}).get("process"),
                              extra={"transport": "dns-over-tcp", "questions": names})


def _forbidden(reason: str) -> http.Response:
    return http.Response.make(
        403,
        json.dumps({"error": {"code": 403, "status": "PERMISSION_DENIED",
                              "message": f"Blocked by the session recorder: {reason}.",
                              "errors": [{"reason": "egressBlocked", "domain": "appliance",
                                          "message": reason}]}}).encode(),
        {"Content-Type": "application/json; charset=UTF-8"},
    )


async def _record_blocked(context: SessionContext, client: connection.Client,
                          destination: tuple[str, int] | None, sni: str | None, reason: str,
                          flow_id: str | None = None, process: dict[str, Any] | None = None,
                          extra: dict[str, Any] | None = None) -> None:
    detail: dict[str, Any] = {"reason": reason, "transport": "tcp", **(extra or {})}
    if process is not None:
        detail["process"] = process
    await context.journal.append({
        "kind": BLOCKED,
        "flow_id": flow_id,
        "client": address(client.peername),
        "server": address(destination),
        "host": sni,
        "detail": json.dumps(detail, sort_keys=True),
    })
