"""`appliance doctor`: check that this host can run recorded sessions, with a fix per failure.

Exit codes: 0 when every check passed, 8 when any failed.
"""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from appliance import config as config_module
from appliance.commands.render import ConfigOption, JsonOption, message, print_json, stdout
from appliance.config import Config
from appliance.errors import ConfigError

EXIT_CHECK_FAILED = 8


def doctor(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Check this host can run sessions; print each check with its result and fix.

    Checks kernel features, versions, store and key permissions, the CA, the configuration
    and the reachability of the upstream.
    """
    from appliance import diagnostics

    config: Config | None = None
    config_error: ConfigError | None = None
    try:
        config = config_module.load(config_path)
    except ConfigError as error:
        config_error = error
    checks = diagnostics.run_all(config, config_error)
    failures = [check for check in checks if not check.ok]
    if as_json:
        print_json({"ok": not failures, "checks": [check.as_dict() for check in checks]})
    else:
        table = Table(show_lines=False)
        for column in ("check", "result", "detail and fix"):
            table.add_column(column, overflow="fold")
        for check in checks:
            detail = Text(check.detail)
            if not check.ok:
                detail.append("\nfix: " + check.fix, style="bold")
            table.add_row(Text(check.name), Text("pass", style="green") if check.ok
                          else Text("FAIL", style="bold red"), detail)
        stdout.print(table)
    if failures:
        message(f"{len(failures)} of {len(checks)} checks failed: "
                f"{', '.join(check.name for check in failures)}")
        raise typer.Exit(EXIT_CHECK_FAILED)
    message(f"all {len(checks)} checks passed")
