"""The checks behind `appliance doctor`: can this host run recorded sessions?

Each check returns a `Check` that passed or failed, with what it saw and, on failure, the fix.
Kernel features are tried for real on throwaway objects named `appliance_doctor_<pid>` (a
network namespace holding a veth pair, and an nftables table with a nat hook), which are
removed again, also when a step fails. Nothing here changes the store, the CA or the configuration,
except that a missing store or CA is reported, not created.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import importlib.metadata
import logging
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from pyroute2 import NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from appliance import ca as ca_module
from appliance.config import Config
from appliance.errors import ApplianceError

logger = logging.getLogger(__name__)

DISTRIBUTION = "bq-session-appliance"
MINIMUM_PYTHON = (3, 12)
UPSTREAM_HOSTS = ("bigquery.googleapis.com", "bigquerystorage.googleapis.com")
UPSTREAM_TIMEOUT = 3.0


@dataclass(frozen=True)
class Check:
    """One diagnostic result; `fix` is the remedy when `ok` is false."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def throwaway_name() -> str:
    """Name the namespace and nftables table the kernel checks create and delete."""
    return f"appliance_doctor_{os.getpid()}"


# -- the process and its packages --------------------------------------------------------------


def check_root() -> Check:
    if os.geteuid() == 0:
        return passed("root", "running as root")
    return failed("root", f"running as uid {os.geteuid()}",
                  "Run appliance as root (sessions create namespaces and nftables rules).")


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] >= MINIMUM_PYTHON:
        return passed("python", f"Python {version} at {sys.executable}")
    return failed("python", f"Python {version} at {sys.executable} is older than 3.12",
                  "Reinstall with a Python >= 3.12 (make install PYTHON=/usr/bin/python3.12).")


def check_packages() -> Check:
    """Check that every runtime dependency is installed at a version the package accepts."""
    try:
        own = importlib.metadata.version(DISTRIBUTION)
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return failed("packages", f"the {DISTRIBUTION} distribution is not installed",
                      "Install the appliance with 'make install'.")
    found, problems = [f"{DISTRIBUTION} {own}"], []
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # An optional extra, such as the test tools.
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is missing")
            continue
        found.append(f"{requirement.name} {version}")
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version} does not satisfy {requirement}")
    if problems:
        return failed("packages", "; ".join(problems),
                      "Reinstall the appliance's venv with 'make install'.")
    return passed("packages", ", ".join(found))


# -- kernel features ---------------------------------------------------------------------------


