"""`appliance serve`: one long-running process that runs the sessions of many `appliance run`s.

The service starts one embedded mitmproxy with no listener and waits on a Unix socket,
`<runtime_dir>/serve.sock` (mode 0600, root only). For each client it runs a whole session in a
thread of its own, exactly as `appliance run` would in-process, except that

- the session adds a transparent listener on its host-side address to the shared proxy, and
  removes it at teardown, instead of starting a proxy of its own;
- the agent's stdin, stdout and stderr are the client's, passed over the socket (SCM_RIGHTS);
- the client forwards SIGINT, SIGTERM and SIGHUP over the socket, and a client that goes away
  counts as two interrupts, so the agent is killed and the session torn down and sealed.

The client is `run_remote`: it imports nothing heavy, so `appliance run` starts fast when the
service is up, and falls back to an in-process session when the socket does not exist.

Protocol, one JSON object per line. The client sends `{"op": "run", ...}` with its three file
descriptors, then `{"signal": N}` lines. The service replies with `{"event": "started", ...}`, then
`{"event": "finished", ...}` or `{"event": "error", "message": ..., "exit_code": N}`.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import config as config_module
from appliance.config import Config
from appliance.errors import ApplianceError, ConfigError, PrivilegeError, ProxyError

if TYPE_CHECKING:
    import asyncio

    from appliance.context import Registry
    from appliance.proxy import EmbeddedProxy
    from appliance.service_session import ServiceSession
    from appliance.session import RunResult

logger = logging.getLogger(__name__)

SOCKET_NAME = "serve.sock"
# The variables `appliance run` passes from its own environment to the agent's
# (appliance.session.PASSED_THROUGH); the client sends its values, since the agent is started
# by the service.
CLIENT_VARIABLES = ("PATH", "LANG", "LC_ALL", "TERM", "TZ")
MAX_REQUEST_BYTES = 1 << 20
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def socket_path(config: Config) -> Path:
    return config.runtime_dir / SOCKET_NAME


def available(config: Config) -> bool:
    """Tell whether a service listens for this configuration's runtime directory."""
    path = socket_path(config)
    if not path.is_socket():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False  # A socket file left by a service that died.
    finally:
        probe.close()
    return True


# -- the client ------------------------------------------------------------------------------


