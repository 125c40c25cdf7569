"""Credential sources of agent profiles, and the appliance's own outbound HTTPS.

An agent never has a real token. For each session the appliance mints one with google-auth,
from the source the agent profile names (`credentials.source`):

- `adc`: the appliance host's Application Default Credentials (`google.auth.default`);
- `impersonate`: IAM Credentials generateAccessToken for `target_principal`, through
  `delegates`, with the host's ADC or `file` as the source credential;
- `external_account`: workload identity federation (STS token exchange, optionally followed by
  service-account impersonation) from an external_account configuration `file`;
- `service_account_key`: a service account key `file`;
- `authorized_user`: a user's refresh token `file` (default: the operator's gcloud ADC file),
  for the per-user mode, where the operator who starts the run is the identity.

Credential files must be regular files owned by root (an authorized-user file may instead
belong to the operator) with no permission for group or others; anything else is refused
with a message that says how to fix it.

`TokenSource` caches the minted token and mints a new one shortly before it expires; from the
event loop, concurrent callers share one refresh, which runs in a worker thread.
`TokenSource.identify` finds the principal the token really belongs to. A token never appears
in a message or log line here; `fingerprint` stands in for it.

The appliance's own calls (token minting, reconcile) go through `outbound_session`: a requests
Session whose transport adapter resolves host names through `network.hosts` and verifies TLS
with `proxy.upstream_ca_file` when those are configured, and ignores proxy variables.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import logging
import os
import pwd
import stat
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import requests
import requests.adapters
from google.auth import impersonated_credentials
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from appliance.config import AgentProfile, Config
from appliance.context import fingerprint
from appliance.errors import CredentialError

logger = logging.getLogger(__name__)

DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TOKENINFO_URL = "https://oauth2.googleapis.com/tokeninfo"
# A token is replaced this long before it expires, or after three quarters of its lifetime
# when that comes sooner.
REFRESH_MARGIN_SECONDS = 300.0
# Google sends expires_in with every token; this covers a source that does not.
ASSUMED_LIFETIME_SECONDS = 3600.0
MAX_CREDENTIAL_FILE_BYTES = 1 << 20
GCLOUD_ADC_FILE = Path(".config/gcloud/application_default_credentials.json")
GCE_PRODUCT_NAME_FILE = Path("/sys/class/dmi/id/product_name")
EXTERNAL_ACCOUNT_URL_KEYS = ("token_url", "service_account_impersonation_url",
                             "token_info_url")
TIMEOUT_SECONDS = 30.0


# The appliance's outbound HTTPS.

class HostOverrideAdapter(requests.adapters.HTTPAdapter):
    """Connects overridden host names to their configured address, keeping SNI and Host.

    An override is an address, or `address:port` to change the port as well. TLS still
    verifies the certificate against the host name, not the address.
    """

    def __init__(self, overrides: Mapping[str, str]) -> None:
        self.overrides = {name.lower(): address for name, address in overrides.items()}
        super().__init__()

    def _address(self, url: str) -> tuple[str, str] | None:
        host = (urllib.parse.urlsplit(url).hostname or "").lower().rstrip(".")
        address = self.overrides.get(host)
        return None if address is None else (host, address)

    def get_connection_with_tls_context(self, request: requests.PreparedRequest,
                                        verify: bool | str | None,
                                        proxies: Mapping[str, str] | None = None,
                                        cert: Any = None) -> Any:
        override = self._address(request.url or "")
        if override is None:
            return super().get_connection_with_tls_context(
                request, True if verify is None else verify, dict(proxies) if proxies else None,
                cert)
        host, target = override
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(
            request, True if verify is None else verify, cert)
        address, _, port = target.partition(":")
        host_params = {**host_params, "host": address}
        if port:
            host_params["port"] = int(port)
        if host_params["scheme"] == "https":
            pool_kwargs = {**pool_kwargs, "server_hostname": host, "assert_hostname": host}
        return self.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)

    def add_headers(self, request: requests.PreparedRequest, **kwargs: Any) -> None:
        # urllib3 would otherwise name the pool's host, the address, in the Host header.
        if self._address(request.url or "") is not None and "Host" not in request.headers:
            request.headers["Host"] = urllib.parse.urlsplit(request.url or "").netloc


def outbound_session(config: Config) -> requests.Session:
    """Return a requests Session for the appliance's own calls to Google."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(config.upstream_ca_file) if config.upstream_ca_file else True
    adapter = HostOverrideAdapter(config.hosts)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def auth_request(config: Config) -> google.auth.transport.requests.Request:
    """Return the google-auth transport that reaches Google through `outbound_session`."""
    return google.auth.transport.requests.Request(session=outbound_session(config))


