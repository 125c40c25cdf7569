"""Tests for the agent profile's BigQuery recording options: result rows and the job label."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.config import parse
from appliance.errors import ConfigError


def profile(**options: Any) -> Any:
    return parse({"default_agent": "a", "agents": {"a": options}}).agents["a"]


def test_defaults_keep_no_rows_and_label_jobs() -> None:
    loaded = profile()
    assert (loaded.record_result_rows, loaded.job_label_key) == (False, "appliance-session")


@pytest.mark.parametrize(("options", "field", "value"), [
    ({"record_result_rows": True}, "record_result_rows", True),
    ({"job_label_key": "recorder_run"}, "job_label_key", "recorder_run"),
    ({"job_label_key": None}, "job_label_key", None),
])
def test_options_are_read(options: dict[str, Any], field: str, value: Any) -> None:
    assert getattr(profile(**options), field) == value


@pytest.mark.parametrize(("options", "message"), [
    ({"record_result_rows": "yes"}, "agents.a.record_result_rows must be true or false"),
    ({"job_label_key": "Session"}, "agents.a.job_label_key 'Session' is not a BigQuery label"),
    ({"job_label_key": "1st"}, "agents.a.job_label_key '1st' is not a BigQuery label"),
])
def test_invalid_options_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        profile(**options)