def _lines(connection: socket.socket) -> Iterator[dict[str, Any]]:
    buffer = b""
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def _send(connection: socket.socket, message: dict[str, Any]) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def run_remote(config: Config, config_path: Path | None, agent: str | None, command: str,
               cwd: Path, extra_env: dict[str, str], announce: Any) -> int:
    """Run one session through the service and return the agent's exit code.

    `announce(text)` prints a message line; the lines match those of an in-process run.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(socket_path(config)))
    except OSError as error:
        connection.close()
        raise ProxyError(f"Cannot reach the appliance service at {socket_path(config)}: "
                         f"{error.strerror}; start it (systemctl start appliance) or run with "
                         "--no-service.") from error
    passed = {name: os.environ[name] for name in CLIENT_VARIABLES if name in os.environ}
    request = {"op": "run", "config": str(config_path.resolve()) if config_path else None,
               "agent": agent, "command": command, "cwd": str(cwd),
               "env": {**passed, **extra_env}}
    logger.info("Running the session through the appliance service at %s",
                socket_path(config))
    with connection, _forwarding_signals(connection):
        socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        for message in _lines(connection):
            if message["event"] == "started":
                announce(f"session {message['session_id']} starting (agent profile "
                         f"{message['agent']}, user {message['user']})")
            elif message["event"] == "finished":
                announce(f"session {message['session_id']} {message['status']}: "
                         f"{message['statements']} statements, {message['events']} events "
                         f"recorded in {message['duration']:.1f} s; agent exit code "
                         f"{message['exit_code']}")
                return int(message["exit_code"])
            elif message["event"] == "error":
                failure = ApplianceError(message["message"])
                failure.exit_code = int(message["exit_code"])
                raise failure
    raise ProxyError("The appliance service closed the connection before the session ended; "
                     "see its log (journalctl -u appliance).")


@contextlib.contextmanager
def _forwarding_signals(connection: socket.socket) -> Iterator[None]:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            _send(connection, {"signal": signum})

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- the service -----------------------------------------------------------------------------


def _receive_request(connection: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Read the first line and the three file descriptors sent with it; None for a probe.

    `available` connects and closes without a word, to see whether the service listens.
    """
    descriptors = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(
        MAX_REQUEST_BYTES, socket.CMSG_SPACE(3 * descriptors.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            descriptors.frombytes(payload[:len(payload) - len(payload) % descriptors.itemsize])
    while not data.endswith(b"\n"):
        more = connection.recv(MAX_REQUEST_BYTES)
        if not more or len(data) > MAX_REQUEST_BYTES:
            break
        data += more
    fds = list(descriptors)
    if not data and not fds:
        return None
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ConfigError("The client sent no stdin, stdout and stderr with its request.")
    return json.loads(data), fds


def _peer(connection: socket.socket) -> tuple[int, int]:
    """Return the pid and uid of the process at the other end of `connection`."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", credentials)
    return pid, uid


def operator_of(pid: int, uid: int) -> str:
    """Name who started the client, the way `appliance run` names itself: SUDO_USER, else the
    login uid's user, else the client's user."""
    import pwd

    with contextlib.suppress(OSError):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"SUDO_USER=") and len(entry) > len(b"SUDO_USER="):
                return entry[len(b"SUDO_USER="):].decode(errors="replace")
    with contextlib.suppress(OSError, ValueError, KeyError):
        loginuid = int(Path(f"/proc/{pid}/loginuid").read_text().strip())
        if loginuid != 0xFFFFFFFF:
            return pwd.getpwuid(loginuid).pw_name
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass
class Service:
    """The shared proxy, its registry and the sessions running in it."""

    config: Config
    registry: Registry
    proxy: EmbeddedProxy
    loop: asyncio.AbstractEventLoop
    stopping: threading.Event = field(default_factory=threading.Event)
    sessions: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    key_lock: threading.Lock = field(default_factory=threading.Lock)

    def check_compatible(self, config: Config) -> None:
        """Reject a client configuration whose proxy settings differ from the service's."""
        for name in ("ca_dir", "upstream_ca_file"):
            if getattr(config, name) != getattr(self.config, name):
                raise ConfigError(
                    f"The appliance service runs with proxy.{name} "
                    f"{getattr(self.config, name)}, but {config.source} sets "
                    f"{getattr(config, name)}; use the service's configuration, restart the "
                    "service, or run with --no-service.")

    def handle(self, connection: socket.socket) -> None:
        """Run one client's session and report its result or its error to the client."""
        fds: list[int] = []
        try:
            pid, uid = _peer(connection)
            if uid != 0:
                raise PrivilegeError("Only root may run sessions through the appliance "
                                     "service.")
            received = _receive_request(connection)
            if received is None:
                return
            request, fds = received
            result = self._run(connection, request, fds, operator_of(pid, uid))
            try:
                _send(connection, {"event": "finished", "session_id": result.session_id,
                                   "status": result.status, "statements": result.statements,
                                   "events": result.events, "duration": result.duration,
                                   "exit_code": result.exit_code})
            except OSError as error:
                logger.info("Session %s: its client left before the result: %s",
                            result.session_id, error)
        except ApplianceError as error:
            logger.warning("A client's session failed: %s", error)
            with contextlib.suppress(OSError):
                _send(connection, {"event": "error", "message": str(error),
                                   "exit_code": error.exit_code})
        except Exception as error:
            logger.exception("A client's session failed unexpectedly")
            with contextlib.suppress(OSError):
                _send(connection, {"event": "error", "exit_code": 1,
                                   "message": f"The appliance service failed: {error}"})
        finally:
            for fd in fds:
                os.close(fd)
            connection.close()

    def _run(self, connection: socket.socket, request: dict[str, Any], fds: list[int],
             operator: str) -> RunResult:
        from appliance.service_session import ServiceSession
        from appliance.session import RunRequest

        if self.stopping.is_set():
            raise ProxyError("The appliance service is stopping; run the session again when "
                             "it is back, or with --no-service.")
        config_path = Path(request["config"]) if request.get("config") else None
        config = config_module.load(config_path)
        self.check_compatible(config)
        profile = config.profile(request.get("agent"))
        run_request = RunRequest(
            command=str(request["command"]), profile=profile, operator=operator,
            cwd=Path(request["cwd"]), extra_env=dict(request.get("env") or {}),
            stdio={"stdin": fds[0], "stdout": fds[1], "stderr": fds[2]})
        session = ServiceSession(config, run_request, self)
        with self.key_lock:
            # Sessions of one process would race to create a missing signing key.
            session.store.ensure()
            _ = session.store.signer
        _send(connection, {"event": "started", "session_id": session.session_id,
                           "agent": profile.name, "user": profile.user})
        watcher = threading.Thread(target=self._watch_client, args=(connection, session),
                                   name=f"client-{session.tag}", daemon=True)
        watcher.start()
        with self.lock:
            self.sessions[session.session_id] = session
        try:
            return session.run()
        finally:
            with self.lock:
                self.sessions.pop(session.session_id, None)

    @staticmethod
    def _watch_client(connection: socket.socket, session: ServiceSession) -> None:
        """Forward the client's signals; a client that goes away interrupts twice."""
        try:
            for message in _lines(connection):
                if "signal" in message:
                    session.interrupt(int(message["signal"]))
        except (OSError, ValueError):
            pass
        if not session.finished.is_set():
            logger.warning("Session %s: its client went away; ending the session",
                           session.session_id)
            session.interrupt(signal.SIGTERM)
            session.interrupt(signal.SIGTERM)

    def stop_sessions(self) -> None:
        with self.lock:
            running = list(self.sessions.values())
        for session in running:
            session.interrupt(signal.SIGTERM)


async def on_loop(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    """Run `coroutine` on the service's loop and wait for it from another loop."""
    import asyncio

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


def _spec(host: str, port: int) -> str:
    return f"transparent@{host}:{port}"


async def listen(proxy: EmbeddedProxy, host: str, port: int, session_id: str) -> None:
    """Add a transparent listener to the running proxy and wait until it is up."""
    from mitmproxy.proxy import mode_specs

    assert proxy.master is not None
    options = proxy.master.options
    modes = [*options.mode, _spec(host, port)]
    options.update(mode=modes)  # type: ignore[no-untyped-call]
    servers = proxy.master.addons.get("proxyserver").servers  # type: ignore[no-untyped-call]
    await servers.update([mode_specs.ProxyMode.parse(mode) for mode in modes])
    instance = servers[_spec(host, port)]
    if not instance.is_running:
        await unlisten(proxy, host, port, session_id)
        raise ProxyError(f"The proxy could not listen on {host}:{port}: "
                         f"{instance.last_exception}. Check proxy.port is free.")
    logger.info("Session %s: shared proxy listening on %s:%d", session_id, host, port)


async def unlisten(proxy: EmbeddedProxy, host: str, port: int, session_id: str) -> None:
    from mitmproxy.proxy import mode_specs

    if proxy.master is None:
        return
    options = proxy.master.options
    modes = [mode for mode in options.mode if mode != _spec(host, port)]
    options.update(mode=modes)  # type: ignore[no-untyped-call]
    await proxy.master.addons.get("proxyserver").servers.update(  # type: ignore[no-untyped-call]
        [mode_specs.ProxyMode.parse(mode) for mode in modes])
    logger.info("Session %s: shared proxy stopped listening on %s:%d", session_id, host, port)


def serve(config: Config) -> None:
    """Run the service until SIGTERM or SIGINT; sessions still running are ended first."""
    import asyncio

    if os.geteuid() != 0:
        raise PrivilegeError("appliance serve needs root to create namespaces and nftables "
                             "rules; run it with sudo or as the systemd unit.")
    asyncio.run(_serve(config))


async def _serve(config: Config) -> None:
    import asyncio

    from appliance import addons
    from appliance.context import Registry
    from appliance.proxy import EmbeddedProxy

    registry = Registry()
    proxy = EmbeddedProxy(config.ca_dir, config.upstream_ca_file, addons.chain(registry))
    await proxy.start([])
    loop = asyncio.get_running_loop()
    service = Service(config, registry, proxy, loop)
    server = _bind(socket_path(config))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    acceptor = threading.Thread(target=_accept, args=(server, service), name="accept",
                                daemon=True)
    acceptor.start()
    logger.warning("Appliance service ready on %s (pid %d)", socket_path(config), os.getpid())
    try:
        await stop.wait()
    finally:
        logger.warning("Appliance service stopping: ending %d running sessions",
                       len(service.sessions))
        service.stopping.set()
        with contextlib.suppress(OSError):
            socket_path(config).unlink()
        server.close()
        service.stop_sessions()
        while service.sessions:
            await asyncio.sleep(0.1)
        await proxy.stop()
        logger.warning("Appliance service stopped")


def _bind(path: Path) -> socket.socket:
    """Listen on `path`, mode 0600; a socket file left by a dead service is replaced."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        server.close()
        raise ProxyError(f"Another appliance service already listens on {path}.")
    finally:
        probe.close()
    previous = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    server.listen(64)
    return server


def _accept(server: socket.socket, service: Service) -> None:
    while not service.stopping.is_set():
        try:
            connection, _ = server.accept()
        except OSError:
            return  # The listening socket was closed: the service is stopping.
        threading.Thread(target=service.handle, args=(connection,), name="session",
                         daemon=True).start()
