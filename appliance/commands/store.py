"""`appliance store keygen|public-key|prune|export`: manage the store's key, retention and copies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import config as config_module
from appliance.commands.render import ConfigOption, JsonOption, message, print_json, stdout
from appliance.errors import ConfigError
from appliance.progress import progress

if TYPE_CHECKING:
    from appliance.recordings.store import Store

app = typer.Typer(help="Manage the recording store: signing key, retention and export.",
                  no_args_is_help=True)


def _store(config_path: Path | None) -> Store:
    from appliance.recordings.store import Store

    config = config_module.load(config_path)
    return Store(config.store_path, signing_key=config.signing_key)


@app.command("keygen")
def keygen(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Create the store's signing key if there is none, and export its public key."""
    store = _store(config_path)
    store.ensure()
    signer = store.signer
    if as_json:
        print_json({"key_id": signer.key_id, "private_key": store.signing_key,
                    "public_key": store.public_key_path})
        return
    stdout.print(f"Signing key {store.signing_key} (private to root), key id {signer.key_id}\n"
                 f"Public key exported to {store.public_key_path}", markup=False)


@app.command("public-key")
def public_key(
    output: Annotated[Path | None, typer.Option(
        "--output", help="Write the PEM public key to this file instead of stdout.")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Print the store's public key (PEM) for auditors, derived from the private key."""
    from appliance.recordings.signing import public_pem
    store = _store(config_path)
    pem = public_pem(store.signer.public_key)
    if output is None:
        sys.stdout.write(pem.decode("ascii"))
        return
    output.write_bytes(pem)
    message(f"public key {store.signer.key_id} written to {output}")


@app.command("prune")
def prune(
    older_than: Annotated[int | None, typer.Option(
        "--older-than", help="Remove sealed sessions whose last event is more than DAYS days "
                             "old (default: store.retention_days).", metavar="DAYS")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be removed, remove nothing.")] = False,
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove whole sealed sessions by the retention policy; each removal is signed."""
    from appliance.recordings import retention
    from appliance.recordings.store import Store

    config = config_module.load(config_path)
    days = older_than if older_than is not None else config.retention_days
    if days is None:
        raise ConfigError("No retention policy: set store.retention_days in the configuration "
                          "or pass --older-than DAYS.")
    source = "--older-than" if older_than is not None else "store.retention_days"
    store = Store(config.store_path, signing_key=config.signing_key)
    removed = retention.prune(store, days, f"older than {days} days ({source})", dry_run)
    if as_json:
        print_json({"dry_run": dry_run, "older_than_days": days,
                    "sessions": [item.as_dict() for item in removed]})
        return
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        stdout.print(f"{verb} session {item.session_id} ({item.file})", markup=False)
    message(f"{verb} {len(removed)} sessions older than {days} days")


@app.command("export")
def export(
    destination: Annotated[str, typer.Argument(
        help="Directory, or an object-store URL such as s3://bucket/prefix or "
             "gs://bucket/prefix.", metavar="DEST")],
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Copy sealed sessions, the digest chain and the public key to DEST, partitioned by date."""
    from appliance.recordings import export as export_module
    store = _store(config_path)
    with progress(f"Exporting sessions to {destination}"):
        result = export_module.export(store, destination, store.signer)
    if as_json:
        print_json(result.as_dict())
    else:
        message(f"exported {len(result.copied)} sessions to {destination} "
                f"({len(result.skipped)} already there, {len(result.refused)} refused because "
                "they do not match their signed digest), key "
                f"{result.key_id}")
    if result.refused:
        raise typer.Exit(7)
