"""Test identities of the testbed cloud: keys, credential files and the stub's registry.

`create(directory, project)` writes, with fresh keys each time:

- `registry.json`, which the stub token endpoints load: the public keys of the test service
  accounts and of the test OIDC identity provider, the OAuth client and refresh token of the
  test user, which callers may impersonate which service account, and per-principal token
  lifetimes;
- `token-secret`, the HMAC key the stub signs access tokens with and the upstream's token
  check verifies them with;
- one credential file per source the appliance supports, in Google's own formats
  (service account key, authorized user, external_account with and without service-account
  impersonation, and the OIDC subject token those read).

Secret files are written with mode 0600; the caller (root) owns them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TOKEN_URI = "https://oauth2.googleapis.com/token"
STS_URI = "https://sts.googleapis.com/v1/token"
IAM_BASE = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
PROJECT_NUMBER = "123456789012"
POOL = f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/testbed-pool"
PROVIDER_AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/testbed-oidc"
IDP_ISSUER = "https://idp.example.test"
WORKLOAD_SUBJECT = "ci-runner-7"
USER_EMAIL = "operator@example.test"
SHORT_LIFETIME = 5
USER_SCOPES = ("openid", "https://www.googleapis.com/auth/userinfo.email",
               "https://www.googleapis.com/auth/cloud-platform")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _write(path: Path, text: str, private: bool = True) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(path, 0o600 if private else 0o644)
    return path


def _pem(key: rsa.RSAPrivateKey) -> tuple[str, str]:
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public.decode()


def sign_rs256(key: rsa.RSAPrivateKey, kid: str, claims: dict[str, Any]) -> str:
    """Return a compact RS256 JWT over `claims`."""
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{_b64(signature)}"


@dataclass(frozen=True)
class Identities:
    """Paths and names of the test identities one cloud serves."""

    directory: Path
    project: str
    registry: Path
    token_secret: Path
    service_account_key: Path
    short_lived_key: Path
    authorized_user: Path
    external_account: Path
    external_account_impersonating: Path
    subject_token: Path

    @property
    def runner(self) -> str:
        """The service account whose key `service_account_key` holds."""
        return f"agent-runner@{self.project}.iam.gserviceaccount.com"

    @property
    def short_lived(self) -> str:
        """A service account whose tokens live SHORT_LIFETIME seconds."""
        return f"short-lived@{self.project}.iam.gserviceaccount.com"

    @property
    def analyst(self) -> str:
        """An impersonation target: runner and the delegate may mint its tokens."""
        return f"analyst-agent@{self.project}.iam.gserviceaccount.com"

    @property
    def delegate(self) -> str:
        """An intermediate account of a delegation chain runner -> delegate -> analyst."""
        return f"delegate-hop@{self.project}.iam.gserviceaccount.com"

    @property
    def demo_agent(self) -> str:
        """The principal `make demo` impersonates from the runner's key."""
        return f"demo-agent@{self.project}.iam.gserviceaccount.com"

    @property
    def locked(self) -> str:
        """A service account nobody may impersonate."""
        return f"locked@{self.project}.iam.gserviceaccount.com"

    @property
    def federated_agent(self) -> str:
        """The service account the workload identity pool's subject may impersonate."""
        return f"federated-agent@{self.project}.iam.gserviceaccount.com"

    @property
    def workload_principal(self) -> str:
        """The federated principal of the OIDC subject token."""
        return f"principal://iam.googleapis.com/{POOL}/subject/{WORKLOAD_SUBJECT}"


def _service_account_file(directory: Path, name: str, project: str,
                          key: rsa.RSAPrivateKey, kid: str) -> Path:
    private, _ = _pem(key)
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": kid,
        "private_key": private,
        "client_email": f"{name}@{project}.iam.gserviceaccount.com",
        "client_id": str(int.from_bytes(secrets.token_bytes(8), "big")),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": TOKEN_URI,
        "universe_domain": "googleapis.com",
    }
    return _write(directory / f"{name}.json", json.dumps(info, indent=2))


