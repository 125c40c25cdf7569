"""Install and remove a session's nftables table, and read its counters.

Each session owns one table, `inet appliance_<tag>`, in the host namespace. For packets
arriving from the session's veth it

- screens them at prerouting, before any routing decision, so the verdict does not depend on
  the host's forwarding setting. IPv4 TCP, UDP to the resolver address on port 53, and ICMP
  errors about a passed flow pass. Everything else (other UDP including QUIC on 443 and DNS to
  any other server, ICMP, raw IP protocols, all IPv6) is logged to the session's NFLOG group,
  counted and rejected: TCP with a reset, the rest with an ICMP "administratively prohibited",
  so the sender fails at once instead of waiting;
- redirects TCP and UDP to the host-side address port 53 to the session's resolver port, and
  every other TCP connection to the proxy port (the proxy reads the original destination with
  SO_ORIGINAL_DST); the metadata address 169.254.169.254 is TCP and reaches the proxy this way;
- accepts, on input, only what those redirects rewrote, so a connection aimed at the proxy's
  own port never reaches it and cannot loop: it is logged, counted and reset. The resolver
  port is accepted without that check, because only packets sent to port 53 can carry it: the
  screen refuses other UDP to the host, and other TCP is redirected to the proxy (requiring
  the redirect mark there refused a DNS query now and then in the adversarial tests);
- drops, with a counter, every packet forwarded to or from the veth.

Connection-tracking entries an earlier session on the same addresses left are deleted before
the table is installed. Rules that count carry a comment, which `counters` reports, so the session can record how many
packets each rule saw even when the NFLOG reader could not keep up. The rules match only on the
session's veth, so the proxy's own upstream connections, which leave through other links, are
never captured again.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from appliance.errors import NetworkSetupError, PrivilegeError
from appliance.netns.namespace import SessionNetwork

logger = logging.getLogger(__name__)

DNS_PORT = 53


def table_name(tag: str) -> str:
    return f"appliance_{tag}"


def log_prefix(tag: str, chain: str) -> str:
    """Return the NFLOG prefix of the drop rules of `chain`; the drop recorder parses it."""
    return f"appliance {tag} {chain}"


def ruleset(network: SessionNetwork, proxy_port: int, dns_port: int, log_group: int) -> str:
    """Return the nft script that creates the session's table."""
    link = network.host_link
    host = network.host_address
    tag = network.tag
    screen_log = f'log prefix "{log_prefix(tag, "screen")}" group {log_group} snaplen 512'
    input_log = f'log prefix "{log_prefix(tag, "input")}" group {log_group} snaplen 512'
    return f"""table inet {table_name(tag)} {{
    chain screen {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{link}" meta nfproto ipv4 meta l4proto tcp accept
        iifname "{link}" ip daddr {host} udp dport {DNS_PORT} counter accept comment "dns-udp"
        iifname "{link}" ct state related ct status dnat accept
        iifname "{link}" meta l4proto tcp counter {screen_log} reject with tcp reset \
comment "screen-tcp"
        iifname "{link}" counter {screen_log} reject with icmpx admin-prohibited \
comment "screen-other"
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{link}" ip daddr {host} tcp dport {DNS_PORT} counter redirect to :{dns_port} \
comment "dns-tcp"
        iifname "{link}" ip daddr {host} udp dport {DNS_PORT} redirect to :{dns_port}
        iifname "{link}" meta l4proto tcp redirect to :{proxy_port}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{link}" ip daddr {host} tcp dport {proxy_port} ct status dnat accept
        iifname "{link}" ip daddr {host} meta l4proto {{ tcp, udp }} th dport {dns_port} accept
        iifname "{link}" ct state related ct status dnat accept
        iifname "{link}" meta l4proto tcp counter {input_log} reject with tcp reset \
comment "input-tcp"
        iifname "{link}" counter {input_log} reject with icmpx admin-prohibited \
comment "input-other"
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{link}" counter drop comment "forward-out"
        oifname "{link}" counter drop comment "forward-in"
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


def forget_connections(address: str) -> int:
    """Delete the host's connection-tracking entries to or from `address`; return how many.

    A /30 is reused by later sessions, and a UDP entry lives 30 to 120 s. An entry left by an
    earlier session would send a new flow with the same addresses and ports to that session's
    resolver port, which no longer exists, so each session starts without them.
    """
    deleted = 0
    try:
        with Conntrack() as tracker:
            stale = [entry for entry in tracker.dump_entries()
                     if address in (entry.tuple_orig.saddr, entry.tuple_orig.daddr)]
            for entry in stale:
                try:
                    tracker.delete(entry)
                    deleted += 1
                except NetlinkError:
                    pass  # Expired between the dump and the delete.
    except (NetlinkError, OSError) as error:
        logger.warning("Could not clear connection tracking entries of %s: %s", address, error)
    if deleted:
        logger.info("Deleted %d stale connection tracking entries of %s", deleted, address)
    return deleted


def install(network: SessionNetwork, proxy_port: int, dns_port: int, log_group: int) -> None:
    """Create the session's table; raise NetworkSetupError with nft's message on failure."""
    forget_connections(str(network.namespace_address))
    result = _nft(["-f", "-"], ruleset(network, proxy_port, dns_port, log_group))
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or ["no output"]
        if "Operation not permitted" in result.stderr:
            raise PrivilegeError("Installing nftables rules needs root (CAP_NET_ADMIN); run "
                                 "appliance as root.")
        raise NetworkSetupError(
            f"Installing nftables table inet {table_name(network.tag)} failed: {message[0]}"
        )
    logger.info("Installed nftables table inet %s (proxy port %d, resolver port %d, log group "
                "%d)", table_name(network.tag), proxy_port, dns_port, log_group)


def counters(tag: str) -> dict[str, int]:
    """Return the packet count of each commented rule of session `tag`'s table.

    Returns an empty mapping when the table does not exist or nft cannot list it.
    """
    result = _nft(["-j", "list", "table", "inet", table_name(tag)])
    if result.returncode != 0:
        return {}
    return parse_counters(result.stdout)


def parse_counters(listing: str) -> dict[str, int]:
    """Extract `comment -> packets` from the JSON output of `nft -j list table`."""
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return {}
    found: dict[str, int] = {}
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or "comment" not in rule:
            continue
        for statement in rule.get("expr", []):
            if isinstance(statement, dict) and isinstance(statement.get("counter"), dict):
                found[str(rule["comment"])] = int(statement["counter"].get("packets", 0))
    return found


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
