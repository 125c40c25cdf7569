"""The adversarial suite: an agent that tries every way around the recorder, and fails.

One session runs tests/e2e/agents/adversary.py as the agent's Unix user. It makes about forty
attempts: network escapes, DNS exfiltration, TLS tricks, reading secrets, changing the network,
signalling and tracing the appliance, setuid binaries. Then it waits while this module, as root
inside the session's namespace, sends scapy-crafted packets at the firewall. Finally it leaves
a grandchild and a delayed sleeper behind as it exits. The tests below each
check one attempt: that it failed, and that it is on record where the design puts it:

- refused TCP to anywhere: a `blocked` event from the proxy, with the process behind it;
- everything else on the wire: a `dropped` event from the firewall's log (repeats counted);
- DNS: a `dns_query` event from the session resolver;
- attempts on the machine itself (files, firewall, signals, privileges) leave no event of
  their own. What shows them is that the session's record is complete and untouched.

Every client call in the agent has a 5 s timeout, so a hang shows as a TimeoutError, which no
test accepts as a refusal.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cloud import Cloud
from tests.e2e.conftest import AGENT_USER, Appliance, leftovers, write_config

pytestmark = pytest.mark.e2e

AGENT_SCRIPT = Path(__file__).resolve().parent / "agents" / "adversary.py"
PROXY_PORT = 15001
SLEEPER_DELAY = 2.0
TUNNEL_CHUNKS = [f"{secrets.token_hex(24)}" for _ in range(4)]

ROOT_PROBE = """
import json, sys
from scapy.all import DNS, DNSQR, ICMP, IP, TCP, UDP, Ether, IPv6, conf, send, sendp, sr1
conf.verb = 0
args = json.loads(sys.argv[1])
out = {}
send(IP(dst=args["echo"]) / ICMP(), count=3)
send(IP(dst=args["echo"], proto=47) / b"gre-probe")
send(IP(dst=args["echo"]) / UDP(sport=40000, dport=4444) / b"flood", count=50)
answer = sr1(IP(dst=args["host"]) / TCP(sport=41000, dport=args["proxy_port"], flags="S"),
             timeout=3)
out["proxy_syn_answer"] = answer[TCP].sprintf("%TCP.flags%") if answer and TCP in answer else None
reply = sr1(IP(dst=args["host"]) / UDP(sport=41001, dport=53)
            / DNS(rd=1, qd=DNSQR(qname="bigquery.googleapis.com")), timeout=3)
out["dns_answer"] = [str(r.rdata) for r in reply[DNS].an] if reply and DNS in reply else None
sendp(Ether(dst=args["host_mac"]) / IPv6(src="fe80::2", dst="ff02::1")
      / UDP(sport=5353, dport=5353) / b"v6-probe", iface=args["link"])
print(json.dumps(out))
"""


@dataclass
class Attack:
    """What the adversary's session produced."""

    session_id: str
    results: dict[str, dict[str, Any]]
    root: dict[str, Any]
    events: list[dict[str, Any]]
    exit_code: int
    stderr: str
    handoff: dict[str, Any]
    ipv6_on_host_link: bool
    leftovers: list[str]
    sleeper_marker_written: bool
    lurker_status: int | None
    session: dict[str, Any] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["kind"] == kind]


def _read_until(stream: Any, marker: str, deadline: float) -> list[str]:
    """Read lines from a pipe until one equals or starts with `marker`, or raise."""
    lines: list[str] = []
    buffer = b""
    fd = stream.fileno()
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if lines[-1].startswith(marker):
                return lines
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line {marker!r} before the deadline; got {lines}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stream closed before {marker!r}; got {lines}")
            buffer += chunk


def _credential_files(config_path: Path) -> list[str]:
    document = yaml.safe_load(config_path.read_text())
    files = []
    for profile in (document.get("agents") or {}).values():
        credentials = (profile or {}).get("credentials") or {}
        if credentials.get("file"):
            files.append(str(credentials["file"]))
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        files.append(os.environ["GOOGLE_APPLICATION_CREDENTIALS"])
    return files


def _session_leftovers(tag: str, workspace: Path) -> list[str]:
    """List what this session left: its kernel objects, and processes working in `workspace`.

    Other test runs on the machine may have sessions and agent processes of their own, so only
    objects named after this session's tag and processes started from this workspace count.
    """
    found = [item for item in leftovers() if tag in item and not item.startswith("process ")]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(workspace):
                found.append(f"process {entry.name} {(entry / 'cmdline').read_bytes()!r}")
        except OSError:
            continue
    return found


