"""Fixtures shared by this directory's tests."""

from __future__ import annotations

# The testbed's stub token services on loopback, for tests that mint real tokens.
from tests.token_stubs import stubs  # noqa: F401
