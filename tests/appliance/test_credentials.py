"""Tests of the credential sources: configuration, file rules, minting, caching, principals.

google-auth itself mints every token here, against the testbed's stub token services on
loopback (tests/token_stubs.py), reached at the real host names over verified TLS through the
appliance's own transport.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_module
from appliance import credentials as credentials_module
from appliance.config import AgentProfile, Config, CredentialsConfig
from appliance.credentials import (
    TokenSource,
    outbound_session,
    read_credential_file,
)
from appliance.errors import ConfigError, CredentialError
from testbed import identities as identities_module
from testbed import stub_servers
from testbed.cloud import make_certificates
from tests.token_stubs import ECHO, Stubs

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="credential files must be owned by root")


@pytest.fixture(autouse=True)
def no_metadata_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Aim google-auth's GCE probe at a closed loopback port, should it ever run."""
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


def _parse_profile(credentials: object, **extra: object) -> AgentProfile:
    parsed = config_module.parse({"agents": {"a": {"credentials": credentials, **extra}},
                                  "default_agent": "a"})
    return parsed.agents["a"]


# Configuration.

def test_credentials_default_to_host_adc() -> None:
    profile = _parse_profile(None)

    assert profile.credentials == CredentialsConfig(source="adc")
    assert profile.allow_foreign_credentials is False


def test_impersonation_config_parsed() -> None:
    profile = _parse_profile({
        "source": "impersonate", "target_principal": "t@p.iam.gserviceaccount.com",
        "delegates": ["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com"],
        "scopes": ["https://www.googleapis.com/auth/bigquery"]})

    assert profile.credentials == CredentialsConfig(
        source="impersonate", target_principal="t@p.iam.gserviceaccount.com",
        delegates=("d@p.iam.gserviceaccount.com",),
        scopes=("https://www.googleapis.com/auth/bigquery",))


