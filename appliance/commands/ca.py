"""`appliance ca show|export`: hand out the appliance CA certificate, never its key.

Operators who build agent images bake this certificate into the image's trust store, so the
agent trusts the proxy without the appliance setting environment variables for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance import config as config_module
from appliance.commands.render import ConfigOption, JsonOption, message, print_json, stdout
from appliance.errors import ConfigError

app = typer.Typer(help="Show or export the appliance CA certificate (never its key).",
                  no_args_is_help=True)


@app.command("show")
def show(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Describe the CA certificate and print it in PEM form; create the CA if missing."""
    from appliance import ca as ca_module

    info = ca_module.read(config_module.load(config_path).ca_dir)
    if as_json:
        print_json(info.as_dict())
        return
    stdout.print(f"CA certificate {info.path}\n"
                 f"  subject   {info.subject}\n"
                 f"  issuer    {info.issuer}\n"
                 f"  serial    {info.serial}\n"
                 f"  valid     {info.not_before.isoformat()} to {info.not_after.isoformat()}\n"
                 f"  SHA-256   {info.sha256}", markup=False)
    sys.stdout.write(info.pem)


@app.command("export")
def export(
    target: Annotated[Path, typer.Argument(
        help="File to write the PEM certificate to, or - for stdout.")],
    config_path: ConfigOption = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite TARGET if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write the CA certificate (PEM, public part only) to a file for agent images."""
    from appliance import ca as ca_module

    info = ca_module.read(config_module.load(config_path).ca_dir)
    if str(target) == "-":
        sys.stdout.write(info.pem)
        return
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it or choose another "
                          "file.")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(info.pem)
    except OSError as error:
        raise ConfigError(f"Cannot write {target}: {error.strerror}.") from error
    if as_json:
        print_json({"path": str(target), "sha256": info.sha256, "subject": info.subject})
        return
    message(f"wrote the CA certificate (SHA-256 {info.sha256}) to {target}")
