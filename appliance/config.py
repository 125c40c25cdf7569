"""Load and validate the appliance's YAML configuration.

Every key is documented in docs/configuration.md; a test fails when one is missing there.
Invalid values are rejected at load time with the key, the value and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.yaml")
DEFAULT_AGENT_USER = "appliance-agent"

# Hosts an agent profile may reach when its configuration names none: the BigQuery APIs and the
# Google token endpoints that client libraries call.
DEFAULT_ALLOW_HOSTS = (
    "bigquery.googleapis.com",
    "bigquerystorage.googleapis.com",
    "www.googleapis.com",
    "oauth2.googleapis.com",
    "sts.googleapis.com",
    "iamcredentials.googleapis.com",
)

_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_PATTERN = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$|^\*$")
_UNIX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class AgentProfile:
    """The operator's configuration for one agent."""

    name: str
    project: str | None = None
    principal: str | None = None
    user: str = DEFAULT_AGENT_USER
    allow_hosts: tuple[str, ...] = DEFAULT_ALLOW_HOSTS

    def allows_host(self, host: str) -> bool:
        """Tell whether the egress allowlist admits `host` (exact, `*.suffix` or `*`)."""
        host = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False


@dataclass(frozen=True)
class Config:
    """The whole configuration, with defaults filled in."""

    store_path: Path = Path("/var/lib/appliance")
    runtime_dir: Path = Path("/run/appliance")
    ca_dir: Path = Path("/etc/appliance/ca")
    proxy_port: int = 15001
    upstream_ca_file: Path | None = None
    pool: ipaddress.IPv4Network = ipaddress.IPv4Network("198.18.0.0/16")
    hosts: Mapping[str, str] = field(default_factory=dict)
    default_agent: str = "default"
    agents: Mapping[str, AgentProfile] = field(
        default_factory=lambda: {"default": AgentProfile(name="default")}
    )
    source: Path | None = None

    def profile(self, name: str | None) -> AgentProfile:
        """Return the agent profile `name`, or the default profile when `name` is None."""
        wanted = name or self.default_agent
        try:
            return self.agents[wanted]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise ConfigError(
                f"Agent profile {wanted!r} is not defined in {self.source or 'the defaults'} "
                f"(defined: {known}). Add it under 'agents:' or pick another with --agent."
            ) from None


def load(path: Path | None) -> Config:
    """Read the configuration from `path`, or the defaults when no file exists.

    An explicitly given path that does not exist is an error; the default path may be absent.
    """
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"Configuration file {path} not found.") from None
        return Config()
    except OSError as error:
        raise ConfigError(f"Cannot read configuration file {path}: {error.strerror}.") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"Configuration file {path} is not valid UTF-8 (byte {error.start}); "
                          "save it as UTF-8.") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"Configuration file {path} is not valid YAML: {error}") from error
    return parse(data if data is not None else {}, source=path)


def parse(data: Any, source: Path | None = None) -> Config:
    """Validate a decoded YAML document and build the configuration from it."""
    where = str(source) if source else "configuration"
    root = _mapping(data, "(top level)", where)
    _reject_unknown(root, {"store", "runtime_dir", "proxy", "network", "default_agent", "agents"},
                    "", where)

    store = _mapping(root.get("store", {}), "store", where)
    _reject_unknown(store, {"path"}, "store.", where)
    proxy = _mapping(root.get("proxy", {}), "proxy", where)
    _reject_unknown(proxy, {"port", "ca_dir", "upstream_ca_file"}, "proxy.", where)
    network = _mapping(root.get("network", {}), "network", where)
    _reject_unknown(network, {"pool", "hosts"}, "network.", where)

    defaults = Config()
    agents = _parse_agents(root.get("agents"), where)
    default_agent = _string(root.get("default_agent", defaults.default_agent), "default_agent", where)
    if default_agent not in agents:
        raise ConfigError(
            f"{where}: default_agent {default_agent!r} names no profile under 'agents:' "
            f"(defined: {', '.join(sorted(agents))})."
        )
    upstream_ca = proxy.get("upstream_ca_file")
    return Config(
        store_path=_absolute_path(store.get("path", defaults.store_path), "store.path", where),
        runtime_dir=_absolute_path(root.get("runtime_dir", defaults.runtime_dir), "runtime_dir",
                                   where),
        ca_dir=_absolute_path(proxy.get("ca_dir", defaults.ca_dir), "proxy.ca_dir", where),
        proxy_port=_port(proxy.get("port", defaults.proxy_port), "proxy.port", where),
        upstream_ca_file=(None if upstream_ca is None
                          else _absolute_path(upstream_ca, "proxy.upstream_ca_file", where)),
        pool=_pool(network.get("pool", str(defaults.pool)), where),
        hosts=_hosts(network.get("hosts", {}), where),
        default_agent=default_agent,
        agents=agents,
        source=source,
    )


