"""`appliance sessions verify`: check a store's chains, signatures and file hashes.

Exit codes: 0 when everything verifies (notices allowed), 7 when any failure was found, and the
CLI's usual codes for errors (2 arguments, 5 store unreadable, 6 session not found).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import config as config_module
from appliance.commands.render import ConfigOption, JsonOption, print_json, stdout
from appliance.errors import ConfigError
from appliance.progress import progress

if TYPE_CHECKING:
    from appliance.recordings.verify import Report

VERIFY_FAILED_EXIT = 7


def verify(
    session_id: Annotated[str | None, typer.Argument(
        help="Session id to verify; omit it and pass --all to verify the whole store.")] = None,
    every: Annotated[bool, typer.Option(
        "--all", help="Verify every session, the digest chain and the live journals.")] = False,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="The store's public key (PEM), obtained independently of the "
                             "store; default: the copy in the store.")] = None,
    store: Annotated[Path | None, typer.Option(
        "--store", help="Store directory, or a copy or export of one (default: store.path "
                        "of the configuration).")] = None,
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Verify recorded sessions: event chains, signatures, digests and file hashes."""
    from appliance.recordings import verify as verify_module

    if (session_id is None) == (not every):
        raise ConfigError("Name one session to verify, or pass --all (not both).")
    root = store if store is not None else config_module.load(config_path).store_path
    verifier, key_source = verify_module.find_public_key(root, public_key)
    with progress(f"Verifying {'the store' if every else session_id}"):
        report = verify_module.verify_store(root, verifier, key_source, session_id)
    if as_json:
        print_json(report.as_dict())
    else:
        _print(report)
    if not report.ok:
        raise typer.Exit(VERIFY_FAILED_EXIT)


def _print(report: Report) -> None:
    stdout.print(f"Store {report.store}, key {report.key_id} from {report.key_source}")
    if "store's own copy" in report.key_source:
        stdout.print("  note: the key came from the store itself; pass --public-key with a "
                     "copy kept elsewhere to rule out a replaced key")
    for finding in report.findings:
        stdout.print(f"{_label(finding.severity)} {finding.line()}", markup=False)
    for session in report.sessions:
        events = f", {session.events} events" if session.events is not None else ""
        status = f" {session.status}" if session.status else ""
        state = "ok   " if session.ok else "FAIL "
        stdout.print(f"{state} session {session.session_id}: {session.state}{status}{events}",
                     markup=False)
        for finding in session.findings:
            stdout.print(f"  {_label(finding.severity)} {finding.line()}", markup=False)
    failed = sum(1 for s in report.sessions if not s.ok)
    stdout.print(f"Digest chain: {report.digest_entries} entries, head "
                 f"{report.digest_head or '-'}")
    stdout.print(f"Result: {'OK' if report.ok else 'FAILED'}: {len(report.failures)} failures, "
                 f"{failed} of {len(report.sessions)} sessions failed.")


def _label(severity: str) -> str:
    return "FAIL " if severity == "failure" else "note "
