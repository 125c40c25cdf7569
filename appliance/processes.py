"""Find the process inside a session that owns a connection, and end a session's processes.

The proxy gets a connection's source address and port. Inside the session's network namespace
that pair names one socket in /proc/<pid>/net/tcp (or tcp6, for a dual-stack socket), which
gives its inode; the process holding `socket:[inode]` among its file descriptors owns the
connection. The candidates are the sandbox's descendants, found through
/proc/<pid>/task/<tid>/children, so a lookup reads a handful of small files, not all of /proc.
Pids are host pids, because the appliance looks at the sandbox's PID namespace from outside.
`ns_pid` is the same process's pid inside the agent's PID namespace.

A connection whose process exited before the lookup is reported with an `error`, never
guessed. Everything here blocks on /proc reads; callers run it off the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CMDLINE_LIMIT = 512
CHAIN_LIMIT = 32


def _read(path: str, limit: int = 65536) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read(limit)
    except OSError:
        return None


def descendants(root: int) -> list[int]:
    """Return every descendant of `root`, parents before children."""
    found: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop(0)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            data = _read(f"/proc/{pid}/task/{task}/children")
            for child in (data or b"").split():
                if int(child) not in found:
                    found.append(int(child))
                    pending.append(int(child))
    return found


def proc_address(address: str, family: int) -> str:
    """Format an address the way /proc/net/tcp and tcp6 print it (32-bit words, host order)."""
    if family == socket.AF_INET:
        packed = socket.inet_aton(address)
    else:
        packed = socket.inet_pton(socket.AF_INET6, "::ffff:" + address)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words)


def socket_inode(pid: int, address: str, port: int) -> int | None:
    """Return the inode of the TCP socket bound to address:port in `pid`'s network namespace."""
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        wanted = f"{proc_address(address, family)}:{port:04X}"
        data = _read(f"/proc/{pid}/net/{table}", 4 * 1024 * 1024)
        for line in (data or b"").decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[1] == wanted and fields[9] != "0":
                return int(fields[9])
    return None


def holders(pids: list[int], inode: int) -> list[int]:
    """Return the pids among `pids` that hold socket `inode` open."""
    target = f"socket:[{inode}]"
    found = []
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") == target:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def describe(pid: int) -> dict[str, Any] | None:
    """Return pid, pid in the sandbox, parent, uid, executable and command line of `pid`."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    fields: dict[str, str] = {}
    for line in status.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    cmdline = (_read(f"/proc/{pid}/cmdline") or b"").rstrip(b"\0").split(b"\0")
    text = " ".join(part.decode("utf-8", "backslashreplace") for part in cmdline)
    try:
        executable: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        executable = None
    ns_pids = fields.get("NSpid", "").split()
    return {
        "pid": pid,
        "ns_pid": int(ns_pids[-1]) if ns_pids else None,
        "ppid": int(fields.get("PPid", "0") or 0),
        "uid": int(fields.get("Uid", "-1").split()[0]),
        "executable": executable,
        "cmdline": text[:CMDLINE_LIMIT] + ("..." if len(text) > CMDLINE_LIMIT else ""),
    }


def owner(sandbox_pid: int, address: str, port: int) -> dict[str, Any]:
    """Describe the process in the sandbox of `sandbox_pid` that owns the TCP socket
    address:port, with its parent chain up to the agent command.

    Returns a dict with `error` instead when the socket or its process is gone.
    """
    pids = descendants(sandbox_pid)
    if not pids:
        return {"error": "the sandbox has no processes"}
    init = pids[0]
    # The sandbox process joined the session's network namespace, so its tables are the
    # session's.
    inode = socket_inode(sandbox_pid, address, port)
    if inode is None:
        return {"error": f"no socket {address}:{port} in the session (closed already)"}
    found = holders(pids[1:], inode)
    if not found:
        return {"error": f"no process holds socket {address}:{port} (exited already)"}
    chain: list[dict[str, Any]] = []
    pid = found[0]
    while pid not in (init, sandbox_pid, 0) and len(chain) < CHAIN_LIMIT:
        info = describe(pid)
        if info is None:
            break
        chain.append(info)
        pid = info["ppid"]
    if not chain:
        return {"error": f"the process holding {address}:{port} exited during the lookup"}
    result: dict[str, Any] = dict(chain[0])
    result["chain"] = [{key: info[key] for key in ("pid", "ns_pid", "executable", "cmdline")}
                       for info in chain[1:]]
    # A child of init is the agent command, or a process orphaned to init.
    result["agent_command"] = chain[-1]["ppid"] == init
    if len(found) > 1:
        result["also_held_by"] = found[1:]
    return result


def namespace_pids(namespace_path: str) -> list[int]:
    """Return every process whose network namespace is the one at `namespace_path`."""
    try:
        target = os.stat(namespace_path)
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            info = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (info.st_ino, info.st_dev) == (target.st_ino, target.st_dev):
            found.append(int(entry.name))
    return found


def kill_namespace_processes(namespace_path: str) -> list[int]:
    """SIGKILL every process left in the network namespace; return their pids.

    The sandbox's PID namespace already ends the agent's processes with its init. This also
    ends anything that entered the network namespace by another path, before it is deleted.
    """
    killed = []
    for pid in namespace_pids(namespace_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    if killed:
        logger.warning("Killed %d processes left in %s: %s", len(killed), namespace_path,
                       killed)
    return killed
