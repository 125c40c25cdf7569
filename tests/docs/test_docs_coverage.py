"""Fail when a CLI command or option, a configuration key or a recorded column is undocumented.

- Commands and options: the click tree behind `appliance`, walked command by command; each
  command needs a heading naming it in docs/cli.md, and each of its options must appear in that
  heading's section.
- Configuration keys: the known-key sets that appliance/config.py validates against, with the
  prefix each is checked under, read from its `_reject_unknown` calls; each dotted key must
  appear in backticks in docs/configuration.md.
- Recorded columns: EVENT_COLUMNS and the columns of the `events`, `sessions` and `statements`
  views of an empty store; each must appear in backticks in its view's section of
  docs/recording-schema.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import typer

from appliance import cli
from appliance import config as config_module
from appliance.recordings.schema import EVENT_COLUMNS
from appliance.recordings.store import Store

DOCS = Path(__file__).resolve().parents[2] / "docs"
VIEWS = ("events", "sessions", "statements")


# -- reading the docs ------------------------------------------------------------------------


def sections(text: str) -> dict[str, str]:
    """Split Markdown into {heading text: body up to the next heading of any level}."""
    result: dict[str, str] = {}
    heading = ""
    for line in text.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            heading = match.group(1).replace("`", "")
            result.setdefault(heading, "")
        else:
            result[heading] = result.get(heading, "") + line + "\n"
    return result


def code_spans(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def missing_terms(terms: set[str], text: str) -> list[str]:
    """Return the terms that appear in no backtick span of `text`, nor as one's first word."""
    spans = code_spans(text)
    words = {span.split()[0] for span in spans if span.split()}
    return sorted(term for term in terms if term not in spans and term not in words)


# -- the things that must be documented ------------------------------------------------------


def commands() -> dict[str, Any]:
    """Return every runnable command of the CLI by its full name, e.g. 'appliance ca show'."""
    found: dict[str, Any] = {}

    # typer ships its own copy of click, so groups and options are recognised by shape.
    def walk(command: Any, name: str) -> None:
        if hasattr(command, "commands"):
            for child_name, child in command.commands.items():
                walk(child, f"{name} {child_name}")
        else:
            found[name] = command

    root = typer.main.get_command(cli.app)
    walk(root, "appliance")
    found["appliance"] = root
    return found


def option_names(command: Any) -> set[str]:
    names = set()
    for parameter in command.params:
        if parameter.param_type_name == "option":
            names.update(name for name in parameter.opts if name.startswith("--"))
    names.discard("--help")
    return names


def _prefix_of(node: ast.expr) -> str:
    """Render the prefix argument of a `_reject_unknown` call as a documented key prefix."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id == "prefix":
        return "agents.<name>."  # The profile parser's own prefix.
    if isinstance(node, ast.JoinedStr):
        return "".join(_prefix_of(part.value) if isinstance(part, ast.FormattedValue)
                       else _prefix_of(part) for part in node.values)
    raise AssertionError(f"cannot read the key prefix {ast.unparse(node)} in config.py; "
                         "extend _prefix_of")


def _names_in(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.BinOp):
        return _names_in(node.left) + _names_in(node.right)
    raise AssertionError(f"known keys given as {ast.unparse(node)} in config.py; use a "
                         "module-level *_KEYS constant")


def config_keys() -> set[str]:
    """Return every dotted key that config.py accepts, e.g. 'proxy.port', 'agents.<name>.user'."""
    tree = ast.parse(Path(config_module.__file__).read_text())
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_reject_unknown":
            prefix = _prefix_of(node.args[2])
            for name in _names_in(node.args[1]):
                known = getattr(config_module, name)
                keys.update(prefix + key for key in known)
    return keys


def view_columns(tmp_path: Path) -> dict[str, list[str]]:
    root = tmp_path / "store"
    root.mkdir()
    with Store(root).query_connection() as connection:
        return {view: [row[0] for row in connection.execute(f"DESCRIBE {view}").fetchall()]
                for view in VIEWS}


# -- the checker can fail ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "terms", "missing"), [
    ("`store.path` is ...", {"store.path"}, []),
    ("`--log-level LEVEL` sets ...", {"--log-level"}, []),
    ("store.path is ...", {"store.path"}, ["store.path"]),
    ("`store.pathx`", {"store.path"}, ["store.path"]),
    ("`--json` prints JSON", {"--json", "--csv"}, ["--csv"]),
])
def test_checker_finds_missing_terms(text: str, terms: set[str], missing: list[str]) -> None:
    assert missing_terms(terms, text) == missing


def test_sections_split_at_headings() -> None:
    text = "# `appliance run`\nuses `--agent`\n## `appliance ca show`\n`--json`\n"

    assert sections(text) == {"appliance run": "uses `--agent`\n",
                              "appliance ca show": "`--json`\n"}


def test_config_keys_include_nested_profile_keys() -> None:
    keys = config_keys()

    assert {"store.path", "proxy.port", "agents.<name>.user"} <= keys


# -- the coverage tests ------------------------------------------------------------------------


def test_every_command_has_a_section() -> None:
    documented = sections((DOCS / "cli.md").read_text())
    missing = sorted(name for name in commands() if name not in documented)
    assert missing == [], f"add a heading '## `NAME`' to docs/cli.md for: {missing}"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_option_documented(name: str) -> None:
    body = sections((DOCS / "cli.md").read_text()).get(name, "")
    missing = missing_terms(option_names(commands()[name]), body)
    assert missing == [], f"document these options of '{name}' in its docs/cli.md section"


def test_every_config_key_documented() -> None:
    missing = missing_terms(config_keys(), (DOCS / "configuration.md").read_text())
    assert missing == [], "document these keys in docs/configuration.md, in backticks"


def test_every_event_column_documented() -> None:
    body = sections((DOCS / "recording-schema.md").read_text()).get("events", "")
    missing = missing_terms(set(EVENT_COLUMNS), body)
    assert missing == [], "document these columns under '## events' in docs/recording-schema.md"


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_column_documented(view: str, tmp_path: Path) -> None:
    body = sections((DOCS / "recording-schema.md").read_text()).get(view, "")
    missing = missing_terms(set(view_columns(tmp_path)[view]), body)
    assert missing == [], f"document these columns under '## {view}' in " \
                          "docs/recording-schema.md"
