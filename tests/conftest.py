"""Markers shared by the whole suite.

e2e tests need root (namespaces, nftables) and the venvs that `make test` builds; without
root they are skipped with the reason named, never silently passed.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: e2e tests create namespaces and nftables rules")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
