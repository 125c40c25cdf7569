"""The install test runs a real session, so it shares the e2e tests' fixtures."""

from tests.e2e.conftest import (  # noqa: F401  (fixtures, found by pytest under these names)
    agent_python,
    cloud,
    no_leftovers,
    shared_dirs,
    workspace,
)
