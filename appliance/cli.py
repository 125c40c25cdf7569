"""The `appliance` command line: thin typer commands that parse, call the library and render.

Data goes to stdout (tables for people, `--json` or `--csv` for machines); messages go to
stderr. Exit codes: 0 success; for `run`, the agent command's own exit code; 1 unexpected
error; 2 invalid configuration or arguments; 3 missing privilege or kernel feature; 4 network
or proxy setup failed; 5 store error; 6 session not found; 7 a recording failed its
integrity check (sessions show); 8 a doctor check failed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from appliance import config as config_module
from appliance import service
from appliance.commands import ca, doctor, sessions_extra
from appliance.commands import reconcile as reconcile_commands
from appliance.commands import serve as serve_command
from appliance.commands import store as store_commands
from appliance.commands import verify as verify_commands
from appliance.errors import ApplianceError, ConfigError

app = typer.Typer(help="Record what AI agents do to Google BigQuery.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
sessions_app = typer.Typer(help="Read recorded sessions.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
logger = logging.getLogger("appliance")

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", help="YAML configuration file (default /etc/appliance/appliance.yaml, if it "
                     "exists).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def main_options(
    log_level: Annotated[str, typer.Option(
        "--log-level", help="Log level for messages on stderr: debug, info, warning or error.")
    ] = "warning",
) -> None:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"{log_level!r} is not one of debug, info, warning, error.",
                                 param_hint="--log-level")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # mitmproxy logs every connection at INFO; keep it quieter than the appliance's own lines.
    logging.getLogger("mitmproxy").setLevel(max(level, logging.WARNING))
    # pyroute2 and asyncio log every netlink message and loop step at DEBUG, and pyroute2
    # resets its logger's level when imported, so their lines are filtered at the handler.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(("pyroute2",
                                                                             "asyncio"))


@app.command()
def run(
    agent_cmd: Annotated[str, typer.Option(
        "--agent-cmd", help="Shell command to run as the agent inside the recorded session.")],
    agent: Annotated[str | None, typer.Option(
        "--agent", help="Agent profile name from the configuration (default: default_agent).")
    ] = None,
    config_path: ConfigOption = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="Extra KEY=VALUE for the agent's environment; repeatable.")] = None,
    no_service: Annotated[bool, typer.Option(
        "--no-service", help="Run the session in this process even when 'appliance serve' "
                             "is running.")] = False,
) -> None:
    """Run an agent command inside a recorded session and exit with its exit code."""
    config = config_module.load(config_path)
    profile = config.profile(agent)
    if not no_service and service.available(config):
        raise typer.Exit(service.run_remote(
            config, config_path, agent, agent_cmd, Path.cwd(), _parse_env(env or []),
            lambda text: stderr.print(f"appliance: {text}", highlight=False)))
    from appliance.session import RunRequest, Session, operator_name

    request = RunRequest(command=agent_cmd, profile=profile, operator=operator_name(),
                         cwd=Path.cwd(), extra_env=_parse_env(env or []))
    session = Session(config, request)
    stderr.print(f"appliance: session {session.session_id} starting (agent profile "
                 f"{profile.name}, user {profile.user})", highlight=False)
    result = session.run()
    stderr.print(
        f"appliance: session {result.session_id} {result.status}: {result.statements} "
        f"statements, {result.events} events recorded in {result.duration:.1f} s; agent exit "
        f"code {result.exit_code}", highlight=False)
    raise typer.Exit(result.exit_code)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ConfigError(f"--env {pair!r} is not of the form KEY=VALUE.")
        result[name] = value
    return result


def _store(config_path: Path | None) -> Any:
    from appliance.recordings.store import Store

    return Store(config_module.load(config_path).store_path)


@sessions_app.command("list")
def sessions_list(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List recorded sessions, oldest first."""
    from appliance.recordings import replay

    result = replay.list_sessions(_store(config_path))
    _render(result.columns, result.rows, as_json, title=None)


