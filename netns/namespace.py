"""Create and remove a session's network namespace and veth pair with pyroute2.

Every kernel object carries the session tag, so teardown is one delete per object:
namespace `ap-<tag>`, host-side link `ap-<tag>-h`, namespace-side link `ap-<tag>-n`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from appliance.errors import NetworkSetupError, PrivilegeError
from appliance.netns.pool import Lease

logger = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"


@dataclass(frozen=True)
class SessionNetwork:
    """The kernel objects of one session's network."""

    tag: str
    namespace: str
    host_link: str
    namespace_link: str
    host_address: IPv4Address
    namespace_address: IPv4Address
    prefixlen: int

    @property
    def namespace_path(self) -> str:
        return f"{NETNS_DIR}/{self.namespace}"


def names_for(tag: str) -> tuple[str, str, str]:
    """Return the namespace, host link and namespace link names of session `tag`."""
    return f"ap-{tag}", f"ap-{tag}-h", f"ap-{tag}-n"


def create(tag: str, lease: Lease) -> SessionNetwork:
    """Create the namespace and veth pair for session `tag` on the leased /30.

    Inside the namespace: loopback up, IPv6 disabled, the veth end addressed and a default route
    to the host side. On any failure the objects created so far are removed before raising.
    """
    namespace, host_link, namespace_link = names_for(tag)
    network = SessionNetwork(
        tag=tag,
        namespace=namespace,
        host_link=host_link,
        namespace_link=namespace_link,
        host_address=lease.host_address,
        namespace_address=lease.namespace_address,
        prefixlen=lease.subnet.prefixlen,
    )
    try:
        netns.create(namespace)
        _disable_ipv6(network.namespace_path)
        _create_veth(network)
        _configure_namespace_side(network)
    except NetlinkError as error:
        remove_objects(tag)
        if error.code == errno.EPERM:
            raise PrivilegeError(
                "Creating a network namespace needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); "
                "run appliance as root."
            ) from error
        raise NetworkSetupError(
            f"Setting up the network of session tag {tag} failed: {error}."
        ) from error
    except OSError as error:
        remove_objects(tag)
        if error.errno == errno.EPERM:
            raise PrivilegeError(
                f"Creating network namespace {namespace} needs root; run appliance as root."
            ) from error
        raise NetworkSetupError(f"Creating network namespace {namespace} failed: {error}.") \
            from error
    logger.info("Created namespace %s: %s/%d (host) <-> %s/%d (agent)", namespace,
                network.host_address, network.prefixlen, network.namespace_address,
                network.prefixlen)
    return network


def _create_veth(network: SessionNetwork) -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname=network.host_link, kind="veth",
                 peer={"ifname": network.namespace_link, "net_ns_fd": network.namespace})
        index = ipr.link_lookup(ifname=network.host_link)[0]
        ipr.addr("add", index=index, address=str(network.host_address),
                 prefixlen=network.prefixlen)
        ipr.link("set", index=index, state="up")


def _configure_namespace_side(network: SessionNetwork) -> None:
    with NetNS(network.namespace) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        index = ns.link_lookup(ifname=network.namespace_link)[0]
        ns.addr("add", index=index, address=str(network.namespace_address),
                prefixlen=network.prefixlen)
        ns.link("set", index=index, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=str(network.host_address))


def _disable_ipv6(namespace_path: str) -> None:
    """Turn IPv6 off in the namespace before any link is moved into it.

    Network sysctls apply to the namespace of the thread that opens them, so a short-lived
    thread joins the namespace, writes them and exits without touching the main thread.
    """
    failure: list[BaseException] = []

    def write() -> None:
        try:
            fd = os.open(namespace_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            for scope in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as sysctl:
                    sysctl.write("1")
        except BaseException as error:  # handed to the calling thread below
            failure.append(error)

    thread = threading.Thread(target=write, name="netns-sysctl")
    thread.start()
    thread.join()
    if failure:
        error = failure[0]
        if isinstance(error, FileNotFoundError):
            return  # The kernel has no IPv6 at all, which is as good as disabled.
        raise error


def remove_objects(tag: str) -> list[str]:
    """Remove the namespace and links named after `tag`, whichever exist; return what was removed.

    Deleting one end of a veth pair deletes both, and deleting the namespace deletes its end.
    """
    namespace, host_link, _ = names_for(tag)
    removed = []
    try:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=host_link)
            if indexes:
                ipr.link("del", index=indexes[0])
                removed.append(f"link {host_link}")
    except NetlinkError as error:
        logger.error("Removing link %s failed: %s", host_link, error)
    if namespace in netns.listnetns():
        try:
            netns.remove(namespace)
            removed.append(f"namespace {namespace}")
        except OSError as error:
            logger.error("Removing namespace %s failed: %s", namespace, error)
    if removed:
        logger.info("Removed %s", ", ".join(removed))
    return removed

