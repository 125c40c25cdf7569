"""`appliance sessions show` and `appliance sessions tail`.

`show` prints one session's metadata, identity, counts and integrity, and exits with code 7
when its recording fails the integrity check. `tail` prints the statements of running sessions
as they are recorded. With `--follow` it keeps polling the live journals until Ctrl-C, or until
the one named session has ended.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from appliance import config as config_module
from appliance.commands.render import (
    ConfigOption,
    JsonOption,
    message,
    print_json,
    print_json_line,
    stdout,
)
from appliance.errors import NotFound

if TYPE_CHECKING:
    from appliance.recordings.store import Store

EXIT_INTEGRITY_FAILED = 7
POLL_SECONDS = 0.5

SessionArgument = Annotated[str, typer.Argument(help="Session id, as printed by run and list.")]


def _store(config_path: Any) -> Store:
    from appliance.recordings.store import Store

    store = Store(config_module.load(config_path).store_path)
    store.check_readable()
    return store


def show(session_id: SessionArgument, config_path: ConfigOption = None,
         as_json: JsonOption = False) -> None:
    """Show a session's metadata, identity, counts and integrity status."""
    from appliance import inspection

    document = inspection.describe(_store(config_path), session_id)
    integrity = document["integrity"]
    if as_json:
        print_json(document)
    else:
        _print_show(document)
    if integrity["status"] == "broken":
        raise typer.Exit(EXIT_INTEGRITY_FAILED)


def _print_show(document: dict[str, Any]) -> None:
    session, identity = document["session"], document["identity"]
    counts, integrity = document["counts"], document["integrity"]
    lines = [
        f"Session {session['session_id']}",
        f"  status       {session['status']}, exit code {_dash(session['exit_code'])}",
        f"  started      {session['started_at']}",
        f"  ended        {_dash(session['ended_at'])}",
        f"  agent        {session['agent']} (project {_dash(session['project'])})",
        f"  principal    {_dash(session['principal'])}",
        (f"  unix user    {identity.get('unix_user') or session['unix_user']} "
         f"(uid {_dash(identity.get('uid'))})"),
        f"  operator     {session['operator']}",
        f"  command      {session['command']}",
        f"  cwd          {_dash(identity.get('cwd'))}",
        (f"  network      {_dash(identity.get('namespace'))}, agent "
         f"{_dash(identity.get('agent_address'))}, proxy "
         f"{_dash(identity.get('proxy_address'))}"),
        f"  statements   {session['statements']} ("
        + (", ".join(f"{count} {outcome}" for outcome, count in
                     counts["statements_by_outcome"].items()) or "none") + ")",
        f"  events       {session['events']} ("
        + ", ".join(f"{count} {kind}" for kind, count in counts["events_by_kind"].items())
        + ")",
        (f"  integrity    {integrity['status']}: {integrity['checked_events']} events "
         f"checked against the {integrity['checked_by']}"),
    ]
    if integrity["sealed_file"]:
        lines.append(f"  file         {integrity['sealed_file']}")
    lines += [f"    problem: {problem}" for problem in integrity["problems"]]
    lines += [f"    notice: {notice}" for notice in integrity["notices"]]
    stdout.print("\n".join(lines), markup=False)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def tail(
    session_id: Annotated[str | None, typer.Argument(
        help="Only this session; default: every running session.")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new statements until Ctrl-C (or until SESSION "
                               "ends).")] = False,
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the statements of running sessions as they are recorded (JSON Lines with --json)."""
    from appliance import inspection
    from appliance.tail import Follower, StatementLines

    store = _store(config_path)
    lines = StatementLines()
    emit = _emit_json if as_json else _emit_text
    if session_id is not None and not store.journal_path(session_id).exists():
        # A finished session: print what it recorded, the same way, and stop.
        integrity = inspection.integrity(store, session_id)  # NotFound if it never existed.
        if integrity.sealed_file is None:
            raise NotFound(f"Session {session_id!r} has no journal or sealed file.")
        for event in inspection.sealed_events(store, session_id):
            record = lines.line(event)
            if record is not None:
                emit(record)
        return
    follower = Follower(store, session_id)
    try:
        while True:
            for event in follower.poll():
                record = lines.line(event)
                if record is not None:
                    emit(record)
            if not follow or (session_id is not None and not follower.following()):
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        message("stopped following")
    finally:
        follower.close()


def _timestamp(ts_ns: Any) -> str:
    if not isinstance(ts_ns, int):
        return "-"
    moment = datetime.datetime.fromtimestamp(ts_ns / 1e9, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _emit_json(record: dict[str, Any]) -> None:
    print_json_line({**record, "ts": _timestamp(record.get("ts_ns"))})


def _emit_text(record: dict[str, Any]) -> None:
    head = f"{_timestamp(record.get('ts_ns'))} {record['session_id']}"
    kind = record["kind"]
    if kind == "session_start":
        text = (f"{head} started: agent {record['agent']} as {record['unix_user']}: "
                f"{record['command']}")
    elif kind in ("session_end", "session_recovered"):
        text = f"{head} {'ended' if kind == 'session_end' else 'interrupted'}, exit code " \
               f"{_dash(record.get('exit_code'))}"
    elif kind in ("blocked", "flow_error"):
        text = f"{head} {kind} {record.get('host') or ''}{record.get('path') or ''} " \
               f"({_dash(record.get('reason'))})"
    elif "outcome" in record:
        rows = record["rows_affected"] if record["rows_affected"] is not None \
            else record["rows_returned"]
        error = f" ({record['error_reason']}: {record['error_message']})" \
            if record["outcome"] == "error" else ""
        text = (f"{head} {record['statement_id']} -> {record['outcome']}{error}"
                f"{' ' + record['statement_type'] if record['statement_type'] else ''}"
                f"{f', {rows} rows' if rows is not None else ''}")
    else:
        what = record.get("sql") or record.get("target") or ""
        dry = " [dry run]" if record.get("dry_run") else ""
        text = f"{head} {record['statement_id']} {record['api_method']}{dry}: " + \
            what.replace("\n", "\n    ")
    stdout.print(text, markup=False)
    stdout.file.flush()
