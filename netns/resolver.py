"""The session's DNS resolver, built on scapy's DNS layer, on the host side of the veth.

The namespace's resolv.conf names the session's host-side address. The session's nftables
table redirects UDP and TCP sent to that address on port 53 to this resolver's port, and
rejects DNS to any other server. For each question the resolver

- answers A for a name the agent profile allows, from the configured `network.hosts`
  overrides, else the host's resolver (cached for `CACHE_SECONDS`), and the GCE metadata names
  with the metadata address;
- answers AAAA and other types of an allowed name with no records (IPv6 is off in the
  session), and every other name with NXDOMAIN, without asking anyone: a name that is not
  allowed never leaves the appliance, so it cannot carry data out;
- records a `dns_query` event (name, type, answer or refusal, and flags for names shaped like
  DNS tunnelling) and waits until it is durable before it answers. Exact repeats of a query
  (same client address, name, type and answer code) are counted instead: the running count is
  recorded every `FLUSH_SECONDS` and when the resolver stops.

It runs its own asyncio loop in a thread, so a flood of queries does not stall the proxy's
loop. Parsing and answering are pure functions (`parse_query`, `answer`, `tunnel_flags`).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from scapy.layers.dns import DNS, DNSQR, DNSRR, dnstypes

from appliance.errors import NetworkSetupError, RecordingFailed
from appliance.recordings.schema import DNS_QUERY

if TYPE_CHECKING:
    from appliance.context import SessionContext

logger = logging.getLogger(__name__)

METADATA_ADDRESS = "169.254.169.254"
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata"})
TTL_SECONDS = 60
CACHE_SECONDS = 30.0
LOOKUP_TIMEOUT_SECONDS = 3.0
FLUSH_SECONDS = 5.0
TCP_IDLE_SECONDS = 10.0
MAX_TRACKED_QUERIES = 10000
MAX_TCP_CLIENTS = 64

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED"}
TYPE_A, TYPE_AAAA = 1, 28


@dataclass(frozen=True)
class Query:
    """The parts of a DNS query the resolver acts on."""

    message: DNS
    name: str
    qtype: int

    @property
    def type_name(self) -> str:
        return str(dnstypes.get(self.qtype, str(self.qtype)))


@dataclass
class Answer:
    """The resolver's decision for one question."""

    rcode: int
    addresses: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.rcode == NOERROR


def normalise(raw: bytes) -> str:
    """Return a question name as recorded: lower case, no trailing dot, odd bytes escaped."""
    return raw.decode("ascii", "backslashreplace").rstrip(".").lower()


def parse_query(data: bytes) -> Query | str:
    """Parse a DNS query; return it, or a short description of why it is not one."""
    try:
        message = DNS(data)
    except Exception as error:  # noqa: BLE001 - scapy raises many types on malformed input.
        return f"malformed DNS message ({type(error).__name__})"
    if message.qr != 0:
        return "a DNS response, not a query"
    if not message.qd:
        return "a DNS query without a question"
    question = message.qd[0]
    return Query(message, normalise(bytes(question.qname)), int(question.qtype))


def response(query: Query, answer: Answer) -> bytes:
    """Build the wire response to `query` for `answer`."""
    records = [DNSRR(rrname=query.name + ".", type="A", ttl=TTL_SECONDS, rdata=address)
               for address in answer.addresses]
    message = DNS(id=query.message.id, qr=1, opcode=query.message.opcode, aa=1,
                  rd=query.message.rd, ra=1, rcode=answer.rcode,
                  qd=[DNSQR(qname=query.name + ".", qtype=query.qtype)], an=records)
    return bytes(message)


def error_response(data: bytes, rcode: int) -> bytes | None:
    """Build an error reply with `rcode` to an unparseable message, echoing its id if any."""
    if len(data) < 2:
        return None
    return struct.pack(">HHHHHH", struct.unpack_from(">H", data)[0], 0x8180 | rcode, 0, 0, 0, 0)