# Credential files.

def read_credential_file(path: Path, owner: str, allowed_uids: frozenset[int]) -> dict[str, Any]:
    """Read a credential JSON file that only root (or `allowed_uids`) can read.

    The file is opened without following a symbolic link and checked on the open descriptor,
    so it cannot be swapped between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialError(f"The credential file {path} of {owner} does not exist; create it "
                              "or correct credentials.file.") from None
    except OSError as error:
        raise CredentialError(f"Cannot open the credential file {path} of {owner}: "
                              f"{error.strerror}; name a regular file owned by root, not a "
                              "symbolic link.") from error
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise CredentialError(f"The credential file {path} of {owner} is not a regular "
                                  "file.")
        if status.st_uid not in allowed_uids:
            raise CredentialError(
                f"The credential file {path} of {owner} is owned by {_user_name(status.st_uid)}; "
                "it must be readable only by root: chown root:root "
                f"{path} && chmod 600 {path}.")
        if status.st_mode & 0o077:
            raise CredentialError(
                f"The credential file {path} of {owner} has mode "
                f"{stat.S_IMODE(status.st_mode):04o}, so group or others may read it; make it "
                f"readable only by its owner: chmod 600 {path}.")
        data = file.read(MAX_CREDENTIAL_FILE_BYTES + 1)
    if len(data) > MAX_CREDENTIAL_FILE_BYTES:
        raise CredentialError(f"The credential file {path} of {owner} is larger than 1 MiB; "
                              "it is not a Google credential file.")
    try:
        info = json.loads(data)
    except ValueError as error:
        raise CredentialError(f"The credential file {path} of {owner} is not valid JSON "
                              f"({error.__class__.__name__} at {getattr(error, 'pos', '?')}); "
                              "use the JSON file Google issued.") from None
    if not isinstance(info, dict) or not isinstance(info.get("type"), str):
        raise CredentialError(f"The credential file {path} of {owner} has no 'type'; it is not "
                              "a Google credential file.")
    return info


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _uid_of(user: str | None) -> int | None:
    if not user:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _expect_type(info: dict[str, Any], expected: tuple[str, ...], path: Path,
                 owner: str) -> None:
    if info["type"] not in expected:
        raise CredentialError(
            f"The credential file {path} of {owner} is of type {info['type']!r}, but its "
            f"credentials.source needs {' or '.join(repr(e) for e in expected)}.")


def _check_google_urls(info: dict[str, Any], path: Path, owner: str) -> None:
    """Refuse an external_account file whose endpoints are not Google's, which would leak
    the subject token or the federated token to another host."""
    for key in EXTERNAL_ACCOUNT_URL_KEYS:
        url = info.get(key)
        if url is None:
            continue
        parts = urllib.parse.urlsplit(str(url))
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" or not (host == "googleapis.com"
                                           or host.endswith(".googleapis.com")):
            raise CredentialError(f"The credential file {path} of {owner} sends {key} to "
                                  f"{url!r}, which is not an https://*.googleapis.com "
                                  "endpoint; use the file gcloud generates.")


def _check_subject_token_file(info: dict[str, Any], owner: str, agent_uid: int | None) -> None:
    source = info.get("credential_source")
    name = source.get("file") if isinstance(source, dict) else None
    if not isinstance(name, str):
        return
    try:
        status = os.stat(name)
    except OSError as error:
        raise CredentialError(f"The subject token file {name} of {owner} cannot be read: "
                              f"{error.strerror}.") from error
    if status.st_mode & 0o004 or (agent_uid is not None and status.st_uid == agent_uid):
        raise CredentialError(f"The subject token file {name} of {owner} is readable by the "
                              f"agent (mode {stat.S_IMODE(status.st_mode):04o}, owner "
                              f"{_user_name(status.st_uid)}); remove read permission for "
                              f"others: chmod o-r {name}.")


# Loading credentials through google-auth.

@dataclass
class _Loaded:
    credentials: google.auth.credentials.Credentials
    describe: str


def _from_info(info: dict[str, Any], scopes: tuple[str, ...] | None) -> Any:
    """Build google-auth credentials of any supported file type from its parsed JSON."""
    kind = info["type"]
    requested = list(scopes) if scopes else None
    if kind == "service_account":
        return service_account.Credentials.from_service_account_info(
            info, scopes=requested or list(DEFAULT_SCOPES))
    if kind == "authorized_user":
        return user_credentials.Credentials.from_authorized_user_info(info, scopes=requested)
    if kind == "external_account":
        # Dispatch as google.auth does, without its project lookup, which would call the
        # Resource Manager API on load.
        source = info.get("credential_source") or {}
        if info.get("subject_token_type") == "urn:ietf:params:aws:token-type:aws4_request":
            from google.auth import aws
            return aws.Credentials.from_info(info, scopes=requested or list(DEFAULT_SCOPES))
        if isinstance(source, dict) and source.get("executable") is not None:
            from google.auth import pluggable
            return pluggable.Credentials.from_info(info, scopes=requested or list(DEFAULT_SCOPES))
        from google.auth import identity_pool
        return identity_pool.Credentials.from_info(info, scopes=requested or list(DEFAULT_SCOPES))
    if kind == "external_account_authorized_user":
        from google.auth import external_account_authorized_user
        return external_account_authorized_user.Credentials.from_info(info)
    if kind == "impersonated_service_account":
        return impersonated_credentials.Credentials.from_impersonated_service_account_info(
            info, scopes=requested or list(DEFAULT_SCOPES))
    raise ValueError(f"credential type {kind!r} is not supported")


def _load_file(path: Path, owner: str, allowed: frozenset[int], expected: tuple[str, ...],
               scopes: tuple[str, ...] | None, agent_uid: int | None) -> Any:
    info = read_credential_file(path, owner, allowed)
    _expect_type(info, expected, path, owner)
    if info["type"] == "external_account":
        _check_google_urls(info, path, owner)
        _check_subject_token_file(info, owner, agent_uid)
    try:
        return _from_info(info, scopes)
    except (ValueError, KeyError, google.auth.exceptions.GoogleAuthError) as error:
        raise CredentialError(f"google-auth cannot load the credential file {path} of {owner}: "
                              f"{_describe(error)}.") from error


def _adc_may_exist() -> bool:
    """Tell whether the host's ADC can exist, without asking a metadata server.

    google-auth's last resort probes 169.254.169.254, which only makes sense on a GCE VM (or
    with an explicitly configured metadata host), so elsewhere the appliance fails at once.
    """
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    gcloud = os.environ.get("CLOUDSDK_CONFIG")
    adc_file = (Path(gcloud) / GCLOUD_ADC_FILE.name if gcloud
                else Path(os.path.expanduser("~")) / GCLOUD_ADC_FILE)
    if adc_file.exists():
        return True
    if os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP"):
        return True
    try:
        return GCE_PRODUCT_NAME_FILE.read_text().startswith("Google")
    except OSError:
        return False


def _host_adc(request: google.auth.transport.Request, owner: str,
              scopes: tuple[str, ...] | None) -> Any:
    named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if named:
        # The same rule as for configured files: the host's key must be root's alone.
        read_credential_file(Path(named), owner, frozenset({0}))
    if not _adc_may_exist():
        raise CredentialError(
            f"{owner} uses the host's Application Default Credentials, but there are none: "
            "GOOGLE_APPLICATION_CREDENTIALS is unset, root has no gcloud ADC file and this "
            "host is not a Google Compute Engine VM. Set GOOGLE_APPLICATION_CREDENTIALS for "
            "the appliance, run 'gcloud auth application-default login' as root, or choose "
            "another credentials.source.")
    try:
        credentials, _ = google.auth.default(scopes=list(scopes or DEFAULT_SCOPES),
                                             request=request)
    except google.auth.exceptions.GoogleAuthError as error:
        raise CredentialError(
            f"{owner} uses the host's Application Default Credentials, but google-auth found "
            f"none: {_describe(error)}. Set GOOGLE_APPLICATION_CREDENTIALS for the appliance, "
            "run 'gcloud auth application-default login' as root, or choose another "
            "credentials.source.") from error
    return credentials


def load_source(profile: AgentProfile, request: google.auth.transport.Request,
                operator: str | None = None, agent_uid: int | None = None) -> _Loaded:
    """Build the google-auth credentials of `profile`'s credential source.

    May contact Google (ADC on GCE asks the metadata server), so call it off the event loop.
    """
    settings = profile.credentials
    owner = f"agent profile {profile.name!r}"
    root_only = frozenset({0})
    operator_uid = _uid_of(operator)
    personal = root_only | ({operator_uid} if operator_uid is not None else set())
    personal -= {agent_uid} if agent_uid is not None else set()
    source = settings.source
    if source == "adc":
        return _Loaded(_host_adc(request, owner, settings.scopes),
                       "the host's Application Default Credentials")
    if source == "service_account_key":
        assert settings.file is not None
        return _Loaded(_load_file(settings.file, owner, root_only, ("service_account",),
                                  settings.scopes, agent_uid),
                       f"service account key {settings.file}")
    if source == "external_account":
        assert settings.file is not None
        return _Loaded(_load_file(settings.file, owner, root_only,
                                  ("external_account", "external_account_authorized_user"),
                                  settings.scopes, agent_uid),
                       f"workload identity federation ({settings.file})")
    if source == "authorized_user":
        path = settings.file or _operator_adc_file(operator, owner)
        return _Loaded(_load_file(path, owner, personal, ("authorized_user",), settings.scopes,
                                  agent_uid),
                       f"authorized user {path}")
    if source == "impersonate":
        assert settings.target_principal is not None
        if settings.file is not None:
            base = _load_file(settings.file, owner, personal,
                              ("service_account", "authorized_user", "external_account",
                               "external_account_authorized_user"), None, agent_uid)
            base_name = str(settings.file)
        else:
            base = _host_adc(request, owner, None)
            base_name = "the host's ADC"
        credentials = impersonated_credentials.Credentials(
            source_credentials=base,
            target_principal=settings.target_principal,
            target_scopes=list(settings.scopes or DEFAULT_SCOPES),
            delegates=[f"projects/-/serviceAccounts/{d}" for d in settings.delegates] or None,
        )
        chain = " -> ".join([base_name, *settings.delegates, settings.target_principal])
        return _Loaded(credentials, f"impersonation {chain}")
    raise CredentialError(f"{owner} names the unknown credentials.source {source!r}.")


def _operator_adc_file(operator: str | None, owner: str) -> Path:
    try:
        home = Path(pwd.getpwnam(operator or "").pw_dir)
    except KeyError:
        raise CredentialError(f"{owner} uses the operator's own credentials (source "
                              f"'authorized_user' without file), but the operator "
                              f"{operator!r} has no account on this host; set "
                              "credentials.file.") from None
    return home / GCLOUD_ADC_FILE


# Minting and caching.

@dataclass(frozen=True)
class MintedToken:
    """One real access token and when to replace it. `value` never goes to a log or record."""

    value: str = field(repr=False)
    issued_at: float
    expires_at: float

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value)

    @property
    def refresh_at(self) -> float:
        lifetime = max(self.expires_at - self.issued_at, 0.0)
        return self.expires_at - min(REFRESH_MARGIN_SECONDS, lifetime / 4)


@dataclass(frozen=True)
class Identity:
    """The principal a token belongs to, and how the appliance learned it."""

    principal: str
    determined_by: str


def _describe(error: BaseException) -> str:
    """Describe a google-auth error by its message and Google's error text, never a token."""
    parts = [str(error.args[0]) if error.args else error.__class__.__name__]
    for extra in error.args[1:2]:
        text = extra.decode(errors="replace") if isinstance(extra, bytes) else str(extra)
        try:
            body = json.loads(text)
        except ValueError:
            continue
        if not isinstance(body, dict):
            continue
        detail = body.get("error")
        if isinstance(detail, dict):
            parts.append(f"{detail.get('status', '')} {detail.get('message', '')}".strip())
        elif isinstance(detail, str):
            parts.append(f"{detail}: {body.get('error_description', '')}")
    return "; ".join(p for p in parts if p)


