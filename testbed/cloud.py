"""The testbed cloud: a BigQuery-compatible upstream in its own network namespace.

`Cloud` creates a network namespace `apcloud-XXXX`, links it to the host with a veth pair,
issues a test CA and a server certificate for the Google host names, and starts inside the
namespace:

- local-bigquery's REST API over TLS on the REST address, port 443 (testbed/upstream_server.py,
  run by the upstream venv's Python),
- its BigQuery Storage gRPC API over TLS on the Storage address, port 443,
- in front of it, testbed/storage_write_server.py on the Storage address, port 443: it serves
  the Storage Write API in memory and relays every other method (the Read API) to
  local-bigquery's gRPC API, which then listens on port STORAGE_READ_PORT, so that clients
  reach both APIs at bigquerystorage.googleapis.com:443 as they do at Google,
- stub Google token endpoints over TLS on the token address, port 443,
- an echo server over TLS on the echo address, port 443, and plain HTTP on port 8080.

It needs root, the standard library, `cryptography` and `pyroute2`. Run it as a demo with:

    python -m testbed.cloud --workdir DIR --upstream-python PATH

which prints the host names, addresses and CA file as JSON and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyroute2 import IPRoute, NetlinkError, netns

from testbed import identities

PREFIX = "apcloud"
DEFAULT_SUBNET = "198.19.0.0/24"
ALLOWED_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
DEFAULT_PROJECT = "demo-project"
UPSTREAM_PYTHON_ENV = "APPLIANCE_UPSTREAM_PYTHON"
LOCK_FILE = f"/run/{PREFIX}.lock"
ECHO_PLAIN_PORT = 8080
TLS_PORT = 443
# local-bigquery's Storage Read API, behind the router of testbed/storage_write_server.py.
STORAGE_READ_PORT = 4431
HERE = Path(__file__).resolve().parent

# Host offsets inside the subnet: .1 is the host side of the link, .2 the namespace side.
HOST_OFFSET, NAMESPACE_OFFSET = 1, 2
REST_OFFSET, STORAGE_OFFSET, TOKEN_OFFSET, ECHO_OFFSET = 10, 11, 12, 20
SERVICE_HOSTS = {
    "bigquery.googleapis.com": REST_OFFSET,
    "www.googleapis.com": REST_OFFSET,
    "bigquerystorage.googleapis.com": STORAGE_OFFSET,
    "oauth2.googleapis.com": TOKEN_OFFSET,
    "sts.googleapis.com": TOKEN_OFFSET,
    "iamcredentials.googleapis.com": TOKEN_OFFSET,
    "example.test": ECHO_OFFSET,
}


class CloudError(RuntimeError):
    """The testbed cloud could not be set up."""


@contextlib.contextmanager
def _pyroute2_forks() -> Iterator[None]:
    """Silence Python's fork warning for pyroute2's namespace helpers.

    pyroute2 forks a child that only calls unshare(2), setns(2) and mount(2) through libc,
    which is safe in a multi-threaded process such as pytest with gRPC loaded.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        yield


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def make_certificates(
    directory: Path, names: list[str], addresses: list[str], days: int = 30
) -> tuple[Path, Path, Path]:
    """Write a test CA and a server certificate for names and addresses into directory.

    Returns the paths of the CA certificate, the server certificate and the server key.
    """
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bq-session-appliance testbed"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{PREFIX} test CA {secrets.token_hex(4)}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
    )
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    _write_private(
        directory / "ca-key.pem",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    cert_file.write_bytes(server_cert.public_bytes(pem))
    _write_private(
        key_file,
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return ca_file, cert_file, key_file


class Cloud:
    """A BigQuery-compatible upstream reachable over TLS from the host namespace.

    Use it as a context manager. On exit, also after an exception, it stops its servers and
    deletes its veth pair and namespace. `subnet` must be a free /27 or larger network inside
    198.18.0.0/15, so two clouds can run at once with different subnets.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_python: str | None = None,
        *,
        subnet: str = DEFAULT_SUBNET,
        project: str = DEFAULT_PROJECT,
        startup_timeout: float = 60.0,
        verify_tokens: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        python = upstream_python or os.environ.get(UPSTREAM_PYTHON_ENV)
        if not python:
            raise CloudError(
                f"missing upstream Python: pass upstream_python or set {UPSTREAM_PYTHON_ENV} "
                "to the python of the venv that has testbed/requirements-upstream.txt"
            )
        self.upstream_python = python

        try:
            network = ipaddress.ip_network(subnet)
        except ValueError:
            network = None
        if (
            not isinstance(network, ipaddress.IPv4Network)
            or not network.subnet_of(ALLOWED_RANGE)
            or network.prefixlen > 27
        ):
            raise CloudError(
                f"invalid subnet {subnet!r}: use a /27 or larger network inside "
                f"{ALLOWED_RANGE}, for example {DEFAULT_SUBNET}"
            )
        self.subnet = network
        self.project = project
        self.startup_timeout = startup_timeout
        # With verify_tokens the upstream accepts only tokens the stub token services issued.
        self.verify_tokens = verify_tokens
        self.identities: identities.Identities | None = None

        suffix = secrets.token_hex(2)
        self.namespace = f"{PREFIX}-{suffix}"
        self.host_interface = f"{PREFIX}-{suffix}-h"
        self.namespace_interface = f"{PREFIX}-{suffix}-c"

        self.host_address = str(self.subnet[HOST_OFFSET])
        self.namespace_address = str(self.subnet[NAMESPACE_OFFSET])
        self.rest_address = str(self.subnet[REST_OFFSET])
        self.storage_address = str(self.subnet[STORAGE_OFFSET])
        self.token_address = str(self.subnet[TOKEN_OFFSET])
        self.echo_address = str(self.subnet[ECHO_OFFSET])
        self.echo_plain_port = ECHO_PLAIN_PORT
        self.hosts = {name: str(self.subnet[offset]) for name, offset in SERVICE_HOSTS.items()}

        self.ca_file = self.workdir / "tls" / "ca.pem"
        self.cert_file = self.workdir / "tls" / "server.pem"
        self.key_file = self.workdir / "tls" / "server-key.pem"
        self.log_dir = self.workdir / "logs"
        # Every access token the stub token services issued, one per line (tests search for
        # them where none may appear).
        self.issued_tokens_file = self.log_dir / "issued-tokens"
        # What the Storage Write server received: one JSON line per append, commit, finalize.
        self.storage_write_log = self.workdir / "storage-write" / "received.jsonl"
        self.startup_seconds: float | None = None

        self._namespace_created = False
        self._namespace_fd: int | None = None
        self._link_created = False
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # Context manager.

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Lifecycle.

    def start(self) -> None:
        """Create the namespace, link and certificates, start the servers and wait for them."""
        started = time.monotonic()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.log_dir.mkdir(exist_ok=True)
            with self._host_lock():
                self._check_subnet_free()
                self._create_network()
            make_certificates(
                self.ca_file.parent,
                [*SERVICE_HOSTS, "*.googleapis.com"],
                sorted(set(self.hosts.values())),
            )
            self.identities = identities.create(self.workdir / "identities", self.project)
            self._start_servers()
            self._wait_ready(started + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop the servers and remove the link and namespace. Safe to call more than once."""
        errors: list[str] = []
        for name, process in list(self._processes.items()):
            try:
                self._terminate(process)
            except OSError as error:
                errors.append(f"stopping {name} (pid {process.pid}): {error}")
            self._processes.pop(name)
        if self._link_created:
            try:
                with IPRoute() as ipr:
                    if ipr.link_lookup(ifname=self.host_interface):
                        ipr.link("del", ifname=self.host_interface)
                self._link_created = False
            except (OSError, NetlinkError) as error:
                errors.append(f"deleting link {self.host_interface}: {error}")
        if self._namespace_fd is not None:
            os.close(self._namespace_fd)
            self._namespace_fd = None
        if self._namespace_created:
            try:
                if self.namespace in netns.listnetns():
                    netns.remove(self.namespace)
                self._namespace_created = False
            except (OSError, NetlinkError) as error:
                errors.append(f"removing namespace {self.namespace}: {error}")
        if errors:
            raise CloudError("testbed cloud teardown failed: " + "; ".join(errors))

    # Convenience for clients.

    def client_env(self) -> dict[str, str]:
        """Return environment variables that make Python, gRPC and curl clients trust the CA."""
        ca = str(self.ca_file)
        return {
            "REQUESTS_CA_BUNDLE": ca,
            "SSL_CERT_FILE": ca,
            "CURL_CA_BUNDLE": ca,
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": ca,
        }

    def describe(self) -> dict[str, object]:
        """Return what a client needs to reach the cloud, as JSON-ready data."""
        return {
            "namespace": self.namespace,
            "project": self.project,
            "hosts": self.hosts,
            "host_address": self.host_address,
            "ca_file": str(self.ca_file),
            "echo_plain_port": self.echo_plain_port,
            "log_dir": str(self.log_dir),
            "startup_seconds": self.startup_seconds,
        }

    def log_tail(self, name: str, lines: int = 30) -> str:
        """Return the last lines of a server's log ("upstream" or "stubs")."""
        path = self.log_dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return f"(no log at {path})"
        return "\n".join(text.splitlines()[-lines:])

    # Internals.

    @staticmethod
    @contextlib.contextmanager
    def _host_lock() -> Iterator[None]:
        """Serialise subnet checks and link setup between clouds started at the same time."""
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_subnet_free(self) -> None:
        with IPRoute() as ipr:
            for message in ipr.get_addr(family=socket.AF_INET):
                address = ipaddress.ip_address(message.get_attr("IFA_ADDRESS"))
                if address in self.subnet:
                    ifname = ipr.get_links(message["index"])[0].get_attr("IFLA_IFNAME")
                    raise CloudError(
                        f"subnet {self.subnet} is already in use: {address} is on interface "
                        f"{ifname}; stop the other cloud or pass another subnet, e.g. "
                        "198.19.1.0/24"
                    )

    def _create_network(self) -> None:
        with _pyroute2_forks():
            netns.create(self.namespace)
        self._namespace_created = True
        # The servers enter the namespace through this descriptor, not its name.
        self._namespace_fd = os.open(f"/run/netns/{self.namespace}", os.O_RDONLY | os.O_CLOEXEC)
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=self.host_interface,
                kind="veth",
                peer={"ifname": self.namespace_interface, "net_ns_fd": self.namespace},
            )
            self._link_created = True
            index = ipr.link_lookup(ifname=self.host_interface)[0]
            ipr.addr("add", index=index, address=self.host_address, prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=index, state="up")
        with _pyroute2_forks(), IPRoute(netns=self.namespace, flags=0) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            index = ns.link_lookup(ifname=self.namespace_interface)[0]
            ns.addr(
                "add",
                index=index,
                address=self.namespace_address,
                prefixlen=self.subnet.prefixlen,
            )
            for address in sorted(set(self.hosts.values())):
                ns.addr("add", index=index, address=address, prefixlen=32)
            ns.link("set", index=index, state="up")

    def _start_servers(self) -> None:
        self._spawn(
            "upstream",
            [
                self.upstream_python,
                str(HERE / "upstream_server.py"),
                "--rest-address", self.rest_address,
                "--grpc-address", self.storage_address,
                "--grpc-port", str(STORAGE_READ_PORT),
                "--cert", str(self.cert_file),
                "--key", str(self.key_file),
                "--data-dir", str(self.workdir / "upstream"),
                "--project", self.project,
                *(["--token-secret", str(self.identities.token_secret)]
                  if self.verify_tokens and self.identities else []),
            ],
        )  # fmt: skip
        self._spawn(
            "stubs",
            [
                sys.executable,
                str(HERE / "stub_servers.py"),
                "--cert", str(self.cert_file),
                "--key", str(self.key_file),
                "--echo-address", self.echo_address,
                "--echo-plain-port", str(self.echo_plain_port),
                "--token-address", self.token_address,
                *(["--identities", str(self.identities.registry)] if self.identities else []),
                "--issued-tokens", str(self.issued_tokens_file),
            ],
        )  # fmt: skip
        self._spawn(
            "storage",
            [
                sys.executable,
                str(HERE / "storage_write_server.py"),
                "--address", self.storage_address,
                "--port", str(TLS_PORT),
                "--read-backend", f"{self.storage_address}:{STORAGE_READ_PORT}",
                "--cert", str(self.cert_file),
                "--key", str(self.key_file),
                "--ca", str(self.ca_file),
                "--received-log", str(self.storage_write_log),
                *(["--token-secret", str(self.identities.token_secret)]
                  if self.verify_tokens and self.identities else []),
            ],
        )  # fmt: skip

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self._namespace_fd is not None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        # nsenter joins the namespace through the inherited descriptor, then execs the server,
        # so the pid below is the server's.
        fd = self._namespace_fd
        command = ["nsenter", f"--net=/proc/self/fd/{fd}", "--", *argv]
        with open(self.log_dir / f"{name}.log", "ab") as log:
            try:
                self._processes[name] = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.workdir,
                    start_new_session=True,
                    pass_fds=(fd,),
                )
            except OSError as error:
                raise CloudError(
                    f"failed to start the {name} server with {command[0]} {argv[0]}: {error}. "
                    "Install util-linux, which provides nsenter."
                ) from error

    def _probes(self) -> list[tuple[str, str, int, str | None]]:
        """Return (server, host name, port, ALPN) for every listener the cloud must have."""
        return [
            ("upstream", "bigquery.googleapis.com", TLS_PORT, "http/1.1"),
            ("upstream", "bigquerystorage.googleapis.com", TLS_PORT, "h2"),
            ("upstream", "bigquerystorage.googleapis.com", STORAGE_READ_PORT, "h2"),
            ("storage", "bigquerystorage.googleapis.com", TLS_PORT, "h2"),
            ("stubs", "oauth2.googleapis.com", TLS_PORT, "http/1.1"),
            ("stubs", "example.test", TLS_PORT, "http/1.1"),
            ("stubs", "example.test", self.echo_plain_port, None),
        ]

    def _probe(self, host: str, port: int, alpn: str | None) -> None:
        address = self.hosts[host]
        with socket.create_connection((address, port), timeout=2) as sock:
            if alpn is None:
                return
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.set_alpn_protocols([alpn])
            with context.wrap_socket(sock, server_hostname=host) as tls:
                if tls.selected_alpn_protocol() != alpn:
                    raise CloudError(
                        f"{host} ({address}:{port}) chose ALPN "
                        f"{tls.selected_alpn_protocol()!r}, expected {alpn!r}"
                    )

    def _wait_ready(self, deadline: float) -> None:
        pending = self._probes()
        last_error: dict[str, str] = {}
        while pending:
            for server, process in self._processes.items():
                if process.poll() is not None:
                    raise CloudError(
                        f"the {server} server exited with code {process.returncode} during "
                        f"start; last lines of {self.log_dir / (server + '.log')}:\n"
                        + self.log_tail(server)
                    )
            for probe in list(pending):
                server, host, port, alpn = probe
                try:
                    self._probe(host, port, alpn)
                except (OSError, CloudError) as error:
                    last_error[f"{host}:{port}"] = str(error)
                else:
                    pending.remove(probe)
            if not pending:
                return
            if time.monotonic() > deadline:
                waiting = ", ".join(
                    f"{h}:{p} ({last_error.get(f'{h}:{p}')})" for _, h, p, _ in pending
                )
                servers = sorted({server for server, *_ in pending})
                tails = "\n".join(
                    f"last lines of {self.log_dir / (s + '.log')}:\n{self.log_tail(s)}"
                    for s in servers
                )
                raise CloudError(
                    f"the testbed cloud timed out after {self.startup_timeout:.0f}s; "
                    f"still waiting for {waiting}\n{tails}"
                )
            time.sleep(0.2)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if process.poll() is not None:
            return
        # The server was started in its own session, so its process group id is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt so the caller's cleanup runs.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    """

    def interrupt(_number: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the testbed cloud until SIGINT or SIGTERM.")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument(
        "--upstream-python",
        default=os.environ.get(UPSTREAM_PYTHON_ENV),
        help=f"python of the upstream venv (default: ${UPSTREAM_PYTHON_ENV})",
    )
    parser.add_argument("--subnet", default=DEFAULT_SUBNET)
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    args = parser.parse_args(argv)
    try:
        with (
            _stop_on_signals(),
            Cloud(
                args.workdir, args.upstream_python, subnet=args.subnet, project=args.project
            ) as cloud,
        ):
            print(json.dumps(cloud.describe()), flush=True)
            signal.pause()
    except KeyboardInterrupt:
        return 0
    except CloudError as error:
        print(f"testbed cloud: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