def _parse_agents(value: Any, where: str) -> dict[str, AgentProfile]:
    if value is None:
        return {"default": AgentProfile(name="default")}
    agents = _mapping(value, "agents", where)
    if not agents:
        raise ConfigError(f"{where}: 'agents' is empty; define at least one agent profile.")
    profiles = {}
    for name, body in agents.items():
        if not isinstance(name, str) or not _PROFILE_NAME.match(name):
            raise ConfigError(
                f"{where}: agent profile name {name!r} is invalid; use letters, digits, '_', '.' "
                "or '-', starting with a letter or digit, at most 63 characters."
            )
        profiles[name] = _parse_profile(name, body if body is not None else {}, where)
    return profiles


def _parse_profile(name: str, value: Any, where: str) -> AgentProfile:
    prefix = f"agents.{name}."
    body = _mapping(value, f"agents.{name}", where)
    _reject_unknown(body, {"project", "principal", "user", "allow_hosts"}, prefix, where)
    user = _string(body.get("user", DEFAULT_AGENT_USER), prefix + "user", where)
    if not _UNIX_USER.match(user) or user == "root":
        raise ConfigError(
            f"{where}: {prefix}user {user!r} is invalid; name an unprivileged Unix user "
            f"such as {DEFAULT_AGENT_USER!r}."
        )
    allow = body.get("allow_hosts", list(DEFAULT_ALLOW_HOSTS))
    if not isinstance(allow, list) or not all(isinstance(h, str) for h in allow):
        raise ConfigError(f"{where}: {prefix}allow_hosts must be a list of host names, "
                          f"got {allow!r}.")
    for host in allow:
        if not _HOST_PATTERN.match(host):
            raise ConfigError(f"{where}: {prefix}allow_hosts entry {host!r} is invalid; use a "
                              "host name, '*.domain' or '*'.")
    return AgentProfile(
        name=name,
        project=_optional_string(body.get("project"), prefix + "project", where),
        principal=_optional_string(body.get("principal"), prefix + "principal", where),
        user=user,
        allow_hosts=tuple(h.lower() for h in allow),
    )


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__} "
                          f"{value!r}.")
    return value


def _reject_unknown(mapping: Mapping[str, Any], known: set[str], prefix: str, where: str) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key {prefix}{key}; known keys here: "
                f"{', '.join(prefix + k for k in sorted(known))}."
            )


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}.")
    return value


def _optional_string(value: Any, key: str, where: str) -> str | None:
    return None if value is None else _string(value, key, where)


def _absolute_path(value: Any, key: str, where: str) -> Path:
    path = Path(_string(str(value) if isinstance(value, Path) else value, key, where))
    if not path.is_absolute():
        raise ConfigError(f"{where}: {key} must be an absolute path, got {str(path)!r}.")
    return path


def _port(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {key} must be a TCP port number from 1 to 65535, "
                          f"got {value!r}.")
    return value


def _pool(value: Any, where: str) -> ipaddress.IPv4Network:
    try:
        pool = ipaddress.IPv4Network(_string(value, "network.pool", where))
    except ValueError as error:
        raise ConfigError(f"{where}: network.pool {value!r} is not an IPv4 network in CIDR "
                          f"form ({error}); for example 198.18.0.0/16.") from error
    if pool.prefixlen > 30:
        raise ConfigError(f"{where}: network.pool {value!r} is smaller than one /30; each "
                          "session needs a /30.")
    return pool


def _hosts(value: Any, where: str) -> dict[str, str]:
    hosts = _mapping(value, "network.hosts", where)
    result = {}
    for name, address in hosts.items():
        if not isinstance(name, str) or not _HOST_PATTERN.match(name) or "*" in name:
            raise ConfigError(f"{where}: network.hosts key {name!r} is not a host name.")
        try:
            if not isinstance(address, str):
                raise ValueError("not a string")
            result[name.lower()] = str(ipaddress.IPv4Address(address))
        except ValueError:
            raise ConfigError(f"{where}: network.hosts.{name} {address!r} is not an IPv4 "
                              "address.") from None
    return result
