"""Tests for the session resolver: real UDP and TCP sockets on loopback, a real journal.

Every name the tests ask about is either a `network.hosts` override or not allowlisted, so the
resolver never consults the host's own resolver and no query leaves this machine.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.dns import DNS, DNSQR

from appliance.context import SessionContext
from appliance.netns import resolver
from appliance.recordings import journal as journal_module
from appliance.recordings.journal import Journal
from appliance.recordings.schema import DNS_QUERY
from tests.addons.conftest import HOSTS

TUNNEL_NAME = ("nbswy3dpeb3w64tmmqqho33snrsce3dfnzsw45dflvzq." * 3) + "exfil.example"


@pytest.fixture
def served(context: SessionContext) -> Iterator[resolver.Resolver]:
    started = resolver.Resolver("127.0.0.1")
    try:
        started.start(context)
        yield started
    finally:
        started.stop()


def ask(server: resolver.Resolver, name: str, qtype: str = "A", transaction: int = 4242) -> DNS:
    query = bytes(DNS(id=transaction, rd=1, qd=DNSQR(qname=name, qtype=qtype)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(query, ("127.0.0.1", server.port))
        return DNS(udp.recv(4096))


def ask_tcp(server: resolver.Resolver, name: str) -> DNS:
    query = bytes(DNS(id=7, rd=1, qd=DNSQR(qname=name, qtype="A")))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as tcp:
        tcp.sendall(struct.pack(">H", len(query)) + query)
        length = struct.unpack(">H", tcp.recv(2))[0]
        data = b""
        while len(data) < length:
            data += tcp.recv(length - len(data))
    return DNS(data)


def recorded(journal: Journal, kind: str = DNS_QUERY) -> list[dict[str, Any]]:
    events = [event for event in journal_module.read(journal.path).events
              if event["kind"] == kind]
    for event in events:
        event["detail"] = json.loads(event["detail"])
    return events


def addresses(message: DNS) -> list[str]:
    return [str(record.rdata) for record in (message.an or [])]


@pytest.mark.parametrize("name, qtype, rcode, answer", [
    ("bigquery.googleapis.com", "A", resolver.NOERROR, [HOSTS["bigquery.googleapis.com"]]),
    ("BigQuery.GoogleAPIs.com.", "A", resolver.NOERROR, [HOSTS["bigquery.googleapis.com"]]),
    ("bigquery.googleapis.com", "AAAA", resolver.NOERROR, []),
    ("bigquery.googleapis.com", "TXT", resolver.NOERROR, []),
    ("metadata.google.internal", "A", resolver.NOERROR, [resolver.METADATA_ADDRESS]),
    ("blocked.test", "A", resolver.NXDOMAIN, []),
    ("dns.google", "A", resolver.NXDOMAIN, []),
    (TUNNEL_NAME, "TXT", resolver.NXDOMAIN, []),
])
def test_answer_by_allowlist(served: resolver.Resolver, name: str, qtype: str, rcode: int,
                             answer: list[str]) -> None:
    reply = ask(served, name, qtype)

    assert reply.rcode == rcode
    assert addresses(reply) == answer
    assert reply.id == 4242


def test_query_recorded_with_answer(served: resolver.Resolver, journal: Journal) -> None:
    ask(served, "bigquery.googleapis.com")

    events = recorded(journal)

    assert len(events) == 1
    assert events[0]["host"] == "bigquery.googleapis.com"
    assert events[0]["method"] == "A"
    assert events[0]["client"].startswith("127.0.0.1:")
    assert events[0]["detail"]["answers"] == [HOSTS["bigquery.googleapis.com"]]
    assert events[0]["detail"]["verdict"] == "answered"
    assert events[0]["detail"]["transport"] == "udp"


def test_refusal_recorded_with_reason(served: resolver.Resolver, journal: Journal) -> None:
    ask(served, "blocked.test")

    detail = recorded(journal)[0]["detail"]

    assert detail["rcode"] == "NXDOMAIN"
    assert detail["verdict"] == "refused"
    assert "not in the allowlist" in detail["reason"]


def test_tunnel_name_recorded_whole(served: resolver.Resolver, journal: Journal) -> None:
    ask(served, TUNNEL_NAME, "TXT")

    event = recorded(journal)[0]

    assert event["host"] == TUNNEL_NAME.lower()
    assert "long_name" in event["detail"]["flags"]
    assert "long_label" in event["detail"]["flags"]


def test_repeats_counted_not_flooded(served: resolver.Resolver, journal: Journal) -> None:
    for _ in range(5):
        ask(served, "blocked.test")

    assert len(recorded(journal)) == 1
    served.stop()
    events = recorded(journal)

    assert [event["detail"]["count"] for event in events] == [1, 5]
    assert events[1]["detail"]["repeats_since_last_record"] == 4


def test_distinct_names_each_recorded(served: resolver.Resolver, journal: Journal) -> None:
    for number in range(3):
        ask(served, f"chunk{number}.exfil.example")

    assert [event["host"] for event in recorded(journal)] == [
        "chunk0.exfil.example", "chunk1.exfil.example", "chunk2.exfil.example"]


def test_tcp_query_answered(served: resolver.Resolver, journal: Journal) -> None:
    reply = ask_tcp(served, "bigquery.googleapis.com")

    assert addresses(reply) == [HOSTS["bigquery.googleapis.com"]]
    assert recorded(journal)[0]["detail"]["transport"] == "tcp"


def test_malformed_message_recorded(served: resolver.Resolver, journal: Journal) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"\x12\x34\x01", ("127.0.0.1", served.port))
        reply = udp.recv(512)

    assert reply[:2] == b"\x12\x34"
    assert reply[3] & 0x0F == resolver.FORMERR
    assert "malformed" in recorded(journal)[0]["detail"]["error"]


def test_answers_shared_with_egress(served: resolver.Resolver,
                                    context: SessionContext) -> None:
    ask(served, "bigquery.googleapis.com")

    assert context.dns_answers == {"bigquery.googleapis.com": {HOSTS["bigquery.googleapis.com"]}}


def test_unrecordable_query_gets_servfail(served: resolver.Resolver, journal: Journal) -> None:
    journal.close()

    reply = ask(served, "bigquery.googleapis.com")

    assert reply.rcode == resolver.SERVFAIL
    assert addresses(reply) == []


@pytest.mark.parametrize("name, flags", [
    ("bigquery.googleapis.com", []),
    ("a" * 41 + ".example", ["long_label"]),
    ("q7x9k2m4p8w3z6v1.example", ["random_looking_label"]),
    (".".join(["a"] * 9), ["many_labels"]),
    ("bad_\\000name.example", ["unusual_characters"]),
    (TUNNEL_NAME.lower(), ["long_name", "long_label", "random_looking_label"]),
])
def test_tunnel_flags(name: str, flags: list[str]) -> None:
    assert resolver.tunnel_flags(name) == flags


def test_bound_port_shared_by_udp_and_tcp() -> None:
    created = resolver.Resolver("127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", created.port), timeout=5):
            pass
    finally:
        created.close()
