"""Install and remove a session's nftables table.

Each session owns one table, `inet appliance_<tag>`, in the host namespace. It

- redirects every TCP connection arriving from the session's veth to the proxy port on the
  host-side address (the proxy reads the original destination with SO_ORIGINAL_DST);
- accepts, on input from that veth, only TCP whose destination was rewritten by that redirect,
  so a connection aimed at the proxy's own address never reaches it and cannot loop;
- drops everything else from the veth on input (UDP, ICMP, other protocols, IPv6) and every
  packet forwarded to or from it.

The rules match only on the session's veth, so the proxy's own upstream connections, which
leave through other links, are never captured again.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from appliance.errors import NetworkSetupError, PrivilegeError
from appliance.netns.namespace import SessionNetwork

logger = logging.getLogger(__name__)


def table_name(tag: str) -> str:
    return f"appliance_{tag}"


def ruleset(network: SessionNetwork, proxy_port: int) -> str:
    """Return the nft script that creates the session's table."""
    link = network.host_link
    return f"""table inet {table_name(network.tag)} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{link}" meta l4proto tcp redirect to :{proxy_port}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{link}" ip daddr {network.host_address} tcp dport {proxy_port} ct status dnat accept
        iifname "{link}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{link}" drop
        oifname "{link}" drop
    }}
}}
"""


def _nft(arguments: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("nft")
    if binary is None:
        raise PrivilegeError(
            "The nft command is not installed; install the nftables package "
            "(apt-get install nftables)."
        )
    return subprocess.run([binary, *arguments], input=script, capture_output=True, text=True,
                          check=False)


def install(network: SessionNetwork, proxy_port: int) -> None:
    """Create the session's table; raise NetworkSetupError with nft's message on failure."""
    result = _nft(["-f", "-"], ruleset(network, proxy_port))
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or ["no output"]
        if "Operation not permitted" in result.stderr:
            raise PrivilegeError("Installing nftables rules needs root (CAP_NET_ADMIN); run "
                                 "appliance as root.")
        raise NetworkSetupError(
            f"Installing nftables table inet {table_name(network.tag)} failed: {message[0]}"
        )
    logger.info("Installed nftables table inet %s (proxy port %d)", table_name(network.tag),
                proxy_port)


def remove(tag: str) -> bool:
    """Delete the table of session `tag` if it exists; return whether one was deleted."""
    name = table_name(tag)
    if _nft(["list", "table", "inet", name]).returncode != 0:
        return False
    result = _nft(["delete", "table", "inet", name])
    if result.returncode != 0:
        logger.error("Deleting nftables table inet %s failed: %s", name, result.stderr.strip())
        return False
    logger.info("Removed nftables table inet %s", name)
    return True

