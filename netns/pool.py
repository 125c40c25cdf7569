"""Allocate each session a /30 from the configured address pool.

A /30 is taken by holding an exclusive flock on `<runtime_dir>/pool/<network>.lock` for the whole
session. The kernel releases the lock when the holding process exits, even after kill -9, so a
crashed session never leaks its addresses; its kernel objects are swept at the next start.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from appliance.errors import NetworkSetupError

logger = logging.getLogger(__name__)


@dataclass
class Lease:
    """A /30 held by this process: the host side gets the first address, the namespace the second."""

    subnet: ipaddress.IPv4Network
    lock_fd: int

    @property
    def host_address(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def namespace_address(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    def release(self) -> None:
        """Give the /30 back to the pool after a clean teardown."""
        if self.lock_fd >= 0:
            os.ftruncate(self.lock_fd, 0)
            os.close(self.lock_fd)
            self.lock_fd = -1


def lock_directory(runtime_dir: Path) -> Path:
    path = runtime_dir / "pool"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def lease(pool: ipaddress.IPv4Network, runtime_dir: Path, tag: str) -> Lease:
    """Take the first free /30 of `pool` for the session `tag`.

    The tag is written into the lock file, so a later start can tell the kernel objects of
    running sessions from those of a session whose process died without teardown. Raises
    NetworkSetupError when every /30 is in use.
    """
    directory = lock_directory(runtime_dir)
    in_use = _addresses_on_host()
    for subnet in pool.subnets(new_prefix=30):
        if any(address in subnet for address in in_use):
            continue  # Another program (or a store with another runtime_dir) uses it.
        path = directory / f"{subnet.network_address}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, tag.encode("ascii"), 0)
        logger.debug("Leased %s from pool %s for session tag %s", subnet, pool, tag)
        return Lease(subnet=subnet, lock_fd=fd)
    raise NetworkSetupError(
        f"Every /30 of the address pool {pool} is in use by a running session; wait for one to "
        "end or widen network.pool in the configuration."
    )


def _addresses_on_host() -> list[ipaddress.IPv4Address]:
    """Return every IPv4 address configured on a link of the host namespace."""
    with IPRoute() as ipr:
        return [ipaddress.IPv4Address(message.get("IFA_ADDRESS"))
                for message in ipr.get_addr(family=socket.AF_INET)]


def abandoned_tags(runtime_dir: Path) -> list[str]:
    """Return the session tags of leases whose process died before a clean teardown.

    Only leases of this runtime directory are looked at, so objects of sessions that another
    appliance (with another runtime directory) runs are never touched. A returned lease is
    emptied, since its caller removes that session's kernel objects.
    """
    tags = []
    for path in sorted(lock_directory(runtime_dir).glob("*.lock")):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # A running session holds it.
        else:
            tag = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if tag:
                tags.append(tag)
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    return tags