def _probe_as_root(namespace: str, tag: str, cloud: Cloud, host: str) -> dict[str, Any]:
    host_link = f"ap-{tag}-h"
    args = {"echo": cloud.echo_address, "host": host, "proxy_port": PROXY_PORT,
            "host_mac": Path(f"/sys/class/net/{host_link}/address").read_text().strip(),
            "link": f"ap-{tag}-n"}
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", ROOT_PROBE,
                             json.dumps(args)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    probe: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


@pytest.fixture(scope="module")
def attack(cloud: Cloud, agent_python: str, shared_dirs: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    base = tmp_path_factory.mktemp("adversarial")
    workspace = Path(tempfile.mkdtemp(prefix="appliance-agent-", dir="/tmp"))
    workspace.chmod(0o755)
    marker = Path(tempfile.gettempdir()) / f"appliance-sleeper-{secrets.token_hex(6)}"
    config_path, store = base / "appliance.yaml", base / "store"
    write_config(config_path, cloud, store, shared_dirs)
    document = yaml.safe_load(config_path.read_text())
    appliance = Appliance(config_path, store, agent_python, workspace)
    shutil.copy(AGENT_SCRIPT, workspace / "adversary.py")
    (workspace / "adversary.py").chmod(0o644)
    # A credential file whose mode lets anyone read it: only the sandbox's covering stops the
    # agent. The appliance's profile names its own key, so it never reads this one.
    decoy = workspace / "decoy" / "application-default-credentials.json"
    decoy.parent.mkdir(mode=0o755)
    decoy.write_text('{"type": "decoy", "secret": "must-not-leak"}\n')
    decoy.chmod(0o644)
    previous = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(decoy)
    try:
        process = appliance.start_agent("python adversary.py")
    finally:
        if previous is None:
            del os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
        else:
            os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = previous
    lurker: subprocess.Popen[bytes] | None = None
    try:
        handoff = {
            "appliance_pid": process.pid,
            "rest_address": cloud.rest_address,
            "echo_address": cloud.echo_address,
            "echo_plain_port": cloud.echo_plain_port,
            "proxy_port": PROXY_PORT,
            "store": str(store),
            "ca_key": str(shared_dirs["ca"] / "mitmproxy-ca.pem"),
            "signing_key": str(document["store"].get("signing_key",
                                                     "/etc/appliance/signing-key.pem")),
            "credential_files": [*_credential_files(config_path), str(decoy)],
            "tunnel_chunks": TUNNEL_CHUNKS,
            "sleeper_delay": SLEEPER_DELAY,
            "sleeper_marker": str(marker),
            "sleeper_path": f"after-exit-{marker.name}",
        }
        (workspace / "handoff.json").write_text(json.dumps(handoff))
        (workspace / "handoff.json").chmod(0o644)
        deadline = time.monotonic() + 120
        assert process.stderr is not None and process.stdout is not None
        started = _read_until(process.stderr, "appliance: session ", deadline)[-1]
        session_id = started.split()[2]
        tag = session_id.rsplit("-", 1)[-1]
        lines = _read_until(process.stdout, "READY", deadline)
        results = json.loads(next(line for line in lines if line.startswith("RESULTS "))[8:])
        host = subprocess.run(["ip", "-o", "-4", "addr", "show", f"ap-{tag}-h"],
                              capture_output=True, text=True, check=True).stdout.split()[3]
        host = host.split("/")[0]
        handoff["host"] = host
        ipv6_on = Path(f"/proc/sys/net/ipv6/conf/ap-{tag}-h/disable_ipv6").read_text().strip() \
            == "0"
        root = _probe_as_root(f"ap-{tag}", tag, cloud, host)
        # A root process that entered the network namespace from outside the sandbox.
        lurker = subprocess.Popen(["ip", "netns", "exec", f"ap-{tag}", "sleep", "300"])
        (workspace / "release").write_text("go\n")
        _, stderr = process.communicate(timeout=120)
        try:
            lurker_status: int | None = lurker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            lurker_status = None
        time.sleep(SLEEPER_DELAY + 2)  # Long enough for a surviving sleeper to have acted.
        remaining = _session_leftovers(tag, workspace)
        events = appliance.query(f"SELECT * FROM events WHERE session_id = '{session_id}' "
                                 "ORDER BY seq")
        for event in events:
            event["detail"] = json.loads(str(event["detail"])) if event["detail"] else {}
        sessions = appliance.query(f"SELECT * FROM sessions WHERE session_id = '{session_id}'")
        yield Attack(session_id, results, root, events, process.returncode, stderr, handoff,
                     ipv6_on, remaining, marker.exists(), lurker_status,
                     sessions[0] if sessions else {})
    finally:
        if lurker is not None and lurker.poll() is None:
            lurker.kill()
            lurker.wait()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        marker.unlink(missing_ok=True)
        shutil.rmtree(workspace, ignore_errors=True)


# Predicates over one attempt's outcome.

def refused_with(status: int, *also: int) -> Callable[[dict[str, Any]], bool]:
    return lambda outcome: outcome.get("status") in (status, *also)


def failed_with(*names: str) -> Callable[[dict[str, Any]], bool]:
    return lambda outcome: not outcome["ok"] and outcome["error"] in names


def os_error(*numbers: int) -> Callable[[dict[str, Any]], bool]:
    return lambda outcome: not outcome["ok"] and outcome.get("errno") in numbers


def no_reply(outcome: dict[str, Any]) -> bool:
    """Check that a datagram got an ICMP rejection or no reply, never a response."""
    return not outcome["ok"] and outcome["error"] in ("ConnectionRefusedError", "OSError",
                                                       "TimeoutError")


def dns_refused_over_tcp(outcome: dict[str, Any]) -> bool:
    """A DNS-over-TCP reply without answers and with an error code, or a closed connection."""
    if failed_with("ConnectionResetError")(outcome) or outcome.get("received") == "":
        return True
    message = bytes.fromhex(outcome.get("received", ""))[2:]
    return len(message) >= 12 and message[3] & 0x0F != 0 and message[6:8] == b"\0\0"


def nothing_read(outcome: dict[str, Any]) -> bool:
    """A file the agent could not read, or that showed as empty because it is covered."""
    return not outcome["ok"] or outcome.get("bytes") == 0


# Predicates over the session's events.

def blocked(server: str | None = None, host: str | None = None,
            reason: str | None = None, method: str | None = None) -> Callable[[Attack], bool]:
    def check(attack: Attack) -> bool:
        return any((server is None or event["server"] == server)
                   and (host is None or event["host"] == host)
                   and (reason is None or reason in str(event["detail"].get("reason")))
                   and (method is None or event["detail"].get("method") == method
                        or event["method"] == method)
                   for event in attack.of_kind("blocked"))
    return check


def dropped(protocol: str, server: str, rule: str | None = None,
            dns_name: str | None = None) -> Callable[[Attack], bool]:
    def check(attack: Attack) -> bool:
        return any(event["server"] == server and event["detail"].get("protocol") == protocol
                   and (rule is None or event["detail"].get("rule") == rule)
                   and (dns_name is None or event["detail"].get("dns_name") == dns_name)
                   for event in attack.of_kind("dropped"))
    return check


def dns_refused(name: str) -> Callable[[Attack], bool]:
    return lambda attack: any(event["host"] == name and event["detail"].get("rcode") == "NXDOMAIN"
                              for event in attack.of_kind("dns_query"))


def tunnel_names_recorded(attack: Attack) -> bool:
    flagged = {event["host"] for event in attack.of_kind("dns_query")
               if "random_looking_label" in event["detail"].get("flags", [])}
    return all(f"{chunk}.t.exfil.example" in flagged for chunk in TUNNEL_CHUNKS)


def _address(attack: Attack, key: str, port: int) -> str:
    return f"{attack.handoff[key]}:{port}"


# name -> (how the attempt must fail, where it must be recorded). Addresses are filled in from
# the session by `server` callables, since the cloud's subnet is chosen per run.
NETWORK_ATTEMPTS: dict[str, tuple[Callable[[dict[str, Any]], bool],
                                  Callable[[Attack], Callable[[Attack], bool]]]] = {
    "tls_upstream_other_port": (refused_with(403), lambda a: blocked(
        _address(a, "rest_address", 8443), reason="port 8443 is not allowed")),
    "plain_upstream_other_port": (refused_with(403), lambda a: blocked(
        _address(a, "rest_address", 9000), reason="no TLS server name")),
    "quic_udp_443": (no_reply, lambda a: dropped("udp", _address(a, "rest_address", 443))),
    "dns_udp_outside_resolver": (no_reply, lambda a: dropped(
        "udp", _address(a, "echo_address", 53), dns_name="outside-probe.exfil.example")),
    "dns_tcp_outside_resolver": (dns_refused_over_tcp, lambda a: blocked(
        _address(a, "echo_address", 53), host="outside-tcp.exfil.example")),
    "dns_tunnel_names": (failed_with("RuntimeError"), lambda a: tunnel_names_recorded),
    "dns_refused_name": (failed_with("gaierror"), lambda a: dns_refused("dns.test")),
    "dns_over_https": (refused_with(403), lambda a: blocked(host="dns.test",
                                                            reason="not in the allowlist")),
    "https_not_allowlisted": (refused_with(403), lambda a: blocked(
        host="blocked.test", reason="not in the allowlist")),
    "tls_without_sni": (refused_with(403), lambda a: blocked(reason="no TLS server name (SNI)")),
    "sni_host_mismatch": (refused_with(403), lambda a: blocked(
        reason="HTTP Host 'blocked.test' does not match TLS server name 'example.test'")),
    "absolute_form_mismatch": (refused_with(403), lambda a: blocked(
        reason="request authority 'blocked.test' does not match")),
    "connect_plain": (refused_with(400, 403), lambda a: blocked(
        _address(a, "echo_address", a.handoff["echo_plain_port"]), method="CONNECT")),
    "connect_in_tls": (refused_with(400, 403), lambda a: blocked(
        _address(a, "echo_address", 443), method="CONNECT")),
    "proxy_port_direct": (failed_with("ConnectionRefusedError"),
                          lambda a: dropped("tcp", f"{a.handoff['host']}:{PROXY_PORT}", "input")),
    "proxy_loop_by_sni": (refused_with(403), lambda a: blocked(reason="is the appliance itself")),
    "udp_to_resolver_other_port": (no_reply, lambda a: dropped(
        "udp", f"{a.handoff['host']}:5353", "screen")),
    "subprocess_not_allowlisted": (refused_with(403), lambda a: blocked(host="blocked.test")),
}

# Attempts that never reach the wire: the kernel refuses them inside the session.
LOCAL_NETWORK_ATTEMPTS = {
    "ipv6_tcp": os_error(errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT),
    "raw_socket": os_error(errno.EPERM),
    "packet_socket": os_error(errno.EPERM),
    "icmp_datagram_socket": os_error(errno.EPERM, errno.EACCES),
}

MACHINE_ATTEMPTS = {
    "read_store": failed_with("PermissionError"),
    "read_catalog": failed_with("PermissionError", "FileNotFoundError"),
    "read_ca_key": nothing_read,
    "read_signing_key": nothing_read,
    "append_to_journal": failed_with("PermissionError", "FileNotFoundError"),
    "create_journal_file": failed_with("PermissionError", "FileNotFoundError"),
    "nft_list_ruleset": failed_with("RuntimeError"),
    "nft_add_table": failed_with("RuntimeError"),
    "ip_route_add": failed_with("RuntimeError"),
    "ip_route_delete_default": failed_with("RuntimeError"),
    "ip_addr_add": failed_with("RuntimeError"),
    "signal_appliance": failed_with("ProcessLookupError", "PermissionError"),
    "probe_appliance": failed_with("ProcessLookupError", "PermissionError"),
    "signal_sandbox_init": failed_with("PermissionError"),
    "ptrace_appliance": os_error(errno.ESRCH, errno.EPERM),
    "ptrace_sandbox_init": os_error(errno.EPERM),
    "read_init_environment": failed_with("PermissionError"),
}

SETUID_BINARIES = ("sudo", "su", "ping")


@pytest.mark.parametrize("name", sorted(NETWORK_ATTEMPTS))
def test_network_attempt_fails(attack: Attack, name: str) -> None:
    must_fail, _ = NETWORK_ATTEMPTS[name]
    assert must_fail(attack.results[name]), attack.results[name]


@pytest.mark.parametrize("name", sorted(NETWORK_ATTEMPTS))
def test_network_attempt_recorded(attack: Attack, name: str) -> None:
    _, where = NETWORK_ATTEMPTS[name]
    assert where(attack)(attack), [e for e in attack.events
                                   if e["kind"] in ("blocked", "dropped", "dns_query")]


@pytest.mark.parametrize("name", sorted(LOCAL_NETWORK_ATTEMPTS))
def test_kernel_refuses_socket(attack: Attack, name: str) -> None:
    assert LOCAL_NETWORK_ATTEMPTS[name](attack.results[name]), attack.results[name]


@pytest.mark.parametrize("name", sorted(MACHINE_ATTEMPTS))
def test_machine_attempt_fails(attack: Attack, name: str) -> None:
    assert MACHINE_ATTEMPTS[name](attack.results[name]), attack.results[name]


def test_credential_files_unreadable(attack: Attack) -> None:
    names = [name for name in attack.results if name.startswith("read_credential_file_")]

    assert all(nothing_read(attack.results[name]) for name in names), \
        {name: attack.results[name] for name in names}


def test_world_readable_secret_covered(attack: Attack) -> None:
    index = len(attack.handoff["credential_files"]) - 1

    outcome = attack.results[f"read_credential_file_{index}"]

    assert outcome.get("bytes") == 0, outcome


def test_root_process_in_namespace_killed(attack: Attack) -> None:
    assert attack.lurker_status == -signal.SIGKILL


@pytest.mark.parametrize("binary", SETUID_BINARIES)
def test_setuid_binary_gains_nothing(attack: Attack, binary: str) -> None:
    outcome = attack.results[f"setuid_{binary}"]
    if outcome.get("not_installed"):
        pytest.skip(f"{binary} is not installed on this machine")
    assert failed_with("RuntimeError")(outcome), outcome


def test_blocked_connections_never_hang(attack: Attack) -> None:
    slow = {name: outcome for name, outcome in attack.results.items()
            if outcome.get("error") == "TimeoutError" and name in NETWORK_ATTEMPTS
            and NETWORK_ATTEMPTS[name][0] is not no_reply}
    assert slow == {}


def test_refusal_names_process(attack: Attack) -> None:
    event = next(e for e in attack.of_kind("blocked") if e["host"] == "blocked.test"
                 and e["path"] == "/secret")
    process = event["detail"]["process"]

    assert "adversary.py" in process["cmdline"]
    assert process["executable"].startswith("/usr/bin/python3")
    assert process["ns_pid"] != process["pid"]


def test_subprocess_refusal_names_parent_chain(attack: Attack) -> None:
    event = next(e for e in attack.of_kind("blocked") if e["path"] == "/from-child")
    process = event["detail"]["process"]

    assert "child-marker" in process["cmdline"]
    assert any("adversary.py" in parent["cmdline"] for parent in process["chain"])


def test_quic_repeats_counted(attack: Attack) -> None:
    echo_flood = _address(attack, "echo_address", 4444)
    counts = [e["detail"]["count"] for e in attack.of_kind("dropped")
              if e["server"] == echo_flood]

    assert max(counts) == 50, [(e["kind"], e["server"], e["detail"]) for e in attack.events
                               if e["kind"] in ("dropped", "firewall_counters")]
    assert len(counts) <= 3


@pytest.mark.parametrize("protocol", ["icmp-type-8", "gre"])
def test_root_crafted_packet_dropped(attack: Attack, protocol: str) -> None:
    assert any(e["detail"].get("protocol") == protocol
               and e["detail"]["destination"] == attack.handoff["echo_address"]
               for e in attack.of_kind("dropped"))


def test_root_syn_to_proxy_reset(attack: Attack) -> None:
    assert "R" in str(attack.root["proxy_syn_answer"])


def test_root_dns_to_resolver_answered(attack: Attack) -> None:
    assert attack.root["dns_answer"] == [attack.handoff["rest_address"]], attack.stderr


def test_ipv6_frame_dropped_and_recorded(attack: Attack) -> None:
    if not attack.ipv6_on_host_link:
        pytest.skip("IPv6 is off on the host side of the veth, so the kernel discards IPv6 "
                    "before the firewall sees it")
    assert dropped("udp6", "[ff02::1]:5353", "screen")(attack), [
        (e["server"], e["detail"]) for e in attack.of_kind("dropped")]


def test_firewall_counters_recorded(attack: Attack) -> None:
    [event] = attack.of_kind("firewall_counters")

    assert event["detail"]["packets"]["screen-other"] >= 55


def test_grandchild_killed_at_exit(attack: Attack) -> None:
    assert attack.leftovers == []


def test_sleeper_never_acts_after_exit(attack: Attack) -> None:
    assert attack.sleeper_marker_written is False


def test_sleeper_request_never_recorded(attack: Attack) -> None:
    assert not any(attack.handoff["sleeper_path"] in str(e["path"]) for e in attack.events)


def test_session_completed_despite_attack(attack: Attack) -> None:
    assert attack.exit_code == 0, attack.stderr
    assert attack.session["status"] == "completed"


def test_journal_holds_no_forged_line(attack: Attack) -> None:
    assert not any(e["kind"] == "forged" for e in attack.events)
    assert [e["seq"] for e in attack.events] == list(range(len(attack.events)))


def test_agent_user_runs_attacks(attack: Attack) -> None:
    event = next(e for e in attack.of_kind("blocked") if e["detail"].get("process"))

    assert event["detail"]["process"]["uid"] == int(
        subprocess.run(["id", "-u", AGENT_USER], capture_output=True, text=True,
                       check=True).stdout)
