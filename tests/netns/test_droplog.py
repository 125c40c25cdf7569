"""Tests for the drop recorder: NFLOG parsing and packet description over bytes, repeat
counting, and one real round trip through the kernel on loopback.

The kernel test installs a table `inet aptestlog_<hex>` whose only rule logs UDP from this host
to 127.0.0.1 on one random port. The rule accepts the packet, and the table is deleted in
`finally`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
from typing import Any

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from appliance.netns import droplog
from appliance.recordings.schema import DROPPED, FIREWALL_COUNTERS

needs_nft_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                    reason="installing nftables tables needs root and nft")


def attribute(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def nflog_message(family: int, payload: bytes, prefix: str = "appliance 0a1b2c3d screen",
                  timestamp: tuple[int, int] | None = (1_700_000_000, 250_000)) -> bytes:
    body = struct.pack("=BB", family, 0) + struct.pack(">H", 17000)
    body += attribute(droplog.NFULA_PREFIX, prefix.encode() + b"\0")
    if timestamp is not None:
        body += attribute(droplog.NFULA_TIMESTAMP, struct.pack(">QQ", *timestamp))
    body += attribute(droplog.NFULA_PAYLOAD, payload)
    kind = (droplog.NFNL_SUBSYS_ULOG << 8) | droplog.NFULNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_parse_message_fields() -> None:
    payload = bytes(IP(src="198.18.0.2", dst="198.18.5.5") / UDP(dport=443) / b"quic")

    [packet] = droplog.parse_messages(nflog_message(socket.AF_INET, payload))

    assert isinstance(packet, droplog.LoggedPacket)
    assert packet.prefix == "appliance 0a1b2c3d screen"
    assert packet.payload == payload
    assert packet.timestamp == 1_700_000_000.25


def test_parse_several_messages_and_errors() -> None:
    payload = bytes(IP() / UDP())
    error = struct.pack("=IHHII", 20, droplog.NLMSG_ERROR, 0, 0, 0) + struct.pack("=i", -16)

    items = droplog.parse_messages(nflog_message(2, payload) + error + nflog_message(2, payload))

    assert [type(item).__name__ for item in items] == ["LoggedPacket", "int", "LoggedPacket"]
    assert items[1] == -16


def test_parse_truncated_message_ignored() -> None:
    assert droplog.parse_messages(nflog_message(2, bytes(IP() / UDP()))[:-8]) == []


@pytest.mark.parametrize("packet, expected", [
    (IP(src="198.18.0.2", dst="198.18.5.5") / UDP(sport=5000, dport=443),
     droplog.Attempt("udp", "198.18.0.2", "198.18.5.5", 443)),
    (IP(src="198.18.0.2", dst="198.18.0.1") / TCP(dport=15001),
     droplog.Attempt("tcp", "198.18.0.2", "198.18.0.1", 15001)),
    (IP(src="198.18.0.2", dst="198.18.5.5") / ICMP(type=8),
     droplog.Attempt("icmp-type-8", "198.18.0.2", "198.18.5.5", None)),
    (IP(src="198.18.0.2", dst="198.18.5.5", proto=47) / b"gre!",
     droplog.Attempt("gre", "198.18.0.2", "198.18.5.5", None)),
    (IPv6(src="fe80::1", dst="ff02::1") / UDP(dport=9),
     droplog.Attempt("udp6", "fe80::1", "ff02::1", 9)),
    (IPv6(src="fd00::2", dst="fd00::1") / TCP(dport=443),
     droplog.Attempt("tcp6", "fd00::2", "fd00::1", 443)),
    (IP(src="198.18.0.2", dst="198.18.5.5") / UDP(dport=53)
     / DNS(rd=1, qd=DNSQR(qname="secret.exfil.example")),
     droplog.Attempt("udp", "198.18.0.2", "198.18.5.5", 53, "secret.exfil.example")),
])
def test_describe_packets(packet: Any, expected: droplog.Attempt) -> None:
    logged = droplog.LoggedPacket(2, "appliance x screen", bytes(packet))

    assert droplog.describe(logged) == expected


def test_describe_garbage_is_none() -> None:
    assert droplog.describe(droplog.LoggedPacket(2, "", b"\x45\x00")) is None


def test_tally_records_first_then_counts() -> None:
    tally = droplog.DropTally()
    attempt = droplog.Attempt("udp", "198.18.0.2", "198.18.5.5", 443)

    first = tally.observe(attempt, "screen", 1_700_000_000.0)
    repeats = [tally.observe(attempt, "screen", 1_700_000_001.0) for _ in range(4)]
    pending = tally.pending()

    assert first is not None
    assert json.loads(first["detail"])["count"] == 1
    assert first["server"] == "198.18.5.5:443"
    assert repeats == [None] * 4
    assert len(pending) == 1
    detail = json.loads(pending[0]["detail"])
    assert detail["count"] == 5
    assert detail["repeats_since_last_record"] == 4
    assert detail["first_seen"] == "2023-11-14T22:13:20.000000Z"
    assert tally.pending() == []


def test_tally_folds_keys_past_limit() -> None:
    tally = droplog.DropTally(max_keys=2)
    events = [tally.observe(droplog.Attempt("udp", "198.18.0.2", "198.18.5.5", port), "s", 1.0)
              for port in (1, 2, 3, 4)]

    assert [event is not None for event in events] == [True, True, True, False]
    assert events[2] is not None and events[2]["server"] == "*"


def test_tally_reports_lost_messages() -> None:
    tally = droplog.DropTally()
    tally.lost = 3

    [event] = tally.pending()

    assert json.loads(event["detail"])["lost_log_messages"] == 3


@needs_nft_root
def test_kernel_log_reaches_recorder() -> None:
    tag = secrets.token_hex(4)
    table = f"aptestlog_{tag}"
    recorder = droplog.DropRecorder(tag)
    events: list[dict[str, Any]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        script = (f"table inet {table} {{\n chain output {{\n"
                  "  type filter hook output priority 0; policy accept;\n"
                  f'  ip daddr 127.0.0.1 udp dport {port} log prefix "appliance {tag} test" '
                  f"group {recorder.group}\n }}\n}}\n")
        try:
            subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True,
                           capture_output=True)
            recorder.start("sess-droplog-test", events.append)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for _ in range(3):
                    sender.sendto(b"x", ("127.0.0.1", port))
            deadline = time.monotonic() + 10
            while not events and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], check=False,
                           capture_output=True)
            recorder.stop({"test": 3})

    dropped = [json.loads(event["detail"]) for event in events
               if event["kind"] == DROPPED]
    assert (dropped[0]["protocol"], dropped[0]["port"], dropped[0]["rule"]) == ("udp", port, "test")
    assert max(d["count"] for d in dropped) == 3
    assert events[-1]["kind"] == FIREWALL_COUNTERS
