"""The install test runs a real session, so it shares the e2e tests' fixtures.

Its cloud is its own: fixtures imported here are separate instances from those of
tests/e2e/conftest.py when both folders run in one session, so this cloud takes another subnet
(APPLIANCE_TEST_INSTALL_CLOUD_SUBNET) than the e2e cloud (APPLIANCE_TEST_CLOUD_SUBNET).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from testbed.cloud import Cloud
from tests.e2e.conftest import (  # noqa: F401  (fixtures, found by pytest under these names)
    _required_env,
    agent_python,
    no_leftovers,
    shared_dirs,
    workspace,
)

INSTALL_CLOUD_SUBNET = os.environ.get("APPLIANCE_TEST_INSTALL_CLOUD_SUBNET", "198.19.65.0/24")


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    upstream_python = _required_env("APPLIANCE_UPSTREAM_PYTHON")
    with Cloud(tmp_path_factory.mktemp("install-cloud"), upstream_python,
               subnet=INSTALL_CLOUD_SUBNET) as cloud:
        yield cloud
