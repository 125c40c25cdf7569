"""Progress indicators on stderr for work that takes longer than a second.

Call sites wrap long work (sealing a large session, verifying every session, exporting) in
`progress(...)` and call `advance()` as items finish. Nothing is shown when the work ends within
`DELAY_SECONDS`, when stderr is not a terminal (pipes, CI, `--json` consumers), or when
`APPLIANCE_NO_PROGRESS` is set, so scripted output stays clean:

    with progress("Verifying sessions", total=len(ids)) as advance:
        for session_id in ids:
            verify(session_id)
            advance()
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

DELAY_SECONDS = 1.0
DISABLE_VARIABLE = "APPLIANCE_NO_PROGRESS"


def enabled() -> bool:
    """Tell whether progress may be drawn: stderr is a terminal, APPLIANCE_NO_PROGRESS unset."""
    return sys.stderr.isatty() and not os.environ.get(DISABLE_VARIABLE)


class _Delayed:
    """A rich Progress that appears only once the work has run for DELAY_SECONDS."""

    def __init__(self, description: str, total: int | None) -> None:
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns.append(TimeElapsedColumn())
        self.progress = Progress(*columns, console=Console(stderr=True), transient=True)
        self.task: TaskID = self.progress.add_task(description, total=total)
        self.lock = threading.Lock()
        self.shown = False
        self.finished = False
        self.timer = threading.Timer(DELAY_SECONDS, self.show)
        self.timer.daemon = True

    def show(self) -> None:
        with self.lock:
            if not self.finished:
                self.progress.start()
                self.shown = True

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.task, steps)

    def stop(self) -> None:
        self.timer.cancel()
        with self.lock:
            self.finished = True
            if self.shown:
                self.progress.stop()


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """Show `description` with a spinner (or a bar of `total` steps) after a second of work.

    Yields `advance(steps=1)`, which is safe to call whether or not anything is shown.
    """
    if not enabled():
        yield lambda steps=1: None
        return
    indicator = _Delayed(description, total)
    indicator.timer.start()
    try:
        yield indicator.advance
    finally:
        indicator.stop()