def _external_account(impersonate: str | None, subject_file: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": "external_account",
        "audience": PROVIDER_AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": STS_URI,
        "credential_source": {"file": str(subject_file)},
        "universe_domain": "googleapis.com",
    }
    if impersonate:
        info["service_account_impersonation_url"] = f"{IAM_BASE}{impersonate}:generateAccessToken"
    return info


def create(directory: Path, project: str) -> Identities:
    """Write fresh test identities for `project` into `directory` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    names = {"runner": "agent-runner", "short": "short-lived"}
    keys = {role: rsa.generate_private_key(public_exponent=65537, key_size=2048)
            for role in (*names, "idp")}
    kids = {role: secrets.token_hex(20) for role in keys}
    runner_file = _service_account_file(directory, names["runner"], project, keys["runner"],
                                        kids["runner"])
    short_file = _service_account_file(directory, names["short"], project, keys["short"],
                                       kids["short"])

    client_id = f"{secrets.token_hex(6)}-testbed.apps.googleusercontent.com"
    client_secret = secrets.token_urlsafe(18)
    refresh_token = "1//" + secrets.token_urlsafe(48)
    user_file = _write(directory / "authorized-user.json", json.dumps({
        "type": "authorized_user",
        "client_id": client_id,
        "client_secret": client_secret,
        "refresh_token": refresh_token,
        "universe_domain": "googleapis.com",
    }, indent=2))

    now = int(time.time())
    subject_token = sign_rs256(keys["idp"], kids["idp"], {
        "iss": IDP_ISSUER,
        "sub": WORKLOAD_SUBJECT,
        "aud": "https:" + PROVIDER_AUDIENCE,
        "iat": now,
        "exp": now + 30 * 86400,
    })
    subject_file = _write(directory / "subject-token.jwt", subject_token)
    external = _write(directory / "external-account.json",
                      json.dumps(_external_account(None, subject_file), indent=2))

    identities = Identities(
        directory=directory,
        project=project,
        registry=directory / "registry.json",
        token_secret=_write(directory / "token-secret", secrets.token_hex(32)),
        service_account_key=runner_file,
        short_lived_key=short_file,
        authorized_user=user_file,
        external_account=external,
        external_account_impersonating=directory / "external-account-impersonating.json",
        subject_token=subject_file,
    )
    _write(identities.external_account_impersonating,
           json.dumps(_external_account(identities.federated_agent, subject_file), indent=2))

    def public(role: str) -> dict[str, str]:
        return {kids[role]: _pem(keys[role])[1]}

    registry = {
        "token_secret_file": str(identities.token_secret),
        "service_accounts": {
            identities.runner: {"keys": public("runner")},
            identities.short_lived: {"keys": public("short"), "token_lifetime": SHORT_LIFETIME},
            identities.analyst: {},
            identities.delegate: {},
            identities.locked: {},
            identities.demo_agent: {},
            identities.federated_agent: {},
        },
        "oauth_clients": {client_id: {"secret": client_secret}},
        "refresh_tokens": {refresh_token: {"client_id": client_id, "email": USER_EMAIL,
                                           "scopes": list(USER_SCOPES)}},
        "workload_providers": {PROVIDER_AUDIENCE: {
            "pool": POOL,
            "issuer": IDP_ISSUER,
            "keys": public("idp"),
            "allowed_audiences": ["https:" + PROVIDER_AUDIENCE],
        }},
        # Who holds roles/iam.serviceAccountTokenCreator on which service account.
        "token_creators": {
            identities.analyst: [f"serviceAccount:{identities.runner}",
                                 f"serviceAccount:{identities.delegate}",
                                 f"user:{USER_EMAIL}"],
            identities.delegate: [f"serviceAccount:{identities.runner}"],
            identities.short_lived: [f"serviceAccount:{identities.runner}"],
            identities.demo_agent: [f"serviceAccount:{identities.runner}"],
            identities.federated_agent: [identities.workload_principal],
        },
    }
    _write(identities.registry, json.dumps(registry, indent=2))
    return identities
