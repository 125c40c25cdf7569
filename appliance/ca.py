"""The appliance CA: the certificate agents trust so the proxy can read their TLS traffic.

The CA lives in `proxy.ca_dir`, written by mitmproxy's own certificate store on first use:
`mitmproxy-ca.pem` contains the private key and must stay private to root; `mitmproxy-ca-cert.pem`
is the public certificate, the only file this module ever hands out.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from mitmproxy.certs import CertStore
from mitmproxy.options import CONF_BASENAME, KEY_SIZE

from appliance.errors import ConfigError, PrivilegeError

CA_CERT_NAME = f"{CONF_BASENAME}-ca-cert.pem"
CA_KEY_NAME = f"{CONF_BASENAME}-ca.pem"


@dataclass(frozen=True)
class CertificateInfo:
    """The facts an operator needs to recognise the CA certificate."""

    path: Path
    subject: str
    issuer: str
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str
    pem: str

    def as_dict(self) -> dict[str, str]:
        return {
            "path": str(self.path),
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "sha256": self.sha256,
            "pem": self.pem,
        }


def ensure(ca_dir: Path) -> Path:
    """Return the CA certificate's path, creating the CA the way the proxy does if missing."""
    cert_path = ca_dir / CA_CERT_NAME
    if (ca_dir / CA_KEY_NAME).exists() and cert_path.exists():
        return cert_path
    if os.geteuid() != 0:
        raise PrivilegeError(f"The CA in {ca_dir} does not exist yet and only root may create "
                             "it; run the command as root.")
    try:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Sessions starting at once on a fresh machine would each write a different CA, and
        # agents given one certificate would then meet a proxy using another.
        lock_fd = os.open(ca_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            CertStore.from_store(ca_dir, CONF_BASENAME, KEY_SIZE)
        finally:
            os.close(lock_fd)
    except OSError as error:
        raise ConfigError(f"Cannot create the CA in {ca_dir}: {error.strerror}; check "
                          "proxy.ca_dir in the configuration.") from error
    return cert_path


def read(ca_dir: Path) -> CertificateInfo:
    """Read the public CA certificate (never the key) and describe it."""
    cert_path = ensure(ca_dir)
    try:
        pem = cert_path.read_bytes()
    except OSError as error:
        raise PrivilegeError(f"Cannot read the CA certificate {cert_path}: {error.strerror}; "
                             "run the command as root.") from error
    if b"PRIVATE KEY" in pem:
        # The public file must never carry a key; refuse rather than hand one out.
        raise ConfigError(f"{cert_path} contains a private key; replace it with the public "
                          "certificate only.")
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise ConfigError(f"{cert_path} is not a PEM certificate ({error}); remove the CA "
                          "files in proxy.ca_dir to have a new CA created.") from error
    return CertificateInfo(
        path=cert_path,
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        serial=format(certificate.serial_number, "x"),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        sha256=certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
        pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    )
