"""A session run by `appliance serve`: the shared proxy, the client's stdio and signals.

It is the in-process `Session` with three differences. Its proxy listener is added to the
service's proxy and removed at teardown. Its agent's stdin, stdout and stderr are the client's
(`RunRequest.stdio`). Signals come from the client's connection through `interrupt`, from any
thread, because only a main thread may install signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pwd
import signal
import threading
from typing import TYPE_CHECKING

from appliance.config import Config
from appliance.service import listen, on_loop, unlisten
from appliance.session import RunRequest, RunResult, Session

if TYPE_CHECKING:
    from appliance.service import Service

logger = logging.getLogger(__name__)


class ServiceSession(Session):
    """A session whose proxy is the service's and whose agent is the client's."""

    def __init__(self, config: Config, request: RunRequest, service: Service) -> None:
        super().__init__(config, request, registry=service.registry)
        self.service = service
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: list[int] = []
        self.finished = threading.Event()
        self.signal_lock = threading.Lock()

    def run(self) -> RunResult:
        try:
            return super().run()
        finally:
            self.finished.set()

    async def _start_proxy(self) -> None:
        assert self.network is not None
        self.proxy = self.service.proxy
        await on_loop(self.service.loop, listen(self.service.proxy,
                                                str(self.network.host_address),
                                                self.config.proxy_port, self.session_id))

    async def _stop_proxy(self) -> None:
        if self.proxy is None or self.network is None:
            return
        try:
            await on_loop(self.service.loop, unlisten(self.service.proxy,
                                                      str(self.network.host_address),
                                                      self.config.proxy_port, self.session_id))
        except Exception:
            logger.exception("Session %s: removing its proxy listener failed", self.session_id)
        self.proxy = None

    async def _run_agent(self, account: pwd.struct_passwd) -> int:
        with self.signal_lock:
            self.loop = asyncio.get_running_loop()
            pending, self.pending = self.pending, []
        if pending or self.service.stopping.is_set():
            # Interrupted during set-up, as Ctrl-C would end an in-process run: no agent starts.
            logger.warning("Session %s: interrupted before the agent started", self.session_id)
            await self._stop_proxy()
            return 128 + (pending[0] if pending else signal.SIGTERM)
        return await super()._run_agent(account)

    def interrupt(self, signum: int) -> None:
        """Pass a client's signal to the agent, from any thread."""
        with self.signal_lock:
            if self.loop is None:
                self.pending.append(signum)
                return
            loop = self.loop
        with contextlib.suppress(RuntimeError):  # The session's loop has already closed.
            loop.call_soon_threadsafe(self._forward_signal, signum)
