"""`appliance store ...` and `appliance sessions verify` through the real CLI (typer runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from appliance import cli
from appliance import config as config_module
from appliance.commands.verify import VERIFY_FAILED_EXIT
from appliance.errors import ConfigError
from appliance.recordings.store import Store

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({"store": {
        "path": str(tmp_path / "store"), "signing_key": str(tmp_path / "key.pem")}}))
    return path


def seal(tmp_path: Path, session_id: str) -> Path:
    store = Store(tmp_path / "store", signing_key=tmp_path / "key.pem")
    store.ensure()
    journal = store.open_journal(session_id)
    journal.append_sync({"kind": "session_start"})
    journal.close()
    try:
        return store.seal(session_id).parquet
    finally:
        journal.release()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli.app, list(args))
    return result.exit_code, result.output


def test_keygen_prints_key_id(config: Path, tmp_path: Path) -> None:
    code, output = invoke("store", "keygen", "--config", str(config), "--json")

    assert code == 0
    assert len(json.loads(output)["key_id"]) == 32
    assert (tmp_path / "store" / "signing-key.pub").exists()


def test_public_key_written_to_file(config: Path, tmp_path: Path) -> None:
    code, _ = invoke("store", "public-key", "--config", str(config), "--output",
                     str(tmp_path / "auditor.pub"))

    assert code == 0
    assert (tmp_path / "auditor.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize(("tamper", "expected"), [(False, 0), (True, VERIFY_FAILED_EXIT)])
def test_verify_exit_code(config: Path, tmp_path: Path, tamper: bool, expected: int) -> None:
    parquet = seal(tmp_path, "sess-cli")
    if tamper:
        parquet.unlink()

    code, output = invoke("sessions", "verify", "--all", "--config", str(config))

    assert code == expected
    assert ("file_missing" in output) is tamper


def test_verify_needs_session_or_all(config: Path) -> None:
    code, _ = invoke("sessions", "verify", "--config", str(config))

    assert code != 0


def test_prune_without_policy_rejected(config: Path, tmp_path: Path) -> None:
    seal(tmp_path, "sess-cli")

    result = runner.invoke(cli.app, ["store", "prune", "--config", str(config)])

    assert "No retention policy" in str(result.exception)


@pytest.mark.parametrize("days", [0, -3, "30", True])
def test_invalid_retention_days_rejected(days: object) -> None:
    with pytest.raises(ConfigError, match="store.retention_days"):
        config_module.parse({"store": {"retention_days": days}})


def test_store_keys_parsed() -> None:
    parsed = config_module.parse({"store": {"retention_days": 30,
                                            "signing_key": "/srv/keys/store.pem"}})

    assert parsed.retention_days == 30
    assert parsed.signing_key == Path("/srv/keys/store.pem")