def _jwt_claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


class TokenSource:
    """The real token of one profile's principal: minted, cached and refreshed before expiry."""

    def __init__(self, loaded: _Loaded, request: google.auth.transport.Request,
                 owner: str) -> None:
        self.credentials: Any = loaded.credentials
        self.describe = loaded.describe
        self.request = request
        self.owner = owner
        self.mints = 0
        self._current: MintedToken | None = None
        self._lock = threading.Lock()
        self._pending: asyncio.Future[MintedToken] | None = None

    @classmethod
    def for_profile(cls, profile: AgentProfile, config: Config, operator: str | None = None,
                    agent_uid: int | None = None) -> TokenSource:
        """Load the profile's source; it may reach Google, so run it off the event loop."""
        request = auth_request(config)
        return cls(load_source(profile, request, operator, agent_uid), request,
                   f"agent profile {profile.name!r}")

    def _usable(self) -> MintedToken | None:
        current = self._current
        return current if current is not None and time.time() < current.refresh_at else None

    def token_sync(self) -> MintedToken:
        """Return a token valid for a while yet, minting one when needed (blocks)."""
        with self._lock:
            usable = self._usable()
            if usable is not None:
                return usable
            started = time.time()
            try:
                self.credentials.refresh(self.request)
            except (google.auth.exceptions.GoogleAuthError, requests.RequestException) as error:
                raise CredentialError(f"Minting a token for {self.owner} from {self.describe} "
                                      f"failed: {_describe(error)}.") from error
            value = self.credentials.token
            if not isinstance(value, str) or not value:
                raise CredentialError(f"google-auth returned no token for {self.owner} from "
                                      f"{self.describe}.")
            expiry = self.credentials.expiry
            expires_at = (expiry.replace(tzinfo=datetime.UTC).timestamp()
                          if isinstance(expiry, datetime.datetime)
                          else started + ASSUMED_LIFETIME_SECONDS)
            self._current = MintedToken(value, started, expires_at)
            self.mints += 1
            logger.info("Minted token %s for %s from %s, valid for %.0f s",
                        self._current.fingerprint, self.owner, self.describe,
                        expires_at - started)
            return self._current

    async def token(self) -> MintedToken:
        """Return a token from the event loop; concurrent callers share one refresh."""
        usable = self._usable()
        if usable is not None:
            return usable
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(asyncio.to_thread(self.token_sync))
        return await asyncio.shield(self._pending)

    def invalidate(self, token_fingerprint: str) -> None:
        """Forget the cached token if it is the one Google refused, so the next call mints."""
        current = self._current
        if current is not None and current.fingerprint == token_fingerprint:
            logger.warning("Token %s of %s was refused upstream; minting a new one next time",
                           token_fingerprint, self.owner)
            self._current = None

    def identify(self) -> Identity:
        """Return the principal the minted token belongs to (blocks; may call tokeninfo)."""
        token = self.token_sync()
        credentials = self.credentials
        if isinstance(credentials, impersonated_credentials.Credentials):
            return Identity(credentials.service_account_email, "impersonation target")
        email = getattr(credentials, "service_account_email", None)
        if isinstance(email, str) and "@" in email:
            return Identity(email, "service account of the credential")
        info = self._tokeninfo(token)
        if isinstance(info.get("email"), str) and info["email"]:
            return Identity(info["email"], "tokeninfo")
        federated = self._federated_principal()
        if federated is not None:
            return Identity(federated, "workload identity federation subject")
        account = getattr(credentials, "account", None)
        if isinstance(account, str) and account:
            return Identity(account, "account named in the credential file")
        raise CredentialError(
            f"Cannot tell which principal the token of {self.owner} belongs to: tokeninfo "
            "names no email. Add https://www.googleapis.com/auth/userinfo.email to "
            "credentials.scopes, or use a service account.")

    def _tokeninfo(self, token: MintedToken) -> dict[str, Any]:
        body = urllib.parse.urlencode({"access_token": token.value})
        try:
            response = self.request(url=TOKENINFO_URL, method="POST", body=body,
                                    headers={"Content-Type":
                                             "application/x-www-form-urlencoded"},
                                    timeout=TIMEOUT_SECONDS)
        except google.auth.exceptions.TransportError as error:
            logger.warning("tokeninfo for %s failed: %s", self.owner, _describe(error))
            return {}
        if response.status != 200:
            return {}
        try:
            info = json.loads(response.data)
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def _federated_principal(self) -> str | None:
        """Name the workload or workforce pool principal of an external_account subject.

        NOTE: this assumes the provider maps google.subject to the subject token's `sub`
        claim (the default for OIDC); a custom attribute mapping names another subject.
        """
        audience = getattr(self.credentials, "_audience", None)
        retrieve = getattr(self.credentials, "retrieve_subject_token", None)
        if not isinstance(audience, str) or retrieve is None:
            return None
        pool = audience.removeprefix("//iam.googleapis.com/").split("/providers/")[0]
        try:
            subject = _jwt_claims(retrieve(self.request)).get("sub")
        except google.auth.exceptions.GoogleAuthError:
            subject = None
        if isinstance(subject, str) and subject:
            return f"principal://iam.googleapis.com/{pool}/subject/{subject}"
        return f"principalSet://iam.googleapis.com/{pool}/*"
