"""Tests for loading and validating the YAML configuration."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from appliance import config
from appliance.config import DEFAULT_ALLOW_HOSTS, AgentProfile, Config
from appliance.errors import ConfigError

FULL_CONFIG = """
store:
  path: /srv/recordings
runtime_dir: /run/ap
proxy:
  port: 18080
  ca_dir: /etc/ap/ca
  upstream_ca_file: /etc/ap/upstream.pem
network:
  pool: 198.18.4.0/24
  hosts:
    BigQuery.googleapis.com: 198.18.0.10
default_agent: analyst
agents:
  analyst:
    project: proj
    principal: analyst@proj.iam.gserviceaccount.com
    user: agent-analyst
    allow_hosts: [bigquery.googleapis.com, "*.Example.com"]
  loader:
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- loading -------------------------------------------------------------------------------------


def test_load_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")

    loaded = config.load(None)

    assert loaded == Config()
    assert loaded.profile(None).name == "default"
    assert loaded.profile(None).allow_hosts == DEFAULT_ALLOW_HOSTS


def test_load_explicit_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match="not found") as raised:
        config.load(path)

    assert str(path) in str(raised.value)


def test_load_invalid_yaml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "store: [unclosed\n")

    with pytest.raises(ConfigError, match="is not valid YAML") as raised:
        config.load(path)

    assert str(path) in str(raised.value)


def test_load_directory_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read configuration file"):
        config.load(tmp_path)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_bytes(b"store:\n  path: /srv/\xff\xfe\n")

    with pytest.raises(ConfigError, match=str(path)):
        config.load(path)


def test_load_empty_file_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")

    loaded = config.load(path)

    assert loaded == Config(source=path)


def test_load_full_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, FULL_CONFIG)

    loaded = config.load(path)

    assert loaded.store_path == Path("/srv/recordings")
    assert loaded.runtime_dir == Path("/run/ap")
    assert loaded.proxy_port == 18080
    assert loaded.ca_dir == Path("/etc/ap/ca")
    assert loaded.upstream_ca_file == Path("/etc/ap/upstream.pem")
    assert loaded.pool == ipaddress.IPv4Network("198.18.4.0/24")
    assert loaded.hosts == {"bigquery.googleapis.com": "198.18.0.10"}
    assert loaded.default_agent == "analyst"
    assert loaded.source == path


def test_load_full_file_profiles(tmp_path: Path) -> None:
    loaded = config.load(write_config(tmp_path, FULL_CONFIG))

    assert loaded.profile(None) == AgentProfile(
        name="analyst", project="proj", principal="analyst@proj.iam.gserviceaccount.com",
        user="agent-analyst", allow_hosts=("bigquery.googleapis.com", "*.example.com"))
    assert loaded.profile("loader") == AgentProfile(name="loader")


# -- invalid values ------------------------------------------------------------------------------

AGENT = {"agents": {"a": {}}, "default_agent": "a"}


def with_agent(**body: object) -> dict[str, object]:
    return {"agents": {"a": body}, "default_agent": "a"}


