"""Start the agent command inside its session: run as `python -m appliance.sandbox`.

The appliance starts this module as root with a JSON spec in the APPLIANCE_SANDBOX_SPEC
environment variable. It builds the agent's confinement and then runs the command:

    sandbox (root)            new mount and PID namespaces, private /etc/hosts and resolv.conf,
     │                        joins the session's network namespace
     └── init (root, PID 1)   fresh /proc, new session without a controlling terminal,
          │                   forwards SIGINT/SIGTERM/SIGHUP to the agent's process group,
          │                   reaps orphans
          └── agent           the operator's command under /bin/sh -c, as the agent's Unix user,
                              in its own process group, with no new privileges and a clean
                              environment

When the agent command exits, init exits with its status and the kernel kills every process
left in the PID namespace, so nothing the agent started outlives it. Both root processes die
with their parent (PR_SET_PDEATHSIG), so a killed appliance takes the agent down with it.

What the agent cannot do, and why:

- see, signal or trace the appliance: it lives outside the agent's PID namespace, and the two
  root processes inside it are not dumpable (PR_SET_DUMPABLE 0) and run as another user;
- gain privileges: no_new_privs makes setuid and file-capability binaries (sudo, su, ping)
  run without them, and the agent user has no capabilities, so it cannot open raw or packet
  sockets or change the namespace's addresses, routes or firewall;
- read the appliance's secrets and records: besides their root-only modes, every path in the
  spec's `hidden_paths` (store, CA directory, signing key, credential files, configuration)
  is covered by an empty read-only tmpfs, or /dev/null for a file, in the agent's mount
  namespace. Mounts made in a more privileged namespace are locked in any namespace the agent
  makes later, so they cannot be unmounted to look underneath.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from appliance.config import DEFAULT_CONFIG_PATH, Config

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
MS_RDONLY = 0x1
PR_SET_NO_NEW_PRIVS = 38
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SPEC_VARIABLE = "APPLIANCE_SANDBOX_SPEC"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def _hide(path: str) -> None:
    """Cover `path` in this mount namespace: an empty read-only tmpfs, or /dev/null for a file."""
    if os.path.isdir(path):
        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=4k,mode=000")
    elif os.path.lexists(path):
        _mount("/dev/null", path, None, MS_BIND)


def protected_paths(config: Config, keep: list[Path]) -> list[str]:
    """Return the appliance paths the agent must not see, except those holding a `keep` path.

    The session directory and the agent's working directory are kept reachable even when an
    operator puts them under one of these paths.
    """
    candidates = [config.store_path, config.ca_dir, config.signing_key,
                  config.runtime_dir / "pool", DEFAULT_CONFIG_PATH.parent]
    if config.source is not None:
        candidates.append(config.source)
    candidates += [profile.credentials.file for profile in config.agents.values()
                   if profile.credentials.file is not None]
    # Application Default Credentials the appliance itself may use.
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        candidates.append(Path(os.environ["GOOGLE_APPLICATION_CREDENTIALS"]))
    hidden = []
    for candidate in candidates:
        path = Path(os.path.abspath(candidate))
        if any(path == kept or path in kept.parents for kept in keep):
            continue
        if str(path) not in hidden:
            hidden.append(str(path))
    return hidden


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"appliance sandbox: {message}\n")
    os._exit(126)


def _wait_forwarding(child: int, group: bool) -> int:
    """Wait for `child`, passing forwarded signals on, and return its exit status as a code.

    With `group`, signals go to the child's whole process group, as a terminal's Ctrl-C does.
    """

    def forward(signum: int, _frame: Any) -> None:
        try:
            if group:
                os.killpg(child, signum)
            else:
                os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) \
                else 128 + os.WTERMSIG(status)


def _run_agent(spec: dict[str, Any]) -> NoReturn:
    """Drop to the agent's user and exec its command; never returns."""
    try:
        os.setpgid(0, 0)
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(spec["cwd"])
    except OSError as error:
        _fail(f"cannot switch to the agent user or directory {spec['cwd']!r}: {error}")
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execve("/bin/sh", ["/bin/sh", "-c", spec["command"]], spec["env"])
    except OSError as error:
        _fail(f"cannot run /bin/sh for the agent command: {error}")


def _run_init(spec: dict[str, Any]) -> NoReturn:
    """Act as PID 1 of the agent's PID namespace until the agent command exits."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_DUMPABLE, 0)
    os.setsid()
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    agent = os.fork()
    if agent == 0:
        _run_agent(spec)
    os._exit(_wait_forwarding(agent, group=True))


def main() -> NoReturn:
    spec = json.loads(os.environ.pop(SPEC_VARIABLE))
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(PR_SET_DUMPABLE, 0)
        os.unshare(os.CLONE_NEWNS | os.CLONE_NEWPID | os.CLONE_NEWIPC | os.CLONE_NEWUTS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        for source, target in spec["bind_mounts"]:
            _mount(source, target, None, MS_BIND)
        for path in spec.get("hidden_paths", []):
            _hide(path)
        fd = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
        os.setns(fd, os.CLONE_NEWNET)
        os.close(fd)
    except OSError as error:
        _fail(f"cannot confine the agent: {error}")
    init = os.fork()
    if init == 0:
        _run_init(spec)
    os._exit(_wait_forwarding(init, group=False))


if __name__ == "__main__":
    main()