@pytest.mark.parametrize(("credentials", "message"), [
    ({"source": "kerberos"}, "is not one of adc"),
    ({"source": "service_account_key"}, "file is required"),
    ({"source": "external_account"}, "file is required"),
    ({"source": "adc", "file": "/k.json"}, "not used with source 'adc'"),
    ({"source": "impersonate"}, "target_principal is required"),
    ({"source": "service_account_key", "file": "/k.json", "target_principal": "a@b.c"},
     "not used with any other source"),
    ({"source": "impersonate", "target_principal": "not-an-email"}, "not a service account"),
    ({"source": "adc", "delegates": ["a@b.c"]}, "only with source 'impersonate'"),
    ({"source": "impersonate", "target_principal": "a@b.c", "delegates": "a@b.c"},
     "must be a list"),
    ({"source": "adc", "scopes": ["bigquery"]}, "OAuth scope URLs"),
    ({"source": "adc", "scopes": []}, "non-empty list"),
    ({"source": "service_account_key", "file": "key.json"}, "absolute path"),
    ({"source": "adc", "token": "x"}, "unknown key agents.a.credentials.token"),
    ("adc", "must be a mapping"),
], ids=lambda value: str(value)[:40])
def test_invalid_credentials_config_rejected(credentials: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse_profile(credentials)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("allow_foreign_credentials", "yes", "must be true or false"),
    ("project_number", "12ab", "digits only"),
])
def test_invalid_credential_options_rejected(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse_profile(None, **{key: value})


def test_project_number_accepts_integer() -> None:
    assert _parse_profile(None, project_number=123456789012).project_number == "123456789012"


# Credential files.

def _key_copy(stubs: Stubs, tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "key.json"
    shutil.copy(stubs.identities.service_account_key, path)
    path.chmod(mode)
    return path


@needs_root
@pytest.mark.parametrize(("mode", "readable"), [(0o600, True), (0o400, True), (0o640, False),
                                                (0o604, False), (0o620, False)])
def test_credential_file_mode(stubs: Stubs, tmp_path: Path, mode: int, readable: bool) -> None:
    path = _key_copy(stubs, tmp_path, mode)
    if readable:
        assert read_credential_file(path, "test", frozenset({0}))["type"] == "service_account"
    else:
        with pytest.raises(CredentialError, match=f"mode {mode:04o}.*chmod 600"):
            read_credential_file(path, "test", frozenset({0}))


@needs_root
def test_credential_file_of_other_owner_rejected(stubs: Stubs, tmp_path: Path) -> None:
    path = _key_copy(stubs, tmp_path)
    os.chown(path, 65534, 65534)

    with pytest.raises(CredentialError, match="uid 65534.*chown root:root"):
        read_credential_file(path, "test", frozenset({0}))


def test_credential_file_symlink_rejected(stubs: Stubs, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(_key_copy(stubs, tmp_path))

    with pytest.raises(CredentialError, match="not a symbolic link"):
        read_credential_file(link, "test", frozenset({os.geteuid()}))


@pytest.mark.parametrize(("text", "message"), [("{not json", "not valid JSON"),
                                               ('{"kind": 1}', "has no 'type'")])
def test_credential_file_content_checked(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    path.chmod(0o600)

    with pytest.raises(CredentialError, match=message):
        read_credential_file(path, "test", frozenset({os.geteuid()}))


def test_missing_credential_file_named(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="missing.json of test does not exist"):
        read_credential_file(tmp_path / "missing.json", "test", frozenset({0}))


# The appliance's outbound transport.

def test_override_keeps_host_name_for_tls_and_host_header(stubs: Stubs,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy variable would send the request elsewhere if the session honoured it.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    session = outbound_session(Config(upstream_ca_file=stubs.ca,
                                      hosts={"example.test": f"{ECHO}:{stubs.tls_port}"}))

    echoed = session.get("https://example.test/probe", timeout=10).json()

    assert (echoed["host"], echoed["tls"], echoed["path"]) == ("example.test", True, "/probe")


def test_override_verifies_with_configured_ca(stubs: Stubs, tmp_path: Path) -> None:
    unrelated, _, _ = make_certificates(tmp_path / "tls", ["example.test"], [ECHO])
    session = outbound_session(Config(upstream_ca_file=unrelated,
                                      hosts={"example.test": f"{ECHO}:{stubs.tls_port}"}))

    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        session.get("https://example.test/", timeout=10)


# Sources, minting and principals.

def _profile(stubs: Stubs, source: str, file: Path | None = None, **extra: Any) -> AgentProfile:
    return AgentProfile(name="agent", credentials=CredentialsConfig(source=source, file=file,
                                                                    **extra))


def _sources(stubs: Stubs) -> dict[str, tuple[AgentProfile, str, str]]:
    ids = stubs.identities
    return {
        "service_account_key": (_profile(stubs, "service_account_key", ids.service_account_key),
                                ids.runner, "service account of the credential"),
        "authorized_user": (_profile(stubs, "authorized_user", ids.authorized_user),
                            identities_module.USER_EMAIL, "tokeninfo"),
        "external_account": (_profile(stubs, "external_account", ids.external_account),
                             ids.workload_principal, "workload identity federation subject"),
        "external_account_impersonating": (
            _profile(stubs, "external_account", ids.external_account_impersonating),
            ids.federated_agent, "service account of the credential"),
        "impersonate": (_profile(stubs, "impersonate", ids.service_account_key,
                                 target_principal=ids.analyst, delegates=(ids.delegate,)),
                        ids.analyst, "impersonation target"),
        "impersonate_from_user": (_profile(stubs, "impersonate", ids.authorized_user,
                                           target_principal=ids.analyst),
                                  ids.analyst, "impersonation target"),
    }


SOURCE_NAMES = ["service_account_key", "authorized_user", "external_account",
                "external_account_impersonating", "impersonate", "impersonate_from_user"]


@needs_root
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_source_mints_token_for_its_principal(stubs: Stubs, name: str) -> None:
    profile, principal, how = _sources(stubs)[name]
    source = TokenSource.for_profile(profile, stubs.config())

    identity = source.identify()
    token = source.token_sync()

    assert (identity.principal, identity.determined_by) == (principal, how)
    claims = stub_servers.verify_hs256(stubs.identities.token_secret.read_text().encode(),
                                       token.value)
    assert claims is not None and principal in (claims.get("email"), claims.get("sub"))


@needs_root
def test_host_adc_from_environment(stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(stubs.identities.service_account_key))

    source = TokenSource.for_profile(_profile(stubs, "adc"), stubs.config())

    assert source.identify().principal == stubs.identities.runner


def test_host_adc_missing_named(stubs: Stubs, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))

    with pytest.raises(CredentialError, match="absent.json of agent profile 'agent' does not "):
        TokenSource.for_profile(_profile(stubs, "adc"), stubs.config())


def test_host_adc_absent_without_metadata_probe(stubs: Stubs, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setattr(credentials_module, "GCE_PRODUCT_NAME_FILE", tmp_path / "product")

    def probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("google.auth.default ran and would probe the metadata server")

    monkeypatch.setattr(credentials_module.google.auth, "default", probe)

    with pytest.raises(CredentialError, match="not a Google Compute Engine VM"):
        TokenSource.for_profile(_profile(stubs, "adc"), stubs.config())


@needs_root
def test_wrong_file_type_rejected(stubs: Stubs) -> None:
    profile = _profile(stubs, "service_account_key", stubs.identities.authorized_user)

    with pytest.raises(CredentialError, match="of type 'authorized_user'.*'service_account'"):
        TokenSource.for_profile(profile, stubs.config())


@needs_root
def test_external_account_with_foreign_token_url_rejected(stubs: Stubs, tmp_path: Path) -> None:
    info = json.loads(stubs.identities.external_account.read_text())
    info["token_url"] = "https://sts.attacker.test/v1/token"
    path = tmp_path / "external.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)

    with pytest.raises(CredentialError, match="not an https://\\*.googleapis.com endpoint"):
        TokenSource.for_profile(_profile(stubs, "external_account", path), stubs.config())


@needs_root
def test_world_readable_subject_token_rejected(stubs: Stubs, tmp_path: Path) -> None:
    subject = tmp_path / "subject.jwt"
    shutil.copy(stubs.identities.subject_token, subject)
    subject.chmod(0o644)
    info = json.loads(stubs.identities.external_account.read_text())
    info["credential_source"] = {"file": str(subject)}
    path = tmp_path / "external.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)

    with pytest.raises(CredentialError, match="readable by the agent.*chmod o-r"):
        TokenSource.for_profile(_profile(stubs, "external_account", path), stubs.config())


@needs_root
def test_mint_failure_names_error_not_secret(stubs: Stubs, tmp_path: Path) -> None:
    info = json.loads(stubs.identities.authorized_user.read_text()) | {"client_secret": "nope"}
    path = tmp_path / "user.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    source = TokenSource.for_profile(_profile(stubs, "authorized_user", path), stubs.config())

    with pytest.raises(CredentialError) as raised:
        source.token_sync()

    assert "invalid_client" in str(raised.value)
    assert info["refresh_token"] not in str(raised.value)


@needs_root
def test_impersonation_refused_names_permission(stubs: Stubs) -> None:
    profile = _profile(stubs, "impersonate", stubs.identities.service_account_key,
                       target_principal=stubs.identities.locked)
    source = TokenSource.for_profile(profile, stubs.config())

    with pytest.raises(CredentialError, match="PERMISSION_DENIED"):
        source.token_sync()


@pytest.fixture
def runner_source(stubs: Stubs) -> TokenSource:
    if os.geteuid() != 0:
        pytest.skip("credential files must be owned by root")
    return TokenSource.for_profile(
        _profile(stubs, "service_account_key", stubs.identities.service_account_key),
        stubs.config())


def test_token_cached_between_calls(runner_source: TokenSource) -> None:
    first = runner_source.token_sync()

    assert runner_source.token_sync() is first
    assert runner_source.mints == 1


def test_token_replaced_before_expiry(runner_source: TokenSource,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = runner_source.token_sync()
    # The clock jumps to one second after the token's refresh point, still before it expires.
    later = types.SimpleNamespace(time=lambda: first.refresh_at + 1)
    monkeypatch.setattr(credentials_module, "time", later)

    second = runner_source.token_sync()

    assert first.refresh_at + 1 < first.expires_at
    assert second.fingerprint != first.fingerprint


def test_refresh_point_scales_with_short_lifetime() -> None:
    token = credentials_module.MintedToken("t", issued_at=100.0, expires_at=105.0)

    assert token.refresh_at == 103.75


def test_invalidated_token_minted_again(runner_source: TokenSource) -> None:
    first = runner_source.token_sync()

    runner_source.invalidate(first.fingerprint)

    assert runner_source.token_sync().fingerprint != first.fingerprint


def test_concurrent_requests_share_one_mint_off_the_loop(runner_source: TokenSource) -> None:
    started, released = threading.Event(), threading.Event()
    outcome: dict[str, bool] = {}
    original = runner_source.credentials.refresh

    def slow_refresh(request: Any) -> None:
        started.set()
        outcome["released"] = released.wait(10)
        original(request)

    runner_source.credentials.refresh = slow_refresh

    async def scenario() -> list[str]:
        waiting = asyncio.gather(*(runner_source.token() for _ in range(20)))
        # The loop keeps running while the mint is under way in its thread.
        await asyncio.to_thread(started.wait, 10)
        released.set()
        return [token.value for token in await waiting]

    values = asyncio.run(scenario())

    assert outcome["released"] is True
    assert runner_source.mints == 1
    assert len(set(values)) == 1


def test_token_never_in_repr(runner_source: TokenSource) -> None:
    token = runner_source.token_sync()

    assert token.value not in repr(token)

