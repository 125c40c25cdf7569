"""Tests for a session's nftables table: the exact script, and install/remove as root.

The install tests create a real table in the host namespace. Its rules match only a veth name
that does not exist (`aptest-<hex>-h`), so they capture no traffic. The table is deleted in a
`finally` block whatever the test does.
"""

from __future__ import annotations

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
    script = nftables.ruleset(session_network("0a1b2c3d"), 15001)

    assert script == (
        "table inet appliance_0a1b2c3d {\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        '        iifname "aptest-0a1b-h" meta l4proto tcp redirect to :15001\n'
        "    }\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        '        iifname "aptest-0a1b-h" ip daddr 198.18.200.1 tcp dport 15001 '
        "ct status dnat accept\n"
        '        iifname "aptest-0a1b-h" drop\n'
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy accept;\n"
        '        iifname "aptest-0a1b-h" drop\n'
        '        oifname "aptest-0a1b-h" drop\n'
        "    }\n"
        "}\n"
    )


def test_ruleset_uses_given_port() -> None:
    script = nftables.ruleset(session_network("0a1b2c3d"), 8443)

    assert "redirect to :8443\n" in script
    assert "tcp dport 8443 ct status dnat accept\n" in script
    assert "15001" not in script


@needs_nft_root
def test_ruleset_passes_nft_check(tag: str) -> None:
    result = subprocess.run(["nft", "-c", "-f", "-"], capture_output=True, text=True,
                            input=nftables.ruleset(session_network(tag), PROXY_PORT),
                            check=False)

    assert result.returncode == 0, result.stderr


@needs_nft_root
def test_install_creates_chains(tag: str) -> None:
    nftables.install(session_network(tag), PROXY_PORT)

    listing = list_table(tag)

    assert listing.returncode == 0, listing.stderr
    for chain in ("prerouting", "input", "forward"):
        assert f"chain {chain} {{" in listing.stdout
    assert f'iifname "aptest-{tag[:4]}-h" meta l4proto tcp redirect to :{PROXY_PORT}' \
        in listing.stdout
    assert f'oifname "aptest-{tag[:4]}-h" drop' in listing.stdout


@needs_nft_root
def test_remove_deletes_table_once(tag: str) -> None:
    nftables.install(session_network(tag), PROXY_PORT)

    assert nftables.remove(tag) is True
    assert list_table(tag).returncode != 0
    assert nftables.remove(tag) is False


@needs_nft_root
def test_remove_absent_table(tag: str) -> None:
    assert nftables.remove(tag) is False

