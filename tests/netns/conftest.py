"""Fixtures for the netns tests: the addon tests' real journal and session context."""

from __future__ import annotations

from tests.addons.conftest import context, journal

__all__ = ["context", "journal"]
