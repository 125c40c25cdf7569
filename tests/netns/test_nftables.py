"""Tests for a session's nftables table: the exact script, and install/remove as root.

The install tests create a real table in the host namespace. Its rules match only a veth name
that does not exist (`aptest-<hex>-h`), so they capture no traffic. The table is deleted in a
`finally` block whatever the test does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from appliance.netns import nftables
from appliance.netns.namespace import SessionNetwork

needs_nft_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                    reason="installing nftables tables needs root and nft")

PROXY_PORT = 15001
DNS_PORT = 40053
LOG_GROUP = 17000


def session_network(tag: str) -> SessionNetwork:
    # Interface names have at most 15 characters, so the link names take 4 digits of the tag.
    return SessionNetwork(
        tag=tag,
        namespace=f"aptest-{tag}",
        host_link=f"aptest-{tag[:4]}-h",
        namespace_link=f"aptest-{tag[:4]}-n",
        host_address=IPv4Address("198.18.200.1"),
        namespace_address=IPv4Address("198.18.200.2"),
        prefixlen=30,
    )


def list_table(tag: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "list", "table", "inet", nftables.table_name(tag)],
                          capture_output=True, text=True, check=False)


@pytest.fixture
def tag() -> Iterator[str]:
    value = secrets.token_hex(4)
    try:
        yield value
    finally:
        if shutil.which("nft") and list_table(value).returncode == 0:
            subprocess.run(["nft", "delete", "table", "inet", nftables.table_name(value)],
                           capture_output=True, check=False)


def test_table_name_carries_tag() -> None:
    assert nftables.table_name("0a1b2c3d") == "appliance_0a1b2c3d"


def test_ruleset_exact_script() -> None:
    script = nftables.ruleset(session_network("0a1b2c3d"), 15001, 40053, 17000)

    log = 'log prefix "appliance 0a1b2c3d {chain}" group 17000 snaplen 512'
    assert script == (
        "table inet appliance_0a1b2c3d {\n"
        "    chain screen {\n"
        "        type filter hook prerouting priority mangle; policy accept;\n"
        '        iifname "aptest-0a1b-h" meta nfproto ipv4 meta l4proto tcp accept\n'
        '        iifname "aptest-0a1b-h" ip daddr 198.18.200.1 udp dport 53 counter accept '
        'comment "dns-udp"\n'
        '        iifname "aptest-0a1b-h" ct state related ct status dnat accept\n'
        f'        iifname "aptest-0a1b-h" meta l4proto tcp counter {log.format(chain="screen")} '
        'reject with tcp reset comment "screen-tcp"\n'
        f'        iifname "aptest-0a1b-h" counter {log.format(chain="screen")} '
        'reject with icmpx admin-prohibited comment "screen-other"\n'
        "    }\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        '        iifname "aptest-0a1b-h" ip daddr 198.18.200.1 tcp dport 53 counter '
        'redirect to :40053 comment "dns-tcp"\n'
        '        iifname "aptest-0a1b-h" ip daddr 198.18.200.1 udp dport 53 redirect to :40053\n'
        '        iifname "aptest-0a1b-h" meta l4proto tcp redirect to :15001\n'
        "    }\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        '        iifname "aptest-0a1b-h" ip daddr 198.18.200.1 tcp dport 15001 '
        "ct status dnat accept\n"
        '        iifname "aptest-0a1b-h" ip daddr 198.18.200.1 meta l4proto { tcp, udp } '
        "th dport 40053 accept\n"
        '        iifname "aptest-0a1b-h" ct state related ct status dnat accept\n'
        f'        iifname "aptest-0a1b-h" meta l4proto tcp counter {log.format(chain="input")} '
        'reject with tcp reset comment "input-tcp"\n'
        f'        iifname "aptest-0a1b-h" counter {log.format(chain="input")} '
        'reject with icmpx admin-prohibited comment "input-other"\n'
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy accept;\n"
        '        iifname "aptest-0a1b-h" counter drop comment "forward-out"\n'
        '        oifname "aptest-0a1b-h" counter drop comment "forward-in"\n'
        "    }\n"
        "}\n"
    )


def test_ruleset_uses_given_ports() -> None:
    script = nftables.ruleset(session_network("0a1b2c3d"), 8443, 41000, 17000)

    assert "meta l4proto tcp redirect to :8443\n" in script
    assert "tcp dport 8443 ct status dnat accept\n" in script
    assert "udp dport 53 redirect to :41000\n" in script
    assert "15001" not in script


def test_parse_counters_reads_commented_rules() -> None:
    listing = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"rule": {"comment": "screen-other", "expr": [
            {"match": {}}, {"counter": {"packets": 7, "bytes": 420}}, {"reject": None}]}},
        {"rule": {"expr": [{"counter": {"packets": 3, "bytes": 10}}]}},
        {"rule": {"comment": "dns-udp", "expr": [{"counter": {"packets": 2, "bytes": 90}}]}},
    ]})

    assert nftables.parse_counters(listing) == {"screen-other": 7, "dns-udp": 2}


def test_parse_counters_tolerates_garbage() -> None:
    assert nftables.parse_counters("not json") == {}


@needs_nft_root
def test_ruleset_passes_nft_check(tag: str) -> None:
    result = subprocess.run(["nft", "-c", "-f", "-"], capture_output=True, text=True,
                            input=nftables.ruleset(session_network(tag), PROXY_PORT, DNS_PORT, LOG_GROUP),
                            check=False)

    assert result.returncode == 0, result.stderr


@needs_nft_root
def test_install_creates_chains(tag: str) -> None:
    nftables.install(session_network(tag), PROXY_PORT, DNS_PORT, LOG_GROUP)

    listing = list_table(tag)

    assert listing.returncode == 0, listing.stderr
    for chain in ("screen", "prerouting", "input", "forward"):
        assert f"chain {chain} {{" in listing.stdout
    assert f'iifname "aptest-{tag[:4]}-h" meta l4proto tcp redirect to :{PROXY_PORT}' \
        in listing.stdout
    assert f'oifname "aptest-{tag[:4]}-h" counter packets 0 bytes 0 drop' in listing.stdout


@needs_nft_root
def test_counters_start_at_zero(tag: str) -> None:
    nftables.install(session_network(tag), PROXY_PORT, DNS_PORT, LOG_GROUP)

    counted = nftables.counters(tag)

    assert counted == {name: 0 for name in ("dns-udp", "screen-tcp", "screen-other", "dns-tcp",
                                            "input-tcp", "input-other", "forward-out",
                                            "forward-in")}


@needs_nft_root
def test_remove_deletes_table_once(tag: str) -> None:
    nftables.install(session_network(tag), PROXY_PORT, DNS_PORT, LOG_GROUP)

    assert nftables.remove(tag) is True
    assert list_table(tag).returncode != 0
    assert nftables.remove(tag) is False


@needs_nft_root
def test_remove_absent_table(tag: str) -> None:
    assert nftables.remove(tag) is False

