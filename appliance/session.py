"""One recorded session, from allocation to teardown.

`run` allocates a session id and a /30, builds the namespace, veth pair and nftables table,
starts the embedded proxy on the session's host-side address, runs the agent command in the
sandbox and waits for it. Teardown runs in `finally`, each step guarded and logged, on normal
exit, agent crash, Ctrl-C and SIGTERM alike.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance import addons, processes
from appliance.config import AgentProfile, Config
from appliance.context import Registry, SessionContext
from appliance.credentials import Identity, TokenSource
from appliance.errors import ConfigError, CredentialError, PrivilegeError
from appliance.netns import droplog, namespace, nftables, pool, resolver
from appliance.progress import progress
from appliance.proxy import EmbeddedProxy
from appliance.recordings.journal import Journal
from appliance.recordings.schema import SESSION_END, SESSION_START
from appliance.recordings.store import Store
from appliance.sandbox import SPEC_VARIABLE, protected_paths

logger = logging.getLogger(__name__)

# Environment variables through which each client stack finds the CA bundle to trust.
CA_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "NODE_EXTRA_CA_CERTS",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
)
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TERM", "TZ")
GRACE_SECONDS = 5.0


@dataclass
class RunRequest:
    """What the operator asked for: the command, its profile and extra environment."""

    command: str
    profile: AgentProfile
    operator: str
    cwd: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    # The agent's stdin, stdout and stderr as file descriptors; empty: this process's own.
    # `appliance serve` passes those of the `appliance run` client.
    stdio: dict[str, int] = field(default_factory=dict)


@dataclass
class RunResult:
    session_id: str
    exit_code: int
    statements: int
    events: int
    duration: float
    status: str


def new_session_id() -> tuple[str, str]:
    """Return a time-sortable session id and its 8-hex-digit tag used in kernel object names."""
    tag = secrets.token_hex(4)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{tag}", tag


def operator_name() -> str:
    """Return who started the run: SUDO_USER, else the login uid's user, else the current user."""
    if os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        loginuid = int(Path("/proc/self/loginuid").read_text().strip())
        if loginuid != 0xFFFFFFFF:
            return pwd.getpwuid(loginuid).pw_name
    except (OSError, ValueError, KeyError):
        pass
    return getpass.getuser()


def sweep_stale(config: Config, store: Store) -> None:
    """Remove kernel objects and seal journals left by sessions whose process died."""
    for tag in pool.abandoned_tags(config.runtime_dir):
        logger.warning("Removing the objects of abandoned session tag %s", tag)
        nftables.remove(tag)
        namespace.remove_objects(tag)
        shutil.rmtree(config.runtime_dir / "sessions" / tag, ignore_errors=True)
    store.recover()


class Terminated(Exception):
    """SIGTERM arrived while the session was being built or torn down."""


_MAIN_PID = os.getpid()


def _raise_terminated(signum: int, _frame: object) -> None:
    # pyroute2's NetNS forks helper processes that inherit this handler and are stopped with
    # SIGTERM; they must simply exit, not unwind a copy of the session and tear it down.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise Terminated(f"received {signal.Signals(signum).name}")


def _agent_account(profile: AgentProfile) -> pwd.struct_passwd:
    try:
        account = pwd.getpwnam(profile.user)
    except KeyError:
        raise ConfigError(
            f"The agent user {profile.user!r} of profile {profile.name!r} does not exist; "
            f"create it with 'make install' or 'useradd --system --no-create-home "
            f"{profile.user}'."
        ) from None
    if account.pw_uid == 0:
        raise ConfigError(f"The agent user {profile.user!r} has uid 0; agents must run "
                          "unprivileged.")
    return account


