"""The Vagrant VM, `make install` and the install test all use the one install step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_vagrant_provisions_with_install_script() -> None:
    vagrantfile = (REPO / "vagrant" / "Vagrantfile").read_text()

    assert "scripts/install.sh install" in vagrantfile
    assert "pytest -m e2e" in vagrantfile
    assert 'config.vm.box = BOX' in vagrantfile
    assert '"debian/trixie64"' in vagrantfile


@pytest.mark.parametrize(("target", "command"), [
    ("install", "scripts/install.sh install"),
    ("uninstall", "scripts/install.sh uninstall"),
])
def test_make_target_runs_install_script(target: str, command: str) -> None:
    dry_run = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True,
                             check=True)

    assert command in dry_run.stdout


def test_install_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")],
                            capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr


def test_install_script_requires_an_action() -> None:
    result = subprocess.run([str(REPO / "scripts" / "install.sh")], capture_output=True,
                            text=True, check=False)

    assert result.returncode == 2
    assert "usage" in result.stderr
