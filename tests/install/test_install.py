"""scripts/install.sh, as `make install` and the Vagrant VM run it, on this machine.

The script installs into a temporary root (APPLIANCE_PREFIX, _BIN, _ETC, _STORE and
_SYSTEMD_DIR point there) with its own agent user, so the host's /opt/appliance and
/etc/appliance are never touched. The installed `appliance` then records a session against the
testbed cloud, and uninstalling removes what the install created, keeping the store unless
PURGE=1.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed.cloud import Cloud
from tests.e2e.conftest import REPO, session_id_of, write_config

pytestmark = pytest.mark.e2e


@dataclass
class Installation:
    root: Path
    env: dict[str, str]
    prefix: Path
    bin: Path
    etc: Path
    store: Path
    unit_dir: Path
    user: str

    @property
    def command(self) -> Path:
        return self.bin / "appliance"

    @property
    def config(self) -> Path:
        return self.etc / "appliance.yaml"

    def script(self, action: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(REPO / "scripts" / "install.sh"), action],
                              env={**self.env, **extra}, capture_output=True, text=True,
                              timeout=600, check=False)


def _remove_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    subprocess.run(["userdel", name], check=False)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installation]:
    # The agent user reads the runtime files and venv links under the root: keep it traversable.
    root = Path(tempfile.mkdtemp(prefix="appliance-install-", dir="/tmp"))
    root.chmod(0o755)
    user = f"apinst-{os.getpid()}"
    paths = {"prefix": root / "opt" / "appliance", "bin": root / "usr" / "local" / "bin",
             "etc": root / "etc" / "appliance", "store": root / "var" / "lib" / "appliance",
             "unit_dir": root / "etc" / "systemd" / "system"}
    env = {**os.environ, "APPLIANCE_PREFIX": str(paths["prefix"]),
           "APPLIANCE_BIN": str(paths["bin"]), "APPLIANCE_ETC": str(paths["etc"]),
           "APPLIANCE_STORE": str(paths["store"]),
           "APPLIANCE_SYSTEMD_DIR": str(paths["unit_dir"]), "APPLIANCE_AGENT_USER": user,
           "APPLIANCE_NO_SYSTEMCTL": "1"}
    installation = Installation(root, env, user=user, **paths)
    # install.sh installs the unit only where systemd's configuration directory exists.
    paths["unit_dir"].parent.mkdir(parents=True)
    try:
        result = installation.script("install")
        assert result.returncode == 0, result.stderr
        yield installation
    finally:
        installation.script("uninstall", PURGE="1")
        _remove_user(user)
        shutil.rmtree(root, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_command_links_into_own_venv(installed: Installation) -> None:
    target = Path(os.readlink(installed.command))

    assert target == installed.prefix / "venv" / "bin" / "appliance"
    assert subprocess.run([str(installed.command), "--help"], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.parametrize(("relative", "mode"), [
    ("store", 0o700),
    ("store/journal", 0o700),
    ("store/sessions", 0o700),
    ("etc/ca", 0o700),
    ("etc/ca/mitmproxy-ca.pem", 0o600),
    ("etc/signing-key.pem", 0o600),
    ("etc/appliance.yaml", 0o640),
])
def test_private_files_are_root_only(installed: Installation, relative: str,
                                     mode: int) -> None:
    base, _, rest = relative.partition("/")
    path = (installed.store if base == "store" else installed.etc) / rest

    assert _mode(path) == mode
    assert path.stat().st_uid == 0


def test_unit_runs_installed_command(installed: Installation) -> None:
    unit = (installed.unit_dir / "appliance.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))

    assert exec_start.split("=", 1)[1].split()[0] == str(installed.prefix / "venv" / "bin"
                                                         / "appliance")
    assert f"serve --config {installed.config}" in exec_start


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze to check the unit")
def test_unit_passes_systemd_analyze(installed: Installation) -> None:
    result = subprocess.run(["systemd-analyze", "verify",
                             str(installed.unit_dir / "appliance.service")],
                            capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr


def test_agent_user_is_unprivileged(installed: Installation) -> None:
    account = pwd.getpwnam(installed.user)

    assert account.pw_uid != 0
    assert account.pw_shell == "/usr/sbin/nologin"


def test_installed_config_names_installed_paths(installed: Installation) -> None:
    document = yaml.safe_load(installed.config.read_text())

    assert document["store"]["path"] == str(installed.store)
    assert document["proxy"]["ca_dir"] == str(installed.etc / "ca")
    assert document["agents"]["default"]["user"] == installed.user


def test_installed_appliance_records_session(installed: Installation, cloud: Cloud,
                                             agent_python: str, shared_dirs: dict[str, Path],
                                             workspace: Path) -> None:
    # The operator's edit: point the installed configuration at the testbed cloud.
    write_config(installed.config, cloud, installed.store, shared_dirs)
    document = yaml.safe_load(installed.config.read_text())
    document["store"]["signing_key"] = str(installed.etc / "signing-key.pem")
    document["proxy"]["ca_dir"] = str(installed.etc / "ca")
    for profile in document["agents"].values():
        profile["user"] = installed.user
    installed.config.write_text(yaml.safe_dump(document))
    shutil.copy(REPO / "examples" / "agent.py", workspace / "agent.py")
    path = f"{Path(agent_python).parent}:/usr/local/bin:/usr/bin:/bin"

    run = subprocess.run([str(installed.command), "run", "--config", str(installed.config),
                          "--agent-cmd", "python agent.py", "--env", f"PATH={path}",
                          "--env", "AGENT_DATASET=installed"],
                         cwd=workspace, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr
    shown = subprocess.run([str(installed.command), "sessions", "show", session_id_of(run),
                            "--json", "--config", str(installed.config)],
                           capture_output=True, text=True, timeout=120, check=False)
    document = json.loads(shown.stdout)

    assert document["integrity"]["status"] == "intact"
    assert document["identity"]["unix_user"] == installed.user
    assert document["session"]["statements"] > 0


def test_uninstall_keeps_store_unless_purged(installed: Installation) -> None:
    sessions_before = sorted(installed.store.glob("sessions/*/*.parquet"))

    kept = installed.script("uninstall")

    assert kept.returncode == 0, kept.stderr
    assert not installed.command.exists()
    assert not installed.prefix.exists()
    assert not (installed.unit_dir / "appliance.service").exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(installed.user)
    assert sorted(installed.store.glob("sessions/*/*.parquet")) == sessions_before
    assert (installed.etc / "ca" / "mitmproxy-ca.pem").exists()

    purged = installed.script("uninstall", PURGE="1")

    assert purged.returncode == 0, purged.stderr
    assert not installed.store.exists()
    assert not installed.etc.exists()
