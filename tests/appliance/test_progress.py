"""The progress helper: silent for pipes and when turned off, shown only after its delay."""

from __future__ import annotations

import io

import pytest

from appliance import progress as progress_module


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("tty", "disabled", "expected"), [
    (False, "", False),
    (True, "1", False),
    (True, "", True),
])
def test_enabled_only_on_terminal(monkeypatch: pytest.MonkeyPatch, tty: bool, disabled: str,
                                  expected: bool) -> None:
    monkeypatch.setattr("sys.stderr", Terminal() if tty else io.StringIO())
    monkeypatch.setenv(progress_module.DISABLE_VARIABLE, disabled)

    assert progress_module.enabled() is expected


def test_pipe_gets_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)

    with progress_module.progress("Working", total=3) as advance:
        advance()
        advance(2)

    assert stream.getvalue() == ""


def test_indicator_not_shown_before_delay() -> None:
    indicator = progress_module._Delayed("Working", total=2)

    indicator.advance()
    indicator.stop()

    assert not indicator.shown


def test_indicator_stops_once_shown() -> None:
    indicator = progress_module._Delayed("Working", total=None)

    indicator.show()
    indicator.stop()

    assert indicator.shown
    assert indicator.finished
    assert not indicator.progress.live.is_started


def test_show_after_stop_does_nothing() -> None:
    indicator = progress_module._Delayed("Working", total=None)

    indicator.stop()
    indicator.show()

    assert not indicator.shown
