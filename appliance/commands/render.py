"""Shared parts of the command modules: the consoles, the common options and JSON output.

Data goes to stdout, as a rich table or text for people and as JSON with `--json` for
machines; messages go to stderr.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(stderr=True, soft_wrap=True, highlight=False)

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", help="YAML configuration file (default /etc/appliance/appliance.yaml, if it "
                     "exists).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _default(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def print_json(document: Any) -> None:
    """Write `document` to stdout as indented JSON and a newline."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False, default=_default) + "\n")


def print_json_line(document: Any) -> None:
    """Write `document` to stdout as one JSON line and flush, for streams such as tail."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, default=_default) + "\n")
    sys.stdout.flush()


def message(text: str) -> None:
    """Print one `appliance: ...` message line on stderr."""
    stderr.print(f"appliance: {text}", markup=False)