class Session:
    """Builds, runs and tears down one session."""

    def __init__(self, config: Config, request: RunRequest,
                 registry: Registry | None = None) -> None:
        self.config = config
        self.request = request
        self.store = Store(config.store_path, signing_key=config.signing_key)
        self.session_id, self.tag = new_session_id()
        # A shared registry when `appliance serve` runs this session beside others.
        self.registry = registry if registry is not None else Registry()
        self.directory = config.runtime_dir / "sessions" / self.tag
        self.lease: pool.Lease | None = None
        self.network: namespace.SessionNetwork | None = None
        self.journal: Journal | None = None
        self.context: SessionContext | None = None
        self.proxy: EmbeddedProxy | None = None
        self.agent: asyncio.subprocess.Process | None = None
        self.resolver: resolver.Resolver | None = None
        self.drops: droplog.DropRecorder | None = None
        self.interrupts = 0
        self.started = time.monotonic()

    def run(self) -> RunResult:
        """Build the session, run the agent to completion and tear everything down.

        Kernel objects are made and removed outside the event loop (pyroute2's synchronous
        API cannot run inside one). SIGTERM during those phases raises Terminated, so the
        `finally` teardown still runs.
        """
        if os.geteuid() != 0:
            raise PrivilegeError("appliance run needs root to create namespaces and nftables "
                                 "rules; run it with sudo.")
        account = _agent_account(self.request.profile)
        # Only the main thread may set handlers; `appliance serve` runs sessions in threads.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        exit_code = 1
        try:
            self.store.ensure()
            sweep_stale(self.config, self.store)
            self.lease = pool.lease(self.config.pool, self.config.runtime_dir, self.tag)
            self.network = namespace.create(self.tag, self.lease)
            # Both bind before the rules exist, because the rules name their port and group.
            self.resolver = resolver.Resolver(self.network.host_address)
            self.drops = droplog.DropRecorder(self.tag)
            nftables.install(self.network, self.config.proxy_port, self.resolver.port,
                             self.drops.group)
            exit_code = asyncio.run(self._run_async(account))
        except Terminated:
            logger.warning("Session %s: terminated during setup", self.session_id)
            exit_code = 128 + signal.SIGTERM
        finally:
            status = self._teardown(exit_code)
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        return RunResult(self.session_id, exit_code,
                         self.context.statements if self.context else 0,
                         self.journal.count if self.journal else 0,
                         time.monotonic() - self.started, status)

    async def _run_async(self, account: pwd.struct_passwd) -> int:
        await self._build(account)
        return await self._run_agent(account)

    async def _build(self, account: pwd.struct_passwd) -> None:
        profile = self.request.profile
        assert self.network is not None
        # Only the configured overrides: other names are resolved on demand by the session
        # resolver and egress policy, which record and check each lookup.
        hosts = dict(self.config.hosts)
        tokens, identity = await self._credentials(account)
        self.journal = self.store.open_journal(self.session_id)
        self.context = SessionContext(
            session_id=self.session_id,
            tag=self.tag,
            profile=profile,
            unix_user=account.pw_name,
            operator=self.request.operator,
            agent_address=str(self.network.namespace_address),
            proxy_address=str(self.network.host_address),
            journal=self.journal,
            placeholder_token="ya29.appliance-placeholder." + secrets.token_urlsafe(32),
            hosts=hosts,
            principal=identity.principal,
            tokens=tokens,
        )
        self.journal.append_sync({
            "kind": SESSION_START,
            "project": profile.project,
            "detail": json.dumps({
                "agent": profile.name,
                "principal": identity.principal,
                "principal_source": identity.determined_by,
                "credential_source": profile.credentials.source,
                "credential": tokens.describe,
                "unix_user": account.pw_name,
                "uid": account.pw_uid,
                "operator": self.request.operator,
                "command": self.request.command,
                "cwd": str(self.request.cwd),
                "namespace": self.network.namespace,
                "agent_address": str(self.network.namespace_address),
                "proxy_address": f"{self.network.host_address}:{self.config.proxy_port}",
                "hosts": hosts,
                "appliance_pid": os.getpid(),
            }, sort_keys=True),
        })
        self.registry.add(self.context)
        assert self.resolver is not None and self.drops is not None
        self.context.namespace_path = self.network.namespace_path
        self.resolver.start(self.context)
        self.drops.start(self.session_id, self.journal.append_sync)
        await self._start_proxy()
        self._write_session_files(account, hosts)
        logger.info("Session %s started: agent profile %s, user %s, namespace %s",
                    self.session_id, profile.name, account.pw_name, self.network.namespace)

    async def _start_proxy(self) -> None:
        """Start this session's own proxy on its host-side address."""
        assert self.network is not None
        self.proxy = EmbeddedProxy(self.config.ca_dir, self.config.upstream_ca_file,
                                   addons.chain(self.registry))
        await self.proxy.start([(str(self.network.host_address), self.config.proxy_port)])

    async def _credentials(self, account: pwd.struct_passwd) -> tuple[TokenSource, Identity]:
        """Load the profile's credential source and mint its first token, off the event loop.

        The principal is the one the token really belongs to. A profile that names another
        principal is rejected, so that a recording never names a principal that did not act.
        """
        profile = self.request.profile
        tokens = await asyncio.to_thread(TokenSource.for_profile, profile, self.config,
                                         self.request.operator, account.pw_uid)
        identity = await asyncio.to_thread(tokens.identify)
        if profile.principal and profile.principal != identity.principal:
            raise CredentialError(
                f"Agent profile {profile.name!r} names principal {profile.principal!r}, but its "
                f"credential ({tokens.describe}) belongs to {identity.principal!r}; correct "
                "'principal' or the credentials of the profile.")
        logger.info("Session %s: principal %s (%s) from %s", self.session_id,
                    identity.principal, identity.determined_by, tokens.describe)
        return tokens, identity

    def _write_session_files(self, account: pwd.struct_passwd, hosts: dict[str, str]) -> None:
        """Write the files the sandbox mounts or points the agent at; only `home` is writable."""
        assert self.proxy is not None and self.context is not None
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.directory.parent, 0o755)
        for parent in self.directory.parents:
            if not parent.stat().st_mode & 0o001:
                raise ConfigError(
                    f"The agent user cannot reach its session files under {self.directory}, "
                    f"because {parent} is not searchable by other users (mode "
                    f"{parent.stat().st_mode & 0o777:o}); set runtime_dir to a directory whose "
                    "parents all have mode o+x, such as the default /run/appliance."
                )
        lines = ["127.0.0.1 localhost", "169.254.169.254 metadata.google.internal metadata"]
        # Other names go to the session resolver, which records every lookup.
        assert self.network is not None
        files = {
            "hosts": "\n".join(lines) + "\n",
            "resolv.conf": f"nameserver {self.network.host_address}\n"
                           "options timeout:2 attempts:2\n",
            "ca.pem": self.proxy.ca_cert_path.read_text(),
            "token": self.context.placeholder_token,
        }
        for name, text in files.items():
            path = self.directory / name
            path.write_text(text)
            os.chmod(path, 0o644)
        home = self.directory / "home"
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, account.pw_uid, account.pw_gid)

    def _agent_environment(self, account: pwd.struct_passwd) -> dict[str, str]:
        profile = self.request.profile
        env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update({
            "HOME": str(self.directory / "home"),
            "USER": account.pw_name,
            "LOGNAME": account.pw_name,
            "APPLIANCE_SESSION_ID": self.session_id,
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(self.directory / "token"),
        })
        for name in CA_VARIABLES:
            env[name] = str(self.directory / "ca.pem")
        if profile.project:
            env["GOOGLE_CLOUD_PROJECT"] = profile.project
            env["CLOUDSDK_CORE_PROJECT"] = profile.project
        env.update(self.request.extra_env)
        return env

    async def _run_agent(self, account: pwd.struct_passwd) -> int:
        assert self.network is not None
        spec = {
            "netns": self.network.namespace_path,
            "bind_mounts": [[str(self.directory / "hosts"), "/etc/hosts"],
                            [str(self.directory / "resolv.conf"), "/etc/resolv.conf"]],
            "uid": account.pw_uid,
            "gid": account.pw_gid,
            "groups": os.getgrouplist(account.pw_name, account.pw_gid),
            "cwd": str(self.request.cwd),
            "command": self.request.command,
            "env": self._agent_environment(account),
            "hidden_paths": protected_paths(self.config, [self.directory, self.request.cwd]),
        }
        self.agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "appliance.sandbox",
            env={**os.environ, SPEC_VARIABLE: json.dumps(spec)},
            stdin=self.request.stdio.get("stdin"), stdout=self.request.stdio.get("stdout"),
            stderr=self.request.stdio.get("stderr"),
        )
        if self.context is not None:
            self.context.sandbox_pid = self.agent.pid
        loop = asyncio.get_running_loop()
        # Under `appliance serve` the client's signals arrive over its socket instead.
        forwarded = ((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                     if threading.current_thread() is threading.main_thread() else ())
        for signum in forwarded:
            loop.add_signal_handler(signum, self._forward_signal, signum)
        try:
            code = await self.agent.wait()
            return 128 - code if code < 0 else code  # Killed by a signal: shell convention.
        finally:
            for signum in forwarded:
                loop.remove_signal_handler(signum)
            await self._stop_proxy()

    def _forward_signal(self, signum: int) -> None:
        """Pass a signal to the agent; a second Ctrl-C or SIGTERM kills it outright."""
        if self.agent is None or self.agent.returncode is not None:
            return
        self.interrupts += 1
        if self.interrupts > 1 and signum in (signal.SIGINT, signal.SIGTERM):
            logger.warning("Session %s: second interrupt, killing the agent", self.session_id)
            self.agent.kill()
            return
        logger.warning("Session %s: forwarding %s to the agent", self.session_id,
                       signal.Signals(signum).name)
        self.agent.send_signal(signum)
        asyncio.get_running_loop().call_later(GRACE_SECONDS * 2, self._kill_agent)

    def _kill_agent(self) -> None:
        if self.agent is not None and self.agent.returncode is None:
            logger.warning("Session %s: agent still running %.0f s after the signal; killing "
                           "it", self.session_id, GRACE_SECONDS * 2)
            self.agent.kill()

    async def _stop_proxy(self) -> None:
        if self.proxy is not None:
            try:
                await self.proxy.stop()
            except Exception:
                logger.exception("Session %s: stopping the proxy failed", self.session_id)
            self.proxy = None

    def _teardown(self, exit_code: int) -> str:
        """Undo everything `_build` did, in reverse; each step is guarded and logged."""
        status = "incomplete"
        if self.agent is not None and self.agent.returncode is None:
            self.agent.kill()
        if self.context is not None:
            self.registry.remove(self.context)
        self._stop_watchers()
        if self.journal is not None:
            status = self._close_journal(exit_code)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("nftables table", lambda: nftables.remove(self.tag)),
            ("namespace and links", lambda: namespace.remove_objects(self.tag)),
            ("session files", lambda: shutil.rmtree(self.directory, ignore_errors=True)),
        ]
        clean = True
        for name, step in steps:
            try:
                step()
            except Exception:
                clean = False
                logger.exception("Session %s: removing the %s failed", self.session_id, name)
        if self.lease is not None and clean:
            self.lease.release()
        # After a failed step the lease stays in place until this process exits; the next
        # start then finds the leftovers unheld and removes them.
        return status

    def _stop_watchers(self) -> None:
        """End what is left in the namespace, then stop the resolver and the drop recorder,
        which record their last counts while the journal is still open."""
        network, dns, drops = self.network, self.resolver, self.drops
        steps: list[tuple[str, Callable[[], object]]] = []
        if network is not None:
            steps.append(("leftover processes",
                          lambda: processes.kill_namespace_processes(network.namespace_path)))
        if dns is not None:
            steps.append(("resolver", dns.stop))
        if drops is not None:
            steps.append(("drop recorder", lambda: drops.stop(nftables.counters(self.tag))))
        for name, step in steps:
            try:
                step()
            except Exception:
                logger.exception("Session %s: stopping the %s failed", self.session_id, name)
        self.resolver = self.drops = None

    def _close_journal(self, exit_code: int) -> str:
        assert self.journal is not None
        try:
            self.journal.append_sync({
                "kind": SESSION_END,
                "detail": json.dumps({"exit_code": exit_code,
                                      "duration_seconds": round(time.monotonic()
                                                                - self.started, 6)}),
            })
        except Exception:
            logger.exception("Session %s: recording the session end failed", self.session_id)
        self.journal.close()
        try:
            with progress(f"Sealing session {self.session_id}"):
                return self.store.seal(self.session_id).status
        except Exception:
            logger.exception("Session %s: sealing failed; the journal is kept and recovered at "
                             "the next start", self.session_id)
            return "unsealed"
        finally:
            self.journal.release()
