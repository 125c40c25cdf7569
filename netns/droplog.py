"""Record every packet the session's nftables table refuses, with repeats counted.

The table's rejecting rules log to an NFLOG group (`log group N`) that belongs to the session.
This module binds that group with a netlink socket and turns each logged packet into a
`dropped` event with protocol, source, destination, port, first seen, last seen and count.

NFLOG was chosen over sniffing the host-side veth because the kernel reports exactly the
packets the rules refused, after the policy decided, so this module never re-implements the
policy, and allowed traffic (all of the BigQuery data) is never copied to user space.

Repeats are aggregated per (protocol, destination, port): the first packet of a key is
recorded at once with count 1; later packets only raise the count, and every `FLUSH_SECONDS`
(and when the session ends) each key whose count grew is recorded again with its running
total, so `max(count)` per key is the number of packets. Past `MAX_KEYS` distinct keys, new
keys are folded into one key per protocol with destination `*`. When the kernel drops log
messages because this reader fell behind, the loss is counted and recorded; the rules' own
nft counters, recorded at the end as a `firewall_counters` event, stay exact.

The packet parsing is pure functions over bytes (`parse_messages`, `describe`), so it is
tested without a socket.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.errors import NetworkSetupError, RecordingFailed
from appliance.recordings.schema import DROPPED, FIREWALL_COUNTERS

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0
MAX_KEYS = 4096
RECEIVE_BUFFER = 4 * 1024 * 1024
GROUP_RANGE = (0x4000, 0xBFFF)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_TIMESTAMP = 3
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
COPY_RANGE = 512

_PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 58: "icmpv6", 132: "sctp"}
_IPV6_EXTENSIONS = frozenset({0, 43, 44, 60})


@dataclass(frozen=True)
class LoggedPacket:
    """One packet as NFLOG reported it: address family, rule prefix, payload from L3 on."""

    family: int
    prefix: str
    payload: bytes
    timestamp: float | None = None


@dataclass(frozen=True)
class Attempt:
    """The destination a rejected packet tried to reach, and its protocol."""

    protocol: str
    source: str
    destination: str
    port: int | None
    dns_name: str | None = None

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.protocol, self.destination, self.port)


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def parse_messages(data: bytes) -> list[LoggedPacket | int]:
    """Split one netlink datagram into logged packets, and errors as negative errno values."""
    found: list[LoggedPacket | int] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            break
        body = data[offset + 16:offset + length]
        if kind == NLMSG_ERROR and len(body) >= 4:
            found.append(struct.unpack_from("=i", body)[0])
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and len(body) >= 4:
            found.append(_packet(body[0], body[4:]))
        offset += (length + 3) & ~3
    return found


def _packet(family: int, attributes: bytes) -> LoggedPacket:
    prefix, payload, timestamp = "", b"", None
    for kind, value in _attributes(attributes):
        if kind == NFULA_PREFIX:
            prefix = value.split(b"\0", 1)[0].decode("ascii", "replace")
        elif kind == NFULA_PAYLOAD:
            payload = value
        elif kind == NFULA_TIMESTAMP and len(value) >= 16:
            seconds, microseconds = struct.unpack_from(">QQ", value)
            timestamp = seconds + microseconds / 1e6
    return LoggedPacket(family, prefix, payload, timestamp)


def describe(packet: LoggedPacket) -> Attempt | None:
    """Return the protocol, addresses and port of a logged IPv4 or IPv6 packet."""
    data = packet.payload
    if len(data) < 1:
        return None
    version = data[0] >> 4
    if version == 4 and len(data) >= 20:
        header = (data[0] & 0x0F) * 4
        protocol = data[9]
        source = socket.inet_ntop(socket.AF_INET, data[12:16])
        destination = socket.inet_ntop(socket.AF_INET, data[16:20])
        fragment_offset = struct.unpack_from(">H", data, 6)[0] & 0x1FFF
        transport = data[header:] if fragment_offset == 0 else b""
    elif version == 6 and len(data) >= 40:
        protocol = data[6]
        source = socket.inet_ntop(socket.AF_INET6, data[8:24])
        destination = socket.inet_ntop(socket.AF_INET6, data[24:40])
        transport = data[40:]
        while protocol in _IPV6_EXTENSIONS and len(transport) >= 8:
            protocol, transport = transport[0], transport[(transport[1] + 1) * 8:]
    else:
        return None
    name = _PROTOCOLS.get(protocol, f"ip-proto-{protocol}")
    if version == 6 and name != "icmpv6":
        name += "6"
    port = None
    dns_name = None
    if protocol in (6, 17, 132) and len(transport) >= 4:
        port = struct.unpack_from(">H", transport, 2)[0]
        if protocol == 17 and port == 53:
            dns_name = _dns_question(transport[8:])
    elif protocol in (1, 58) and len(transport) >= 2:
        port = None  # ICMP has types, not ports; the type goes into the protocol name.
        name += f"-type-{transport[0]}"
    return Attempt(name, source, destination, port, dns_name)


def _dns_question(message: bytes) -> str | None:
    """Return the first question name of a DNS query sent to a server that is not allowed."""
    try:
        from scapy.layers.dns import DNS

        parsed = DNS(message)
        if parsed.qd:
            return str(parsed.qd[0].qname.decode("ascii", "backslashreplace")).rstrip(".")
    except Exception:  # noqa: BLE001 - scapy raises many types; only the name is lost.
        return None
    return None


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Tally:
    attempt: Attempt
    first_seen: float
    last_seen: float
    count: int = 1
    recorded: int = 1
    rule: str = ""


class DropTally:
    """A per-key count of rejected attempts that decides which ones need a new record."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.keys: dict[tuple[str, str, int | None], _Tally] = {}
        self.lost = 0
        self.lost_recorded = 0

    def observe(self, attempt: Attempt, rule: str, now: float) -> dict[str, Any] | None:
        """Count `attempt`; return the event to record now when its key is new."""
        key = attempt.key
        if key not in self.keys and len(self.keys) >= self.max_keys:
            attempt = Attempt(attempt.protocol, attempt.source, "*", None)
            key = attempt.key
        tally = self.keys.get(key)
        if tally is not None:
            tally.count += 1
            tally.last_seen = now
            return None
        tally = _Tally(attempt, now, now, rule=rule)
        self.keys[key] = tally
        return _event(tally, attempt.dns_name)

    def pending(self) -> list[dict[str, Any]]:
        """Return an updated event for every key whose count grew since its last record."""
        events = []
        for tally in self.keys.values():
            if tally.count > tally.recorded:
                events.append(_event(tally, None, repeats=tally.count - tally.recorded))
                tally.recorded = tally.count
        if self.lost > self.lost_recorded:
            events.append({"kind": DROPPED, "detail": json.dumps({
                "lost_log_messages": self.lost,
                "note": "the kernel discarded log messages the recorder could not read in "
                        "time; the firewall_counters event has exact totals"})})
            self.lost_recorded = self.lost
        return events