def _permission_fix(error: BaseException) -> str:
    code = getattr(error, "code", None) or getattr(error, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return "Run appliance as root (it needs CAP_NET_ADMIN and CAP_SYS_ADMIN)."
    return ("Use a kernel with network namespaces and veth (CONFIG_NET_NS, CONFIG_VETH); in a "
            "container, run it privileged.")


@contextlib.contextmanager
def _throwaway_namespace(name: str) -> Iterator[None]:
    netns.create(name)
    try:
        yield
    finally:
        try:
            netns.remove(name)
        except OSError as error:
            logger.error("Removing the doctor's namespace %s failed: %s", name, error)


def check_kernel_network() -> list[Check]:
    """Create a namespace, a veth pair inside it, and remove both."""
    with warnings.catch_warnings():
        # pyroute2 forks helpers that only call unshare(2), setns(2) and mount(2), which is
        # safe in a process with threads.
        warnings.filterwarnings("ignore", "This process .* is multi-threaded",
                                DeprecationWarning)
        return _kernel_network(throwaway_name())


def _kernel_network(name: str) -> list[Check]:
    try:
        with _throwaway_namespace(name):
            namespace_check = passed("netns", f"created and removed network namespace {name}")
            try:
                with NetNS(name) as ns:
                    ns.link("add", ifname="apdoc0", kind="veth", peer="apdoc1")
                    ns.link("del", index=ns.link_lookup(ifname="apdoc0")[0])
            except (NetlinkError, OSError) as error:
                return [namespace_check,
                        failed("veth", f"creating a veth pair failed: {error}",
                               _permission_fix(error))]
            return [namespace_check, passed("veth", f"created a veth pair inside {name}")]
    except (NetlinkError, OSError) as error:
        fix = _permission_fix(error)
        return [failed("netns", f"creating network namespace {name} failed: {error}", fix),
                failed("veth", "not tried, because no namespace could be created", fix)]


def nftables_probe(name: str) -> str:
    """Return an nft script exercising what sessions use: nat redirect and filter hooks."""
    return f"""table inet {name} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "apdoc-none" meta l4proto tcp redirect to :1
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "apdoc-none" ct status dnat accept
        iifname "apdoc-none" drop
    }}
}}
"""


def check_nftables() -> Check:
    """Create and delete a table with a nat hook and a redirect rule that matches nothing."""
    binary = shutil.which("nft")
    if binary is None:
        return failed("nftables", "the nft command is not installed",
                      "Install nftables (apt-get install nftables).")
    name = throwaway_name()
    created = subprocess.run([binary, "-f", "-"], input=nftables_probe(name), text=True,
                             capture_output=True, check=False)
    if created.returncode != 0:
        reason = (created.stderr.strip().splitlines() or ["no output"])[-1]
        fix = ("Run appliance as root." if "Operation not permitted" in created.stderr else
               "Load the nf_tables, nft_nat, nft_redir and nft_ct kernel modules "
               "(modprobe nft_redir) or use a kernel with nftables NAT support.")
        return failed("nftables", f"creating table inet {name} with a nat hook failed: "
                                  f"{reason}", fix)
    deleted = subprocess.run([binary, "delete", "table", "inet", name], text=True,
                             capture_output=True, check=False)
    if deleted.returncode != 0:
        return failed("nftables", f"deleting table inet {name} failed: "
                                  f"{deleted.stderr.strip()}",
                      f"Delete it by hand: nft delete table inet {name}")
    return passed("nftables", f"created and removed table inet {name} with nat and filter "
                              "hooks")


# -- configuration, users, store, CA -----------------------------------------------------------


def check_agent_users(config: Config) -> Check:
    missing, root = [], []
    for profile in config.agents.values():
        try:
            if pwd.getpwnam(profile.user).pw_uid == 0:
                root.append(profile.user)
        except KeyError:
            missing.append(f"{profile.user} (profile {profile.name})")
    if missing:
        return failed("agent users", f"missing Unix users: {', '.join(missing)}",
                      "Create them: useradd --system --no-create-home --shell "
                      "/usr/sbin/nologin USER (make install creates appliance-agent).")
    if root:
        return failed("agent users", f"users with uid 0: {', '.join(root)}",
                      "Give each agent profile an unprivileged user.")
    users = sorted({profile.user for profile in config.agents.values()})
    return passed("agent users", f"exist and are unprivileged: {', '.join(users)}")


def _private_to_root(path: Path) -> str | None:
    """Return what is wrong with `path`'s owner or mode for a root-only item, or None."""
    info = path.stat()
    problems = []
    if info.st_uid != 0:
        problems.append(f"owned by uid {info.st_uid}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        problems.append(f"mode {stat.S_IMODE(info.st_mode):04o}")
    return f"{path} is {' and '.join(problems)}" if problems else None


def check_store(config: Config) -> Check:
    root = config.store_path
    if not root.exists():
        parent = next((p for p in root.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK):
            return passed("store", f"{root} does not exist yet; the first session creates it "
                                   "with mode 0700")
        return failed("store", f"{root} does not exist and {parent} is not writable",
                      "Create it as root: install -d -m 0700 -o root -g root " + str(root))
    if not root.is_dir():
        return failed("store", f"{root} is not a directory", "Set store.path to a directory.")
    problems = []
    for path in [root, *(root / name for name in ("journal", "sessions", "keys"))]:
        if path.exists():
            problem = _private_to_root(path)
            if problem:
                problems.append(problem)
    for path in root.glob("keys/*"):
        if path.is_file() and not path.name.endswith((".pub", ".pem.pub")):
            problem = _private_to_root(path)
            if problem:
                problems.append(problem)
    if problems:
        return failed("store", "; ".join(problems),
                      f"Make the store private to root: chown -R root:root {root} && "
                      f"chmod -R go-rwx {root}")
    try:
        from appliance.recordings.store import Store

        with Store(root).catalog():
            pass
    except ApplianceError as error:
        return failed("store", str(error), "Check the catalog, or move it aside and "
                                           "re-register the sessions.")
    return passed("store", f"{root} is private to root and its catalog opens")


def check_signing_key(config: Config) -> Check:
    """Check the store's signing key, where this version of the configuration names one."""
    path = getattr(config, "signing_key", None)
    if not isinstance(path, Path):
        return passed("signing key", "this version signs no sessions")
    if not path.exists():
        return passed("signing key", f"{path} does not exist yet; the first sealed session "
                                     "creates it, private to root")
    problems = [p for p in (_private_to_root(path.parent), _private_to_root(path)) if p]
    if path.parent == Path("/etc/appliance"):
        problems = [p for p in (_private_to_root(path),) if p]  # /etc/appliance is 0755.
    if problems:
        return failed("signing key", "; ".join(problems),
                      f"Make the key private to root: chown root:root {path} && "
                      f"chmod 0600 {path}")
    return passed("signing key", f"{path} is private to root")


def check_ca(config: Config) -> Check:
    ca_dir = config.ca_dir
    key = ca_dir / ca_module.CA_KEY_NAME
    if not key.exists():
        return failed("ca", f"no CA in {ca_dir}",
                      "Create it as root: appliance ca show (make install does this).")
    problems = [p for p in (_private_to_root(ca_dir), _private_to_root(key)) if p]
    if problems:
        return failed("ca", "; ".join(problems),
                      f"Make the CA key private to root: chown -R root:root {ca_dir} && "
                      f"chmod 0700 {ca_dir} && chmod 0600 {key}")
    try:
        info = ca_module.read(ca_dir)
    except ApplianceError as error:
        return failed("ca", str(error), f"Remove the files in {ca_dir} and run 'appliance "
                                        "ca show' to create a new CA.")
    if info.not_after <= datetime.datetime.now(datetime.UTC):
        return failed("ca", f"the CA certificate expired on {info.not_after.isoformat()}",
                      f"Remove the files in {ca_dir} and run 'appliance ca show' to create a "
                      "new CA, then rebuild agent images that embed it.")
    return passed("ca", f"{info.subject}, valid until {info.not_after.date().isoformat()}, "
                        f"SHA-256 {info.sha256[:23]}...")


def check_runtime_dir(config: Config) -> Check:
    for parent in [config.runtime_dir, *config.runtime_dir.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return failed("runtime dir", f"{parent} is not searchable by other users, so the "
                                         "agent cannot read its session files",
                          "Set runtime_dir to a directory whose parents all have mode o+x, "
                          "such as /run/appliance.")
    return passed("runtime dir", f"{config.runtime_dir} is reachable by the agent user")


# -- upstream ----------------------------------------------------------------------------------


def _address_of(host: str, config: Config) -> str:
    if host in config.hosts:
        return config.hosts[host]
    infos = socket.getaddrinfo(host, 443, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return str(infos[0][4][0])


def check_upstream(config: Config, host: str) -> Check:
    """Connect to `host`:443 over TCP and TLS, trusting the configured upstream CA."""
    name = f"upstream {host.split('.')[0]}"
    try:
        address = _address_of(host, config)
    except OSError as error:
        return failed(name, f"{host} does not resolve: {error}",
                      f"Fix DNS on the host, or map {host} under network.hosts.")
    context = ssl.create_default_context(
        cafile=str(config.upstream_ca_file) if config.upstream_ca_file else None)
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with (socket.create_connection((address, 443), timeout=UPSTREAM_TIMEOUT) as raw,
              context.wrap_socket(raw, server_hostname=host) as tls):
            version = tls.version()
    except ssl.SSLCertVerificationError as error:
        return failed(name, f"TLS to {host} at {address}:443 failed verification: "
                            f"{error.verify_message}",
                      "Set proxy.upstream_ca_file to the CA that signs the upstream's "
                      "certificate, or remove it to trust the system CAs.")
    except (OSError, TimeoutError) as error:
        return failed(name, f"cannot reach {host} at {address}:443: {error}",
                      "Check the route and firewall to the upstream, and network.hosts.")
    return passed(name, f"{address}:443 answered with {version}")


def run_all(config: Config | None, config_error: ApplianceError | None) -> list[Check]:
    """Run every check; with no valid configuration, only those that need none."""
    checks = [check_root(), check_python(), check_packages(), *check_kernel_network(),
              check_nftables()]
    if config is None:
        assert config_error is not None
        checks.append(failed("config", str(config_error),
                             "Fix the key named above; see docs/configuration.md."))
        return checks
    where = str(config.source) if config.source else "built-in defaults (no file)"
    checks.append(passed("config", f"{where} is valid: {len(config.agents)} agent "
                                   f"profile(s), default {config.default_agent}"))
    checks += [check_agent_users(config), check_store(config),
               check_signing_key(config), check_ca(config),
               check_runtime_dir(config)]
    checks += [check_upstream(config, host) for host in UPSTREAM_HOSTS]
    return checks