INVALID = [
    # Unknown keys at every level.
    pytest.param({"bogus": 1}, ["bogus"], id="unknown-top-level"),
    pytest.param({"store": {"dir": "/x"}}, ["store.dir"], id="unknown-store-key"),
    pytest.param({"proxy": {"listen": 1}}, ["proxy.listen"], id="unknown-proxy-key"),
    pytest.param({"network": {"dns": "x"}}, ["network.dns"], id="unknown-network-key"),
    pytest.param(with_agent(token="x"), ["agents.a.token"], id="unknown-agent-key"),
    # Wrong shapes.
    pytest.param([1, 2], ["(top level)", "[1, 2]"], id="top-level-list"),
    pytest.param({"store": "/x"}, ["store", "'/x'"], id="store-not-mapping"),
    pytest.param({"agents": ["a"]}, ["agents", "['a']"], id="agents-not-mapping"),
    pytest.param({"agents": {}}, ["agents", "empty"], id="agents-empty"),
    pytest.param({"agents": {"a": "x"}, "default_agent": "a"}, ["agents.a", "'x'"],
                 id="profile-not-mapping"),
    # Ports.
    pytest.param({"proxy": {"port": 0}}, ["proxy.port", "got 0"], id="port-0"),
    pytest.param({"proxy": {"port": 70000}}, ["proxy.port", "70000"], id="port-70000"),
    pytest.param({"proxy": {"port": "x"}}, ["proxy.port", "'x'"], id="port-string"),
    pytest.param({"proxy": {"port": True}}, ["proxy.port", "True"], id="port-bool"),
    # Paths.
    pytest.param({"store": {"path": "var/lib"}}, ["store.path", "'var/lib'"],
                 id="store-path-relative"),
    pytest.param({"runtime_dir": "run"}, ["runtime_dir", "'run'"], id="runtime-dir-relative"),
    pytest.param({"proxy": {"ca_dir": "ca"}}, ["proxy.ca_dir", "'ca'"], id="ca-dir-relative"),
    pytest.param({"proxy": {"upstream_ca_file": "ca.pem"}},
                 ["proxy.upstream_ca_file", "'ca.pem'"], id="upstream-ca-relative"),
    pytest.param({"store": {"path": 5}}, ["store.path", "5"], id="store-path-number"),
    # Address pool.
    pytest.param({"network": {"pool": "not-a-cidr"}}, ["network.pool", "'not-a-cidr'"],
                 id="pool-not-cidr"),
    pytest.param({"network": {"pool": "198.18.0.0/31"}}, ["network.pool", "'198.18.0.0/31'"],
                 id="pool-smaller-than-30"),
    pytest.param({"network": {"pool": "198.18.0.1/16"}}, ["network.pool", "'198.18.0.1/16'"],
                 id="pool-host-bits-set"),
    pytest.param({"network": {"pool": "fd00::/64"}}, ["network.pool", "'fd00::/64'"],
                 id="pool-ipv6"),
    # Host overrides.
    pytest.param({"network": {"hosts": {"bigquery.googleapis.com": "not-an-ip"}}},
                 ["network.hosts.bigquery.googleapis.com", "'not-an-ip'"], id="hosts-not-ip"),
    pytest.param({"network": {"hosts": {"bigquery.googleapis.com": "::1"}}},
                 ["network.hosts.bigquery.googleapis.com", "'::1'"], id="hosts-ipv6"),
    pytest.param({"network": {"hosts": {"*.googleapis.com": "198.18.0.1"}}},
                 ["network.hosts", "'*.googleapis.com'"], id="hosts-wildcard-name"),
    pytest.param({"network": {"hosts": ["198.18.0.1"]}}, ["network.hosts", "['198.18.0.1']"],
                 id="hosts-not-mapping"),
    # Profile names.
    pytest.param({"agents": {"-bad": {}}}, ["agent profile name", "'-bad'"],
                 id="profile-name-leading-dash"),
    pytest.param({"agents": {"bad name": {}}}, ["agent profile name", "'bad name'"],
                 id="profile-name-space"),
    pytest.param({"agents": {"x" * 64: {}}}, ["agent profile name", "x" * 64],
                 id="profile-name-too-long"),
    pytest.param({"agents": {7: {}}}, ["agent profile name", "7"], id="profile-name-number"),
    # Unix users.
    pytest.param(with_agent(user="root"), ["agents.a.user", "'root'"], id="user-root"),
    pytest.param(with_agent(user="Alice"), ["agents.a.user", "'Alice'"], id="user-uppercase"),
    pytest.param(with_agent(user="1agent"), ["agents.a.user", "'1agent'"],
                 id="user-leading-digit"),
    pytest.param(with_agent(user=""), ["agents.a.user", "''"], id="user-empty"),
    pytest.param(with_agent(user=1000), ["agents.a.user", "1000"], id="user-number"),
    # Allowlists.
    pytest.param(with_agent(allow_hosts="bigquery.googleapis.com"),
                 ["agents.a.allow_hosts", "'bigquery.googleapis.com'"], id="allow-hosts-string"),
    pytest.param(with_agent(allow_hosts=["ok.example", 5]),
                 ["agents.a.allow_hosts", "['ok.example', 5]"], id="allow-hosts-number"),
    pytest.param(with_agent(allow_hosts=["bad host"]), ["agents.a.allow_hosts", "'bad host'"],
                 id="allow-hosts-space"),
    pytest.param(with_agent(allow_hosts=["*.*.example"]),
                 ["agents.a.allow_hosts", "'*.*.example'"], id="allow-hosts-double-wildcard"),
    pytest.param(with_agent(allow_hosts=["api*.example"]),
                 ["agents.a.allow_hosts", "'api*.example'"], id="allow-hosts-inner-wildcard"),
    # Other profile fields.
    pytest.param(with_agent(project=5), ["agents.a.project", "5"], id="project-number"),
    pytest.param(with_agent(principal=""), ["agents.a.principal", "''"], id="principal-empty"),
    # Default agent.
    pytest.param({"default_agent": "ghost"}, ["default_agent", "'ghost'", "default"],
                 id="default-agent-unknown"),
    pytest.param({**AGENT, "default_agent": "ghost"}, ["default_agent", "'ghost'"],
                 id="default-agent-not-in-agents"),
    pytest.param({"default_agent": 5}, ["default_agent", "5"], id="default-agent-number"),
]