def tunnel_flags(name: str) -> list[str]:
    """Return why a name looks like DNS tunnelling or exfiltration (empty when it does not)."""
    flags = []
    labels = [label for label in name.split(".") if label]
    if len(name) > 100:
        flags.append("long_name")
    if any(len(label) > 40 for label in labels):
        flags.append("long_label")
    if len(labels) > 8:
        flags.append("many_labels")
    longest = max(labels, key=len, default="")
    if len(longest) >= 16 and _entropy(longest) > 3.5:
        flags.append("random_looking_label")
    if any(not (c.isascii() and (c.isalnum() or c in "-_")) for label in labels for c in label):
        flags.append("unusual_characters")
    return flags


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Repeat:
    first_seen: float
    last_seen: float
    count: int = 1
    recorded: int = 1
    detail: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)


class Resolver:
    """A DNS server whose sockets are bound at construction, so the firewall can name the
    port before the server starts."""

    def __init__(self, address: IPv4Address | str) -> None:
        self.address = str(address)
        self._udp, self._tcp = _bind_pair(self.address)
        self.port: int = self._udp.getsockname()[1]
        self.context: SessionContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._cache: dict[str, tuple[float, Answer]] = {}
        self._repeats: dict[tuple[str, str, int, int], _Repeat] = {}
        self._stop: asyncio.Event | None = None

    def start(self, context: SessionContext) -> None:
        """Serve the session's queries in a thread; raise NetworkSetupError if that fails."""
        self.context = context
        self._thread = threading.Thread(target=self._run, name=f"resolver-{context.tag}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None or not self._ready.is_set():
            raise NetworkSetupError(f"The session resolver on {self.address}:{self.port} did "
                                    f"not start: {self._failure or 'timed out'}.")
        logger.info("Session %s: resolver listening on %s:%d (UDP and TCP)",
                    context.session_id, self.address, self.port)

    def stop(self) -> None:
        """Record pending repeat counts, stop serving and close the sockets."""
        thread, self._thread = self._thread, None
        if thread is not None and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            thread.join(timeout=30)
            if thread.is_alive():
                logger.error("Session %s: the resolver did not stop within 30 s",
                             self.context.session_id if self.context else "?")
        self.close()

    def close(self) -> None:
        for sock in (self._udp, self._tcp):
            sock.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # Reported to start() or logged after start.
            self._failure = error
            self._ready.set()
            logger.exception("Session resolver on %s:%d failed", self.address, self.port)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self),
                                                           sock=self._udp)
        server = await asyncio.start_server(self._serve_tcp, sock=self._tcp,
                                            limit=65536 + 2)
        self._ready.set()
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            await self._stop.wait()
        finally:
            flusher.cancel()
            server.close()
            transport.close()
            await self._flush()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self._flush()

    async def _flush(self) -> None:
        for repeat in list(self._repeats.values()):
            if repeat.count <= repeat.recorded:
                continue
            detail = dict(repeat.detail, count=repeat.count,
                          repeats_since_last_record=repeat.count - repeat.recorded,
                          first_seen=_iso(repeat.first_seen), last_seen=_iso(repeat.last_seen))
            repeat.recorded = repeat.count
            await self._record(dict(repeat.columns, detail=json.dumps(detail, sort_keys=True)))

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_SECONDS)
                length = struct.unpack(">H", header)[0]
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_SECONDS)
                reply = await self.handle(data, peer, "tcp")
                if reply is None:
                    break
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handle(self, data: bytes, peer: tuple[str, int], transport: str) -> bytes | None:
        """Decide, record and build the reply for one DNS message from `peer`."""
        context = self.context
        assert context is not None
        parsed = parse_query(data)
        columns: dict[str, Any] = {"kind": DNS_QUERY, "client": f"{peer[0]}:{peer[1]}",
                                   "server": f"{context.proxy_address}:53"}
        if isinstance(parsed, str):
            detail = {"error": parsed, "transport": transport, "size": len(data),
                      "prefix_hex": data[:64].hex()}
            if not await self._record(dict(columns, detail=json.dumps(detail, sort_keys=True))):
                return error_response(data, SERVFAIL)
            return error_response(data, FORMERR)
        if parsed.message.opcode != 0:
            answer = Answer(NOTIMP, reason="only standard queries are answered")
        else:
            answer = await self.answer(parsed.name, parsed.qtype)
        columns.update(host=parsed.name, method=parsed.type_name)
        detail = {"name": parsed.name, "type": parsed.type_name,
                  "rcode": RCODE_NAMES.get(answer.rcode, str(answer.rcode)),
                  "answers": answer.addresses, "verdict": "answered" if answer.allowed
                  else "refused", "reason": answer.reason, "transport": transport}
        flags = tunnel_flags(parsed.name)
        if flags:
            detail["flags"] = flags
        if len(parsed.message.qd) > 1:
            detail["extra_questions"] = [normalise(bytes(q.qname)) for q in parsed.message.qd[1:]]
        key = (peer[0], parsed.name, parsed.qtype, answer.rcode)
        now = time.time()
        repeat = self._repeats.get(key)
        if repeat is not None:
            repeat.count += 1
            repeat.last_seen = now
        else:
            if len(self._repeats) < MAX_TRACKED_QUERIES:
                self._repeats[key] = _Repeat(now, now, detail=detail, columns=columns)
            recorded = await self._record(dict(columns, detail=json.dumps(
                dict(detail, count=1, first_seen=_iso(now)), sort_keys=True)))
            if not recorded:
                self._repeats.pop(key, None)
                return response(parsed, Answer(SERVFAIL, reason="recording failed"))
        if answer.addresses:
            context.dns_answers.setdefault(parsed.name, set()).update(answer.addresses)
        return response(parsed, answer)

    async def answer(self, name: str, qtype: int) -> Answer:
        """Decide the answer to one question, resolving allowed names when needed."""
        context = self.context
        assert context is not None
        if name in METADATA_NAMES:
            return Answer(NOERROR, [METADATA_ADDRESS] if qtype == TYPE_A else [],
                          "the GCE metadata emulator")
        if not context.profile.allows_host(name):
            return Answer(NXDOMAIN, reason=f"not in the allowlist of agent profile "
                                           f"{context.profile.name!r}")
        if qtype != TYPE_A:
            return Answer(NOERROR, reason="allowed name; only A records are served "
                                          "(IPv6 is off in the session)")
        if name in context.hosts:
            return Answer(NOERROR, [context.hosts[name]], "network.hosts override")
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        result = await self._lookup(name)
        self._cache[name] = (time.monotonic() + CACHE_SECONDS, result)
        return result

    async def _lookup(self, name: str) -> Answer:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(
                name, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
                LOOKUP_TIMEOUT_SECONDS)
        except TimeoutError:
            return Answer(SERVFAIL, reason="the host's resolver did not answer in time")
        except socket.gaierror as error:
            if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return Answer(NXDOMAIN, reason="the host's resolver knows no such name")
            return Answer(SERVFAIL, reason=f"the host's resolver failed: {error.strerror}")
        addresses = sorted({str(info[4][0]) for info in infos})
        return Answer(NOERROR, addresses, "host resolver")

    async def _record(self, event: dict[str, Any]) -> bool:
        context = self.context
        assert context is not None
        try:
            await context.journal.append(event)
        except RecordingFailed as error:
            logger.error("Session %s: DNS query not recorded, answering SERVFAIL: %s",
                         context.session_id, error)
            return False
        return True


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = await self.resolver.handle(data, addr, "udp")
        except Exception:
            logger.exception("The session resolver failed on a query from %s", addr[0])
            reply = error_response(data, SERVFAIL)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _bind_pair(address: str) -> tuple[socket.socket, socket.socket]:
    """Bind a UDP and a listening TCP socket to the same free port on `address`."""
    last: OSError | None = None
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((address, 0))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((address, udp.getsockname()[1]))
            tcp.listen(MAX_TCP_CLIENTS)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        except OSError as error:
            udp.close()
            tcp.close()
            last = error
    raise NetworkSetupError(f"The session resolver could not bind a UDP and TCP port on "
                            f"{address}: {last}.")