def _event(tally: _Tally, dns_name: str | None, repeats: int | None = None) -> dict[str, Any]:
    attempt = tally.attempt
    detail: dict[str, Any] = {
        "protocol": attempt.protocol,
        "destination": attempt.destination,
        "port": attempt.port,
        "first_seen": _iso(tally.first_seen),
        "last_seen": _iso(tally.last_seen),
        "count": tally.count,
        "rule": tally.rule,
    }
    if repeats is not None:
        detail["repeats_since_last_record"] = repeats
    if dns_name is not None:
        detail["dns_name"] = dns_name
    server = attempt.destination if attempt.port is None else \
        (f"[{attempt.destination}]:{attempt.port}" if ":" in attempt.destination
         else f"{attempt.destination}:{attempt.port}")
    return {"kind": DROPPED, "client": attempt.source, "server": server, "host": dns_name,
            "method": attempt.protocol, "detail": json.dumps(detail, sort_keys=True)}


def _config_message(group: int, attributes: bytes, sequence: int) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", group) + attributes
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, sequence,
                       0) + body


def _attribute(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _request(sock: socket.socket, group: int, attributes: bytes, sequence: int) -> int:
    """Send one NFLOG config request and return its error code (0 on success)."""
    sock.send(_config_message(group, attributes, sequence))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 1)
        if not readable:
            continue
        for item in parse_messages(sock.recv(65536)):
            if isinstance(item, int):
                return item
    return -errno.ETIMEDOUT


