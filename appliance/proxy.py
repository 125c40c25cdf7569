"""Run mitmproxy in transparent mode inside the appliance process, with the project's addons.

Only the mitmproxy addons the appliance needs are loaded (connection handling, TLS, protocol
detection); none that rewrite traffic, serve pages to clients or read scripts. Upstream
connections are made lazily, after the egress policy has seen the flow, so a blocked host is
never contacted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from appliance import ca
from appliance.errors import ProxyError

logger = logging.getLogger(__name__)

CA_CERT_NAME = "mitmproxy-ca-cert.pem"


class _Ready:
    """Signals when mitmproxy's servers are up, or failed to come up."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()


class EmbeddedProxy:
    """One mitmproxy master listening in transparent mode on the given addresses."""

    def __init__(self, ca_dir: Path, upstream_ca_file: Path | None,
                 addons: Sequence[Any]) -> None:
        self.ca_dir = ca_dir
        self.upstream_ca_file = upstream_ca_file
        self.addons = list(addons)
        self.master: Master | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ca_cert_path(self) -> Path:
        """The public certificate of the appliance CA, which agents trust."""
        return self.ca_dir / CA_CERT_NAME

    async def start(self, listen: Sequence[tuple[str, int]]) -> None:
        """Start listening; raise ProxyError when any listener cannot be bound."""
        ca.ensure(self.ca_dir)  # Created under a lock before mitmproxy reads it.
        master = Master(options.Options())
        ready = _Ready()
        master.addons.add(
            core.Core(),
            disable_h2c.DisableH2C(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            *self.addons,
            ready,
        )
        # Options declared by addons exist only once those addons are loaded.
        master.options.update(
            mode=[f"transparent@{host}:{port}" for host, port in listen],
            confdir=str(self.ca_dir),
            connection_strategy="lazy",
            ssl_verify_upstream_trusted_ca=(str(self.upstream_ca_file)
                                            if self.upstream_ca_file else None),
        )
        self.master = master
        self._task = asyncio.create_task(master.run(), name="mitmproxy")
        done, _ = await asyncio.wait(
            [self._task, asyncio.create_task(ready.event.wait())],
            return_when=asyncio.FIRST_COMPLETED, timeout=30,
        )
        if self._task in done or not ready.event.is_set():
            error = self._task.exception() if self._task.done() else None
            raise ProxyError(f"The proxy could not listen on "
                             f"{', '.join(f'{h}:{p}' for h, p in listen)}: "
                             f"{error or 'servers did not come up'}. Check proxy.port in the "
                             "configuration is free.")
        servers = master.addons.get("proxyserver").servers
        failed = [str(instance.mode.full_spec) for instance in servers
                  if not instance.is_running]
        if failed:
            await self.stop()
            raise ProxyError(f"The proxy could not listen on {', '.join(failed)}; check that "
                             "proxy.port is free on that address.")
        logger.info("Proxy listening on %s", ", ".join(f"{h}:{p}" for h, p in listen))

    async def stop(self) -> None:
        if self.master is None or self._task is None:
            return
        self.master.shutdown()
        try:
            await asyncio.wait_for(self._task, timeout=10)
        except TimeoutError:
            logger.error("The proxy did not stop within 10 s; cancelling it")
            self._task.cancel()
        self.master = None
