"""The appliance CA: created once, even when several sessions start together."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from appliance import ca


def _create_ca(ca_dir: str) -> bytes:
    return ca.ensure(Path(ca_dir)).read_bytes()


def test_concurrent_first_starts_share_one_ca(tmp_path: Path) -> None:
    ca_dir = str(tmp_path / "ca")
    with multiprocessing.get_context("fork").Pool(8) as workers:
        certificates = workers.map(_create_ca, [ca_dir] * 16)
    assert len(set(certificates)) == 1


def test_ca_key_private_to_root(tmp_path: Path) -> None:
    ca.ensure(tmp_path / "ca")
    assert (tmp_path / "ca").stat().st_mode & 0o077 == 0
