"""Tests for the paths the sandbox covers in the agent's mount namespace.

What the covering does to a running agent is tested end to end in
tests/e2e/test_adversarial.py; here only the choice of paths is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import AgentProfile, Config, CredentialsConfig
from appliance.sandbox import protected_paths

SESSION_DIR = Path("/run/appliance/sessions/0a1b2c3d")
WORK_DIR = Path("/home/operator/agent")


def config(**overrides: object) -> Config:
    profile = AgentProfile(name="analyst", credentials=CredentialsConfig(
        source="service_account_key", file=Path("/etc/keys/analyst.json")))
    values: dict[str, object] = {
        "store_path": Path("/var/lib/appliance"),
        "ca_dir": Path("/etc/appliance/ca"),
        "signing_key": Path("/etc/appliance/signing-key.pem"),
        "runtime_dir": Path("/run/appliance"),
        "source": Path("/srv/appliance.yaml"),
        "agents": {"analyst": profile},
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


def test_appliance_secrets_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    hidden = protected_paths(config(), [SESSION_DIR, WORK_DIR])

    assert hidden == ["/var/lib/appliance", "/etc/appliance/ca", "/etc/appliance/signing-key.pem",
                      "/run/appliance/pool", "/etc/appliance", "/srv/appliance.yaml",
                      "/etc/keys/analyst.json"]


def test_application_default_credentials_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/root/adc.json")

    assert "/root/adc.json" in protected_paths(config(), [SESSION_DIR])


@pytest.mark.parametrize("overrides, kept", [
    ({"store_path": Path("/run")}, "/run"),
    ({"ca_dir": WORK_DIR.parent}, str(WORK_DIR.parent)),
    ({"signing_key": WORK_DIR}, str(WORK_DIR)),
])
def test_path_holding_session_files_kept(monkeypatch: pytest.MonkeyPatch,
                                         overrides: dict[str, object], kept: str) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    assert kept not in protected_paths(config(**overrides), [SESSION_DIR, WORK_DIR])


def test_duplicates_listed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    hidden = protected_paths(config(ca_dir=Path("/etc/appliance")), [SESSION_DIR])

    assert hidden.count("/etc/appliance") == 1
