"""The store's Ed25519 signing key: created at first use, private to root, public half exported.

The private key lives outside the store (default /etc/appliance/signing-key.pem, config key
`store.signing_key`), so a copy of the store never carries it. Its public half is written beside
the store as `signing-key.pub` for auditors, who should still compare its key id with one they
obtained independently: whoever can replace the store's files can replace that copy too.

Every signature covers a canonical JSON document whose `type` names what is signed (a session
digest, a prune record, a journal head), so a signature made for one kind of document never
verifies as another.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import StoreError
from appliance.recordings.journal import canonical

logger = logging.getLogger(__name__)

DEFAULT_SIGNING_KEY = Path("/etc/appliance/signing-key.pem")
PUBLIC_KEY_NAME = "signing-key.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the short, stable name of a public key: SHA-256 of its raw bytes, 32 hex digits."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


class Verifier:
    """Checks signatures with a public key; needs nothing but the key."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self.public_key = public_key
        self.key_id = key_id(public_key)

    def verify(self, document: dict[str, Any], signature: str) -> bool:
        try:
            self.public_key.verify(base64.b64decode(signature, validate=True),
                                   canonical(document))
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            return False
        return True


class Signer(Verifier):
    """Signs documents with the private key; only root can build one."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        super().__init__(private_key.public_key())
        self._private_key = private_key

    def sign(self, document: dict[str, Any]) -> str:
        return base64.b64encode(self._private_key.sign(canonical(document))).decode("ascii")


def load_public_key(path: Path) -> Verifier:
    """Read a PEM public key (as exported by the store or `appliance store public-key`)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as error:
        raise StoreError(f"Cannot read the public key {path}: {error.strerror}.") from error
    except ValueError as error:
        raise StoreError(f"{path} is not a PEM public key ({error}); pass the file that "
                         "'appliance store public-key' printed.") from error
    if not isinstance(key, Ed25519PublicKey):
        raise StoreError(f"{path} contains a {type(key).__name__}, not the Ed25519 public key of "
                         "an appliance store.")
    return Verifier(key)


def load_or_create(path: Path) -> Signer:
    """Return the signing key at `path`, generating it first if there is none."""
    if not path.exists():
        _create(path)
    return _load(path)


def _create(path: Path) -> None:
    """Write a new key atomically: a racing process either wins or loads ours, never half."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(partial, path)
        except FileExistsError:
            return  # Another process created it first; its key is the one used.
        logger.warning("Generated a new store signing key %s (key id %s)", path,
                       key_id(key.public_key()))
    except OSError as error:
        raise StoreError(f"Cannot create the signing key {path}: {error.strerror}. Run the "
                         "appliance as root, or set store.signing_key to a path root can "
                         "write.") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _load(path: Path) -> Signer:
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as error:
        raise StoreError(f"Cannot read the signing key {path}: {error.strerror}. It is "
                         "private to root; run the appliance as root.") from error
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise StoreError(
            f"The signing key {path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}), so it may have leaked. Make it private with "
            f"'chmod 600 {path}' if you are sure it did not, or move it aside so that a new "
            "key is generated.")
    if info.st_uid != os.geteuid():
        raise StoreError(f"The signing key {path} belongs to uid {info.st_uid}, not to the "
                         f"user running the appliance (uid {os.geteuid()}); chown it to root.")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise StoreError(f"The signing key {path} is not an unencrypted PEM private key "
                         f"({error}).") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise StoreError(f"The signing key {path} is a {type(key).__name__}, not Ed25519.")
    return Signer(key)


def export_public_key(signer: Verifier, target: Path) -> None:
    """Write the public key to `target` unless it already contains exactly that key."""
    pem = public_pem(signer.public_key)
    with contextlib.suppress(OSError):
        if target.read_bytes() == pem:
            return
    # A name of its own per writer: sessions starting together may export the key at once.
    partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        partial.write_bytes(pem)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except OSError as error:
        raise StoreError(f"Cannot export the public key to {target}: {error.strerror}.") \
            from error
