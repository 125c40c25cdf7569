"""Small HTTPS servers of the testbed cloud besides BigQuery (standard library and cryptography).

- An echo server for "other host" and "other port" tests: HTTPS on --echo-address:443 and
  plain HTTP on --echo-address:--echo-plain-port. Any method and path gets 200 and a small
  JSON body describing the request.
- Google's token services on --token-address:443, speaking their real protocols against the
  test identities of --identities (a registry written by testbed/identities.py):
  - oauth2.googleapis.com `POST /token`: the JWT-bearer grant (RS256 assertion verified
    against the service account's registered public key) and the refresh-token grant (OAuth
    client and refresh token checked); `/tokeninfo` describes a token it issued;
  - sts.googleapis.com `POST /v1/token`: RFC 8693 token exchange of an OIDC subject token,
    verified against the workload identity provider's issuer, keys and audiences;
  - iamcredentials.googleapis.com `POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`:
    needs a valid caller token, checks the delegation chain against the registry's token
    creators, honours `scope`, `delegates` and `lifetime`.
  Access tokens are JWTs signed with HMAC-SHA256 under the registry's token secret; their
  `email` (or, for federated principals, `sub`) claim names the principal, which local-bigquery
  reads as the caller and the upstream's token check verifies. Errors use Google's formats.
  Each issued access token is logged on stdout as a fingerprint, never in full; with
  --issued-tokens, tests also get the tokens themselves in that file (mode 0600), so they can
  search recordings and logs for them.

The line "stubs ready" on stdout means every listener is bound. SIGTERM or SIGINT stops them.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import signal
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

TOKEN_LIFETIME = 3600
MAX_ASSERTION_LIFETIME = 3600
CLOCK_SKEW = 300
STUB_ISSUER = "https://oauth2.googleapis.com"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = ("urn:ietf:params:oauth:token-type:jwt",
                       "urn:ietf:params:oauth:token-type:id_token")
ASSERTION_AUDIENCES = ("https://oauth2.googleapis.com/token",
                       "https://www.googleapis.com/oauth2/v4/token",
                       "https://accounts.google.com/o/oauth2/token")
EMAIL_SCOPES = ("email", "https://www.googleapis.com/auth/userinfo.email")
GENERATE_ACCESS_TOKEN = re.compile(
    r"^/v1/projects/-/serviceAccounts/([^/:]+):generateAccessToken$"
)
DELEGATE = re.compile(r"^projects/-/serviceAccounts/([^/]+@[^/]+)$")
LIFETIME = re.compile(r"^(\d+)(?:\.\d+)?s$")
INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fingerprint(token: str) -> str:
    """The same short one-way fingerprint the appliance records."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return (header, claims) of a compact JWT without verifying it, or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims


def jwt_claims(token: str) -> dict[str, Any]:
    """Return the payload claims of a JWT without verifying it, or {} if it is not one."""
    parts = jwt_parts(token)
    return parts[1] if parts else {}


def sign_hs256(secret: bytes, claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "testbed-token"}).encode())
    payload = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(mac)}"


def verify_hs256(secret: bytes, token: str) -> dict[str, Any] | None:
    """Return the claims of an unexpired token signed under `secret`, else None."""
    parts = token.split(".")
    parsed = jwt_parts(token)
    if parsed is None or parsed[0].get("alg") != "HS256":
        return None
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        given = _unb64(parts[2])
    except (ValueError, binascii.Error):
        return None
    claims = parsed[1]
    if not hmac.compare_digest(expected, given) or not isinstance(claims.get("exp"), int):
        return None
    return claims if claims["exp"] > time.time() else None


def verify_rs256(public_pem: str, token: str) -> bool:
    """Tell whether a compact RS256 JWT carries a valid signature by `public_pem`'s key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = serialization.load_pem_public_key(public_pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    header, payload, signature = token.split(".")
    try:
        key.verify(_unb64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(),
                   hashes.SHA256())
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def member_of(claims: dict[str, Any]) -> str:
    """Return the IAM member string of a token's principal."""
    email = claims.get("email")
    if isinstance(email, str) and email:
        kind = "serviceAccount" if email.endswith(".gserviceaccount.com") else "user"
        return f"{kind}:{email}"
    return str(claims.get("sub", ""))


