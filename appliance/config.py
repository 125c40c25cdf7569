"""Load and validate the appliance's YAML configuration.

Every key is documented in docs/configuration.md; a test fails when one is missing there.
Invalid values are rejected at load time with the key, the value and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Set
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

# The keys each section accepts; anything else is rejected at load. docs/configuration.md
# documents every one, and tests/docs/test_docs_coverage.py reads these sets to check that.
TOP_LEVEL_KEYS = frozenset({"store", "runtime_dir", "proxy", "network", "default_agent", "agents"})
STORE_KEYS = frozenset({"path", "signing_key", "retention_days"})
PROXY_KEYS = frozenset({"port", "ca_dir", "upstream_ca_file"})
NETWORK_KEYS = frozenset({"pool", "hosts"})
PROFILE_KEYS = frozenset({"project", "principal", "user", "allow_hosts"})
# Keys of the BigQuery recording options of a profile, accepted beside PROFILE_KEYS.
BIGQUERY_PROFILE_KEYS = frozenset({"record_result_rows", "job_label_key"})
DEFAULT_JOB_LABEL_KEY = "appliance-session"
# Keys of the credential options of a profile, accepted beside PROFILE_KEYS, and of its
# `credentials` mapping. docs/credentials.md explains each source.
CREDENTIAL_PROFILE_KEYS = frozenset({"credentials", "allow_foreign_credentials", "project_number"})
CREDENTIALS_KEYS = frozenset({"source", "file", "target_principal", "delegates", "scopes"})
CREDENTIAL_SOURCES = ("adc", "impersonate", "external_account", "service_account_key",
                      "authorized_user")
_EMAIL = re.compile(r"^[^@\s/]+@[^@\s/]+\.[^@\s/]+$")
# BigQuery label keys: lowercase letters, digits, '_' and '-', starting with a letter.
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_PATTERN = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$|^\*$")
_UNIX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class CredentialsConfig:
    """The source of the real token of a profile's principal (docs/credentials.md)."""

    source: str = "adc"
    file: Path | None = None
    target_principal: str | None = None
    delegates: tuple[str, ...] = ()
    # None: cloud-platform, except for authorized_user, whose refresh token keeps its grant.
    scopes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AgentProfile:
    """The operator's configuration for one agent."""

    name: str
    project: str | None = None
    principal: str | None = None
    user: str = DEFAULT_AGENT_USER
    allow_hosts: tuple[str, ...] = DEFAULT_ALLOW_HOSTS
    # Off by default: a recording proves what was returned by digests, without the rows.
    record_result_rows: bool = False
    # None turns the label off.
    job_label_key: str | None = DEFAULT_JOB_LABEL_KEY
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    # Off by default: a request with a credential other than the placeholder is rejected.
    allow_foreign_credentials: bool = False
    project_number: str | None = None

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
    # The Ed25519 key that signs the store's digests; kept outside the store, private to root.
    signing_key: Path = Path("/etc/appliance/signing-key.pem")
    # Sealed sessions older than this are removed by 'appliance store prune'; None keeps all.
    retention_days: int | None = None
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
    _reject_unknown(root, TOP_LEVEL_KEYS, "", where)

    store = _mapping(root.get("store", {}), "store", where)
    _reject_unknown(store, STORE_KEYS, "store.", where)
    proxy = _mapping(root.get("proxy", {}), "proxy", where)
    _reject_unknown(proxy, PROXY_KEYS, "proxy.", where)
    network = _mapping(root.get("network", {}), "network", where)
    _reject_unknown(network, NETWORK_KEYS, "network.", where)

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
        signing_key=_absolute_path(store.get("signing_key", defaults.signing_key),
                                   "store.signing_key", where),
        retention_days=_retention_days(store.get("retention_days"), where),
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
    _reject_unknown(body, PROFILE_KEYS | BIGQUERY_PROFILE_KEYS | CREDENTIAL_PROFILE_KEYS, prefix,
                    where)
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
        record_result_rows=_flag(body.get("record_result_rows", False),
                                 prefix + "record_result_rows", where),
        job_label_key=_label_key(body.get("job_label_key", DEFAULT_JOB_LABEL_KEY),
                                 prefix + "job_label_key", where),
        credentials=_credentials(body.get("credentials", {}), prefix, where),
        allow_foreign_credentials=_flag(body.get("allow_foreign_credentials", False),
                                        prefix + "allow_foreign_credentials", where),
        project_number=_project_number(body.get("project_number"), prefix + "project_number",
                                       where),
    )