@sessions_app.command("replay")
def sessions_replay(
    session_id: Annotated[str, typer.Argument(help="Session id, as printed by run and list.")],
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a session's statements in order, with identity, timestamps and outcomes."""
    from appliance.recordings import replay

    store = _store(config_path)
    session = replay.session_detail(store, session_id)
    statements = replay.statements(store, session_id)
    others = replay.other_events(store, session_id)
    if as_json:
        document = {
            "session": {k: replay.plain(v) for k, v in session.items()},
            "statements": [{k: replay.plain(v) for k, v in row.items()}
                           for row in statements.records()],
            "other_events": [{k: replay.plain(v) for k, v in row.items()}
                             for row in others.records()],
        }
        sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        return
    stdout.print(
        f"Session {session['session_id']} ({session['status']}, exit code "
        f"{session['exit_code']})\n"
        f"  agent {session['agent']}, principal {session['principal'] or '-'}, "
        f"unix user {session['unix_user']}, operator {session['operator']}\n"
        f"  started {replay.plain(session['started_at'])}, ended "
        f"{replay.plain(session['ended_at']) or '-'}\n"
        f"  command: {session['command']}", highlight=False)
    for row in statements.records():
        rows = row["rows_affected"] if row["rows_affected"] is not None else row["rows_returned"]
        outcome = row["outcome"] if row["outcome"] != "error" else \
            f"error ({row['error_reason']}: {row['error_message']})"
        stdout.print(
            f"{'!! DESTRUCTIVE ' if row.get('destructive') else ''}"
            f"#{row['statement_index']} {replay.plain(row['requested_at'])} "
            f"{row['api_method']} {row['statement_type'] or ''} "
            f"{'[dry run] ' if row['dry_run'] else ''}-> {outcome}"
            f"{f', {rows} rows' if rows is not None else ''}"
            f"{f', job {row['job_id']}' if row['job_id'] else ''}", highlight=False)
        if row["sql"]:
            stdout.print("    " + row["sql"].replace("\n", "\n    "), highlight=False)
        elif row["target"]:
            inserted = f" ({row['rows_inserted']} rows sent)" if row["rows_inserted"] else ""
            stdout.print(f"    {row['target']}{inserted}", highlight=False)
    if others.rows:
        stdout.print(f"Other events ({len(others.rows)}):", highlight=False)
        for row in others.records():
            reason = f" ({row['reason']})" if row["reason"] else ""
            stdout.print(f"  {replay.plain(row['ts'])} {row['kind']} {row['method'] or ''} "
                         f"{row['host'] or ''}{row['path'] or ''} {row['status'] or ''}{reason}",
                         highlight=False)


@sessions_app.command("query")
def sessions_query(
    sql: Annotated[str, typer.Argument(
        help="DuckDB SQL over the views sessions, statements and events.")],
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
) -> None:
    """Run SQL over the recordings and print the result."""
    from appliance.recordings import replay

    if as_json and as_csv:
        raise ConfigError("Choose one of --json and --csv.")
    result = replay.run_query(_store(config_path), sql)
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows([[replay.plain(v) for v in row] for row in result.rows])
        return
    _render(result.columns, result.rows, as_json, title=None)


def _render(columns: list[str], rows: list[tuple[Any, ...]], as_json: bool,
            title: str | None) -> None:
    from appliance.recordings.replay import plain

    if as_json:
        records = [{c: plain(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        sys.stdout.write(json.dumps(records, indent=2, ensure_ascii=False, default=str) + "\n")
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*["" if v is None else str(plain(v)) for v in row])
    stdout.print(table)


app.add_typer(ca.app, name="ca")
app.command("doctor")(doctor.doctor)
sessions_app.command("show")(sessions_extra.show)
sessions_app.command("tail")(sessions_extra.tail)
app.command("serve")(serve_command.serve)
sessions_app.command("verify")(verify_commands.verify)
sessions_app.command("reconcile")(reconcile_commands.reconcile)
app.add_typer(store_commands.app, name="store")


def main() -> None:
    """Run the CLI, turning appliance errors into one line on stderr and their exit code."""
    try:
        app()
    except ApplianceError as error:
        stderr.print(f"appliance: error: {error}", highlight=False, markup=False)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        stderr.print("appliance: interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