@pytest.mark.parametrize(("data", "expected"), INVALID)
def test_parse_rejects_invalid_value(data: object, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        config.parse(data)

    for fragment in expected:
        assert fragment in str(raised.value)


def test_parse_rejects_integer_host_address() -> None:
    with pytest.raises(ConfigError, match="network.hosts.bigquery.googleapis.com"):
        config.parse({"network": {"hosts": {"bigquery.googleapis.com": 10}}})


def test_parse_error_names_source_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "proxy:\n  port: 0\n")

    with pytest.raises(ConfigError) as raised:
        config.load(path)

    assert str(raised.value).startswith(f"{path}: proxy.port")


@pytest.mark.parametrize("pool", ["198.18.0.0/30", "10.0.0.0/8"])
def test_parse_accepts_pool(pool: str) -> None:
    assert config.parse({"network": {"pool": pool}}).pool == ipaddress.IPv4Network(pool)


@pytest.mark.parametrize("port", [1, 65535])
def test_parse_accepts_port_bounds(port: int) -> None:
    assert config.parse({"proxy": {"port": port}}).proxy_port == port


# -- profiles ------------------------------------------------------------------------------------


ALLOWS_HOST = [
    pytest.param(("bigquery.googleapis.com",), "bigquery.googleapis.com", True, id="exact"),
    pytest.param(("bigquery.googleapis.com",), "BigQuery.GoogleAPIs.com.", True,
                 id="exact-case-trailing-dot"),
    pytest.param(("bigquery.googleapis.com",), "evil.bigquery.googleapis.com", False,
                 id="exact-not-subdomain"),
    pytest.param(("bigquery.googleapis.com",), "bigquery.googleapis.com.evil", False,
                 id="exact-not-prefix"),
    pytest.param(("*.googleapis.com",), "bigquery.googleapis.com", True, id="wildcard-one"),
    pytest.param(("*.googleapis.com",), "a.b.googleapis.com", True, id="wildcard-deeper"),
    pytest.param(("*.googleapis.com",), "googleapis.com", False, id="wildcard-not-apex"),
    pytest.param(("*.googleapis.com",), "evilgoogleapis.com", False, id="wildcard-not-suffix"),
    pytest.param(("*",), "anything.example", True, id="star"),
    pytest.param((), "bigquery.googleapis.com", False, id="empty-list"),
]


@pytest.mark.parametrize(("patterns", "host", "allowed"), ALLOWS_HOST)
def test_allows_host_patterns(patterns: tuple[str, ...], host: str, allowed: bool) -> None:
    profile = AgentProfile(name="a", allow_hosts=patterns)

    assert profile.allows_host(host) is allowed


def test_profile_unknown_lists_defined() -> None:
    loaded = config.parse({"agents": {"zeta": {}, "alpha": {}}, "default_agent": "zeta"})

    with pytest.raises(ConfigError) as raised:
        loaded.profile("ghost")

    assert "'ghost'" in str(raised.value)
    assert "(defined: alpha, zeta)" in str(raised.value)


def test_profile_none_returns_default() -> None:
    loaded = config.parse({"agents": {"zeta": {}, "alpha": {}}, "default_agent": "alpha"})

    assert loaded.profile(None).name == "alpha"