def _credentials(value: Any, prefix: str, where: str) -> CredentialsConfig:
    key = prefix + "credentials"
    body = _mapping(value if value is not None else {}, key, where)
    _reject_unknown(body, CREDENTIALS_KEYS, f"{prefix}credentials.", where)
    source = body.get("source", "adc")
    if source not in CREDENTIAL_SOURCES:
        raise ConfigError(f"{where}: {key}.source {source!r} is not one of "
                          f"{', '.join(CREDENTIAL_SOURCES)}.")
    needs_file = source in ("service_account_key", "external_account")
    if needs_file and body.get("file") is None:
        raise ConfigError(f"{where}: {key}.file is required with source {source!r}; name the "
                          "credential file, for example /etc/appliance/credentials/agent.json.")
    if source == "adc" and body.get("file") is not None:
        raise ConfigError(f"{where}: {key}.file is not used with source 'adc', which reads the "
                          "host's Application Default Credentials; use source "
                          "'service_account_key', 'authorized_user' or 'external_account' "
                          "to name a file.")
    target = body.get("target_principal")
    if (source == "impersonate") != (target is not None):
        raise ConfigError(f"{where}: {key}.target_principal is required with source "
                          "'impersonate' and not used with any other source; with "
                          "external_account, put service_account_impersonation_url in the file.")
    if target is not None and not _EMAIL.match(str(target)):
        raise ConfigError(f"{where}: {key}.target_principal {target!r} is not a service "
                          "account email such as agent@project.iam.gserviceaccount.com.")
    delegates = body.get("delegates", [])
    if delegates and source != "impersonate":
        raise ConfigError(f"{where}: {key}.delegates is used only with source 'impersonate'.")
    if not isinstance(delegates, list) or not all(
            isinstance(d, str) and _EMAIL.match(d.removeprefix("projects/-/serviceAccounts/"))
            for d in delegates):
        raise ConfigError(f"{where}: {key}.delegates must be a list of service account emails "
                          f"(or projects/-/serviceAccounts/EMAIL names), got {delegates!r}.")
    scopes = body.get("scopes")
    if scopes is not None and (not isinstance(scopes, list) or not scopes or not all(
            isinstance(s, str) and s.startswith("https://") for s in scopes)):
        raise ConfigError(f"{where}: {key}.scopes must be a non-empty list of OAuth scope URLs "
                          "such as https://www.googleapis.com/auth/bigquery, got "
                          f"{scopes!r}.")
    file = body.get("file")
    return CredentialsConfig(
        source=source,
        file=None if file is None else _absolute_path(file, key + ".file", where),
        target_principal=None if target is None else str(target),
        delegates=tuple(d.removeprefix("projects/-/serviceAccounts/") for d in delegates),
        scopes=None if scopes is None else tuple(scopes),
    )


def _project_number(value: Any, key: str, where: str) -> str | None:
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not text.isdigit():
        raise ConfigError(f"{where}: {key} must be the project's number, digits only, such as "
                          f"123456789012; got {value!r}.")
    return text


def _flag(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}.")
    return value


def _label_key(value: Any, key: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _LABEL_KEY.match(value):
        raise ConfigError(
            f"{where}: {key} {value!r} is not a BigQuery label key; use 1 to 63 lowercase "
            f"letters, digits, '_' or '-', starting with a letter (default "
            f"{DEFAULT_JOB_LABEL_KEY!r}), or null to add no label."
        )
    return value


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__} "
                          f"{value!r}.")
    return value


def _reject_unknown(mapping: Mapping[str, Any], known: Set[str], prefix: str,
                    where: str) -> None:
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


def _retention_days(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: store.retention_days must be a whole number of days, at "
                          f"least 1, or absent to keep every session; got {value!r}.")
    return value