class Registry:
    """The test identities the token services know, loaded from registry.json."""

    def __init__(self, path: Path, issued_file: Path | None = None) -> None:
        self.issued_file = issued_file
        self._issued_lock = threading.Lock()
        data = json.loads(path.read_text())
        self.secret = Path(data["token_secret_file"]).read_text().strip().encode()
        self.service_accounts: dict[str, dict[str, Any]] = data["service_accounts"]
        self.clients: dict[str, dict[str, str]] = data["oauth_clients"]
        self.refresh_tokens: dict[str, dict[str, Any]] = data["refresh_tokens"]
        self.providers: dict[str, dict[str, Any]] = data["workload_providers"]
        self.token_creators: dict[str, list[str]] = data["token_creators"]

    def lifetime(self, principal: str, requested: int = TOKEN_LIFETIME) -> int:
        account = self.service_accounts.get(principal, {})
        return min(requested, int(account.get("token_lifetime", TOKEN_LIFETIME)))

    def issue(self, principal: str, scopes: list[str], lifetime: int, email: bool = True,
              **claims: Any) -> str:
        """Mint an access token for `principal` and log its fingerprint."""
        now = int(time.time())
        body = {"iss": STUB_ISSUER, "sub": principal, "azp": claims.pop("azp", principal),
                "scope": " ".join(scopes), "iat": now, "exp": now + lifetime,
                "jti": secrets.token_hex(8), "token_use": "access", **claims}
        if email:
            body["email"] = principal
        token = sign_hs256(self.secret, body)
        print(f"issued {fingerprint(token)} principal={principal} lifetime={lifetime}",
              flush=True)
        if self.issued_file is not None:
            with self._issued_lock, open(os.open(self.issued_file,
                                                 os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                                 0o600), "a") as file:
                file.write(token + "\n")
        return token


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "testbed-stub"
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        # The request line's query may hold a token (tokeninfo), so only the path is logged.
        line = re.sub(r"\?[^ ]*", "?…", format % args)
        sys.stderr.write(f"{getattr(self.server, 'name', 'stub')} {self.address_string()} {line}\n")

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(self, status: int, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def handle_any(self) -> None:
        raise NotImplementedError

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = lambda self: (
        self.handle_any()
    )


class EchoHandler(Handler):
    def handle_any(self) -> None:
        body = self.read_body()
        self.send_json(
            200,
            {
                "service": "echo",
                "tls": isinstance(self.connection, ssl.SSLSocket),
                "method": self.command,
                "host": self.headers.get("Host", ""),
                "path": self.path,
                "body_bytes": len(body),
            },
        )


def _form(body: bytes, content_type: str) -> dict[str, str]:
    if content_type.startswith("application/json"):
        try:
            value = json.loads(body or b"{}")
        except ValueError:
            return {}
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()} \
            if isinstance(value, dict) else {}
    return {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode(errors="replace")).items()}


