"""Reject every connection whose source address belongs to no running session."""

from __future__ import annotations

import logging

from mitmproxy import connection

from appliance.addons.common import session_of
from appliance.context import Registry

logger = logging.getLogger(__name__)


class Attribution:
    """The first addon: a connection from an unknown source never reaches the others."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def client_connected(self, client: connection.Client) -> None:
        if session_of(self.registry, client) is None:
            logger.warning("Rejected connection from %s: no running session uses that address",
                           client.peername)
            client.error = "connection from an address that belongs to no session"