def bind_group(tag: str) -> tuple[socket.socket, int]:
    """Open an NFLOG socket bound to a free group picked from the session tag.

    Raises NetworkSetupError when no group could be bound.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as error:
        raise NetworkSetupError(f"Opening an NFLOG netlink socket failed: {error.strerror}; "
                                "the kernel needs nfnetlink_log (CONFIG_NETFILTER_NETLINK_LOG)."
                                ) from error
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind((0, 0))
    low, high = GROUP_RANGE
    start = low + int(tag, 16) % (high - low)
    for attempt in range(64):
        group = low + (start - low + attempt) % (high - low)
        code = _request(sock, group, _attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
                        attempt * 2 + 1)
        if code in (-errno.EBUSY, -errno.EPERM, -errno.EEXIST):
            continue  # Another session has bound this group.
        if code != 0:
            sock.close()
            raise NetworkSetupError(f"Binding NFLOG group {group} failed: "
                                    f"{os.strerror(-code)}; check that nfnetlink_log is "
                                    "available (modprobe nfnetlink_log).")
        mode = struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0)
        # By default the kernel batches log messages for up to a second. With one message per
        # batch, nothing is left waiting in the kernel when the session stops reading.
        settings = _attribute(NFULA_CFG_MODE, mode) + \
            _attribute(NFULA_CFG_QTHRESH, struct.pack(">I", 1))
        code = _request(sock, group, settings, attempt * 2 + 2)
        if code != 0:
            sock.close()
            raise NetworkSetupError(f"Configuring NFLOG group {group} failed: "
                                    f"{os.strerror(-code)}.")
        return sock, group
    sock.close()
    raise NetworkSetupError("No free NFLOG group was found for the session's drop log; too "
                            "many sessions or other programs hold groups "
                            f"{GROUP_RANGE[0]}-{GROUP_RANGE[1]}.")


class DropRecorder:
    """Reads the session's NFLOG group in a thread and records refused attempts."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.sock, self.group = bind_group(tag)
        self.tally = DropTally()
        self._record: Callable[[dict[str, Any]], None] | None = None
        self._session_id = ""
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self, session_id: str, record: Callable[[dict[str, Any]], None]) -> None:
        """Start reading; `record` makes one event durable (it may block)."""
        self._session_id = session_id
        self._record = record
        self._thread = threading.Thread(target=self._loop, name=f"droplog-{self.tag}",
                                        daemon=True)
        self._thread.start()

    def stop(self, counters: dict[str, int] | None = None) -> None:
        """Record what is pending and the rules' counters, then close the socket."""
        self._stopping = True
        os.write(self._wake_write, b"x")
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                logger.error("Session %s: the drop recorder did not stop within 30 s",
                             self._session_id)
        if self._record is not None:
            self._drain()
            self._write_all(self.tally.pending())
            if counters:
                self._write_all([{"kind": FIREWALL_COUNTERS,
                                  "detail": json.dumps({"packets": counters,
                                                        "log_group": self.group},
                                                       sort_keys=True)}])
            self._record = None
        self.close()

    def close(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_read = self._wake_write = -1
        self.sock.close()

    def _loop(self) -> None:
        next_flush = time.monotonic() + FLUSH_SECONDS
        while not self._stopping:
            timeout = max(0.0, next_flush - time.monotonic())
            readable, _, _ = select.select([self.sock.fileno(), self._wake_read], [], [],
                                           timeout)
            if self.sock.fileno() in readable:
                try:
                    self._receive()
                except OSError as error:
                    logger.error("Session %s: reading the drop log failed: %s",
                                 self._session_id, error)
                    time.sleep(0.1)
            if time.monotonic() >= next_flush:
                self._write_all(self.tally.pending())
                next_flush = time.monotonic() + FLUSH_SECONDS

    def _drain(self) -> None:
        """Read whatever the kernel queued before the rules were removed."""
        while select.select([self.sock], [], [], 0)[0]:
            self._receive()

    def _receive(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                self.tally.lost += 1
                return
            raise
        events = []
        for item in parse_messages(data):
            if isinstance(item, int):
                continue
            attempt = describe(item)
            if attempt is None:
                continue
            rule = item.prefix.rsplit(" ", 1)[-1]
            event = self.tally.observe(attempt, rule, item.timestamp or time.time())
            if event is not None:
                events.append(event)
                logger.info("Session %s: dropped %s to %s", self._session_id,
                            attempt.protocol, event["server"])
        self._write_all(events)

    def _write_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if self._record is None:
                return
            try:
                self._record(event)
            except (RecordingFailed, TimeoutError) as error:
                logger.error("Session %s: recording a dropped packet failed: %s",
                             self._session_id, error)