class TokenHandler(Handler):
    """oauth2, sts and iamcredentials on one address, distinguished by Host and path."""

    @property
    def registry(self) -> Registry:
        registry: Registry = self.server.registry
        return registry

    def handle_any(self) -> None:
        body = self.read_body()
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        host = self.headers.get("Host", "").split(":")[0].lower()
        content_type = self.headers.get("Content-Type", "")
        if host.startswith("iamcredentials."):
            return self.iamcredentials(path, body)
        if path == "/tokeninfo" and self.command in ("GET", "POST"):
            form = {k: v[-1] for k, v in urllib.parse.parse_qs(split.query).items()}
            return self.tokeninfo({**form, **_form(body, content_type)})
        if self.command != "POST":
            return self.oauth_error(405, "invalid_request",
                                    f"{self.command} {path} is not supported; use POST")
        form = _form(body, content_type)
        if host.startswith("sts.") and path in ("/v1/token", "/v1beta/token"):
            return self.sts_token(form)
        if path in ("/token", "/oauth2/v4/token"):
            return self.oauth2_token(form)
        self.oauth_error(404, "invalid_request", f"no token endpoint at {host}{path}")

    # Error formats: OAuth 2.0 (RFC 6749 section 5.2) for oauth2 and sts, google.rpc.Status
    # JSON for iamcredentials.

    def oauth_error(self, status: int, error: str, description: str) -> None:
        self.send_json(status, {"error": error, "error_description": description})

    def rpc_error(self, code: int, status: str, message: str,
                  details: list[dict[str, Any]] | None = None) -> None:
        error: dict[str, Any] = {"code": code, "message": message, "status": status}
        if details:
            error["details"] = details
        headers = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'} \
            if code == 401 else None
        self.send_json(code, {"error": error}, headers)

    # oauth2.googleapis.com

    def oauth2_token(self, form: dict[str, str]) -> None:
        grant = form.get("grant_type", "")
        if grant == JWT_BEARER:
            return self.jwt_bearer(form.get("assertion", ""))
        if grant == "refresh_token":
            return self.refresh_grant(form)
        self.oauth_error(400, "unsupported_grant_type",
                         f"Invalid grant_type: {grant}" if grant else "Missing grant_type")

    def jwt_bearer(self, assertion: str) -> None:
        parsed = jwt_parts(assertion)
        if parsed is None:
            return self.oauth_error(400, "invalid_grant", "Invalid JWT: not a compact JWS.")
        header, claims = parsed
        issuer = str(claims.get("iss", ""))
        account = self.registry.service_accounts.get(issuer)
        if header.get("alg") != "RS256" or account is None:
            return self.oauth_error(400, "invalid_grant", "Invalid grant: account not found")
        public = account.get("keys", {}).get(header.get("kid"))
        if public is None or not verify_rs256(public, assertion):
            return self.oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        now = time.time()
        issued, expires = claims.get("iat"), claims.get("exp")
        if not isinstance(issued, int) or not isinstance(expires, int) \
                or expires - issued > MAX_ASSERTION_LIFETIME \
                or not issued - CLOCK_SKEW <= now <= expires:
            return self.oauth_error(
                400, "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim.")
        if claims.get("aud") not in ASSERTION_AUDIENCES:
            return self.oauth_error(400, "invalid_grant", "Invalid JWT: audience mismatch.")
        if claims.get("sub", issuer) != issuer:
            return self.oauth_error(
                401, "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client "
                "not authorized for any of the scopes requested.")
        if audience := claims.get("target_audience"):
            token = sign_hs256(self.registry.secret, {
                "iss": "https://accounts.google.com", "aud": audience, "azp": issuer,
                "email": issuer, "sub": issuer, "iat": int(now), "exp": int(now) + 3600})
            return self.send_json(200, {"id_token": token})
        scopes = str(claims.get("scope", "")).split()
        if not scopes:
            return self.oauth_error(400, "invalid_scope",
                                    "Invalid OAuth scope or ID token audience provided.")
        lifetime = self.registry.lifetime(issuer)
        self.send_json(200, {"access_token": self.registry.issue(issuer, scopes, lifetime),
                             "expires_in": lifetime, "token_type": "Bearer"})

    def refresh_grant(self, form: dict[str, str]) -> None:
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        if authorization := self.headers.get("Authorization", ""):
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "basic":
                client_id, _, client_secret = _unb64(value).decode().partition(":")
        client = self.registry.clients.get(client_id)
        if client is None:
            return self.oauth_error(401, "invalid_client", "The OAuth client was not found.")
        if not hmac.compare_digest(client["secret"], client_secret):
            return self.oauth_error(401, "invalid_client", "Unauthorized")
        grant = self.registry.refresh_tokens.get(form.get("refresh_token", ""))
        if grant is None or grant["client_id"] != client_id:
            return self.oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
        granted = list(grant["scopes"])
        requested = form.get("scope", "").split() or granted
        if not set(requested) <= set(granted):
            return self.oauth_error(400, "invalid_scope",
                                    "Some requested scopes were invalid. {invalid="
                                    f"{sorted(set(requested) - set(granted))}}}")
        lifetime = self.registry.lifetime(grant["email"])
        answer: dict[str, Any] = {
            "access_token": self.registry.issue(grant["email"], requested, lifetime,
                                                azp=client_id),
            "expires_in": lifetime,
            "scope": " ".join(requested),
            "token_type": "Bearer",
        }
        if "openid" in requested:
            now = int(time.time())
            answer["id_token"] = sign_hs256(self.registry.secret, {
                "iss": "https://accounts.google.com", "aud": client_id, "azp": client_id,
                "sub": grant["email"], "email": grant["email"], "email_verified": True,
                "iat": now, "exp": now + 3600})
        self.send_json(200, answer)

    def tokeninfo(self, form: dict[str, str]) -> None:
        claims = verify_hs256(self.registry.secret, form.get("access_token", ""))
        if claims is None or claims.get("token_use") != "access" or "email" not in claims:
            # Google's tokeninfo does not describe federated (STS) tokens either.
            return self.oauth_error(400, "invalid_token", "Invalid Value")
        scopes = str(claims.get("scope", ""))
        info = {"azp": claims.get("azp"), "aud": claims.get("azp"), "scope": scopes,
                "exp": str(claims["exp"]), "expires_in": str(int(claims["exp"] - time.time())),
                "access_type": "online"}
        if any(scope in EMAIL_SCOPES for scope in scopes.split()):
            info |= {"email": claims["email"], "email_verified": "true"}
        self.send_json(200, info)

    # sts.googleapis.com

    def sts_token(self, form: dict[str, str]) -> None:
        if form.get("grant_type") != TOKEN_EXCHANGE:
            return self.oauth_error(400, "unsupported_grant_type",
                                    f"Invalid value for \"grant_type\": "
                                    f"{form.get('grant_type')!r}.")
        if form.get("requested_token_type") != ACCESS_TOKEN_TYPE:
            return self.oauth_error(400, "invalid_request",
                                    "Invalid value for \"requested_token_type\".")
        if form.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
            return self.oauth_error(400, "invalid_request",
                                    f"The subject_token_type {form.get('subject_token_type')!r} "
                                    "is not supported by this provider.")
        provider = self.registry.providers.get(form.get("audience", ""))
        if provider is None:
            return self.oauth_error(
                400, "invalid_target",
                "The target service indicated by the \"audience\" parameters is invalid. This "
                "might either be because the pool or provider is disabled or deleted or because "
                "it doesn't exist.")
        scopes = form.get("scope", "").split()
        if not scopes:
            return self.oauth_error(400, "invalid_scope", "Scope(s) must be provided.")
        subject = form.get("subject_token", "")
        problem = self.subject_problem(provider, subject)
        if problem:
            return self.oauth_error(400, "invalid_grant", problem)
        claims = jwt_claims(subject)
        principal = f"principal://iam.googleapis.com/{provider['pool']}/subject/{claims['sub']}"
        lifetime = self.registry.lifetime(principal)
        self.send_json(200, {
            "access_token": self.registry.issue(principal, scopes, lifetime, email=False,
                                                azp=form["audience"]),
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": lifetime,
        })

    @staticmethod
    def subject_problem(provider: dict[str, Any], subject: str) -> str | None:
        """Return why an OIDC subject token is not acceptable to `provider`, or None."""
        parsed = jwt_parts(subject)
        if parsed is None:
            return "Unable to parse the ID Token."
        header, claims = parsed
        public = provider["keys"].get(header.get("kid"))
        if header.get("alg") != "RS256" or public is None or not verify_rs256(public, subject):
            return "Invalid ID Token signature."
        if claims.get("iss") != provider["issuer"]:
            return (f"The issuer in ID Token {claims.get('iss')!r} does not match the expected "
                    f"ones: {provider['issuer']}.")
        if claims.get("aud") not in provider["allowed_audiences"]:
            return (f"The audience in ID Token [{claims.get('aud')}] does not match the "
                    "expected audience.")
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= time.time():
            return "ID Token has expired."
        if not claims.get("sub"):
            return "The ID Token has no sub claim."
        return None

    # iamcredentials.googleapis.com

    def iamcredentials(self, path: str, body: bytes) -> None:
        match = GENERATE_ACCESS_TOKEN.match(path)
        if self.command != "POST" or not match:
            return self.rpc_error(404, "NOT_FOUND", f"Method {self.command} {path} not found.")
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        caller = verify_hs256(self.registry.secret, token) if scheme.lower() == "bearer" \
            else None
        if caller is None:
            return self.rpc_error(401, "UNAUTHENTICATED", INVALID_CREDENTIALS)
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self.rpc_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        target = urllib.parse.unquote(match[1])
        scopes = request.get("scope") or []
        if not isinstance(scopes, list) or not scopes:
            return self.rpc_error(400, "INVALID_ARGUMENT", "Scope required.")
        delegates = request.get("delegates") or []
        chain = []
        for delegate in delegates:
            found = DELEGATE.match(delegate) if isinstance(delegate, str) else None
            if found is None:
                return self.rpc_error(400, "INVALID_ARGUMENT",
                                      f"Invalid form of delegate {delegate!r}: use "
                                      "projects/-/serviceAccounts/EMAIL.")
            chain.append(found[1])
        lifetime_text = request.get("lifetime") or f"{TOKEN_LIFETIME}s"
        lifetime_match = LIFETIME.match(str(lifetime_text))
        if not lifetime_match or not 1 <= int(lifetime_match[1]) <= TOKEN_LIFETIME:
            return self.rpc_error(400, "INVALID_ARGUMENT",
                                  f"The lifetime {lifetime_text!r} must be between 1s and "
                                  f"{TOKEN_LIFETIME}s.")
        member = member_of(caller)
        for account in [*chain, target]:
            if account not in self.registry.service_accounts \
                    or member not in self.registry.token_creators.get(account, []):
                return self.rpc_error(
                    403, "PERMISSION_DENIED",
                    "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it "
                    "may not exist).",
                    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                      "reason": "IAM_PERMISSION_DENIED", "domain": "iam.googleapis.com",
                      "metadata": {"permission": "iam.serviceAccounts.getAccessToken"}}])
            member = f"serviceAccount:{account}"
        lifetime = self.registry.lifetime(target, int(lifetime_match[1]))
        token = self.registry.issue(target, [str(s) for s in scopes], lifetime,
                                    delegates=chain, act=member_of(caller))
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
        self.send_json(200, {"accessToken": token,
                             "expireTime": expires.strftime("%Y-%m-%dT%H:%M:%SZ")})


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, name: str, address: tuple[str, int], handler: type, tls: ssl.SSLContext | None,
        registry: Registry | None = None,
    ) -> None:
        self.name = name
        self.registry = registry
        super().__init__(address, handler)
        if tls is not None:
            # The handshake runs in the request thread, so a stalled client blocks no one.
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def handle_error(self, request: object, client_address: Any) -> None:
        error = sys.exc_info()[1]
        sys.stderr.write(f"{self.name} {client_address[0]} connection error: {error!r}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--echo-address", required=True)
    parser.add_argument("--echo-plain-port", type=int, default=8080)
    parser.add_argument("--token-address", required=True)
    parser.add_argument("--tls-port", type=int, default=443)
    parser.add_argument("--identities", required=True, type=Path,
                        help="registry.json written by testbed/identities.py")
    parser.add_argument("--issued-tokens", type=Path,
                        help="append every issued access token to this file (tests only)")
    args = parser.parse_args(argv)

    registry = Registry(args.identities, args.issued_tokens)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    tls.set_alpn_protocols(["http/1.1"])
    servers = [
        Server("echo-tls", (args.echo_address, args.tls_port), EchoHandler, tls),
        Server("echo-plain", (args.echo_address, args.echo_plain_port), EchoHandler, None),
        Server("token", (args.token_address, args.tls_port), TokenHandler, tls, registry),
    ]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _number, _frame: stop.set())
    threads = [
        threading.Thread(
            target=s.serve_forever, kwargs={"poll_interval": 0.1}, name=s.name, daemon=True
        )
        for s in servers
    ]
    for thread in threads:
        thread.start()
    print("stubs ready", flush=True)
    stop.wait()
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
