"""Credential substitution: the session's placeholder token becomes the principal's real token.

For each request that egress policy approved to a Google API host (`*.googleapis.com`,
`accounts.google.com`) the profile allows:

- the session's placeholder, in `Authorization: Bearer` or the `access_token` query parameter,
  is replaced by the real token the session's `TokenSource` minted (cached, refreshed before
  it expires, one refresh shared by concurrent requests, minted off the event loop);
- any other credential (a key or token the agent brought or minted itself, an API key, another
  session's placeholder) is rejected with 403 in Google's JSON error format.
- every call to Google's token services (oauth2, sts, the token methods of iamcredentials, the
  legacy /oauth2/ paths) is rejected the same way, because agents get tokens only from the
  session's metadata server.
- A rejection is recorded as a `blocked` event naming the credential's kind and fingerprint.
  An agent profile with `allow_foreign_credentials: true` lets such requests pass unchanged.
- a request without any credential passes unchanged.

Nothing else in the request changes: headers of credential features such as
`x-allowed-locations` and `x-goog-user-project` reach Google as the client sent them. Hosts
outside Google never receive the real token. Substitution happens on the request headers,
before any body is read, so it also holds for streamed requests.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass

from mitmproxy import http

from appliance.addons.common import flow_state, session_of
from appliance.context import Registry, SessionContext, fingerprint
from appliance.errors import CredentialError

logger = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "ya29.appliance-placeholder."
TOKEN_QUERY_PARAMETERS = ("access_token", "oauth_token")
API_KEY_HEADER = "x-goog-api-key"
# Methods of iamcredentials that mint or sign. Its other calls (allowedLocations) are reads.
IAM_TOKEN_METHODS = (":generateAccessToken", ":generateIdToken", ":signBlob", ":signJwt")
TOKEN_SERVICE_PREFIXES = ("oauth2.", "sts.")
# Body fields of token-service calls that contain the credential being exchanged.
TOKEN_CALL_SECRETS = ("assertion", "refresh_token", "subject_token", "client_secret", "code")


@dataclass(frozen=True)
class Presented:
    """One credential found in a request: its kind, where it sits, and its fingerprint."""

    kind: str
    location: str
    fingerprint: str

    def describe(self) -> str:
        return f"{self.kind} in {self.location} ({self.fingerprint})"


def is_google_api_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == "googleapis.com" or host.endswith(".googleapis.com") \
        or host == "accounts.google.com"


def token_service(host: str, path: str) -> str | None:
    """Return `host/path` when the request calls one of Google's token services, else None."""
    host = host.lower().rstrip(".")
    bare = urllib.parse.urlsplit(path).path
    if host.startswith(TOKEN_SERVICE_PREFIXES) and host.endswith(".googleapis.com"):
        return f"{host}{bare}"
    if host.startswith("iamcredentials.") and bare.endswith(IAM_TOKEN_METHODS):
        return f"{host}{bare}"
    if host == "accounts.google.com" and bare.startswith("/o/oauth2/"):
        return f"{host}{bare}"
    if host == "www.googleapis.com" and bare.startswith("/oauth2/"):
        return f"{host}{bare}"
    return None


def bearer_kind(token: str, placeholder: str) -> str:
    """Name the kind of a bearer token, from its shape alone."""
    if token == placeholder:
        return "placeholder"
    if token.startswith(PLACEHOLDER_PREFIX):
        return "placeholder of another session"
    if token.startswith("ya29."):
        return "OAuth access token"
    parts = token.split(".")
    if len(parts) == 3:
        claims = _jwt_claims(parts[1])
        issuer = claims.get("iss")
        if isinstance(issuer, str) and issuer == claims.get("sub") and "@" in issuer:
            return "self-signed service account JWT"
        return "JWT"
    return "bearer token"


def _jwt_claims(segment: str) -> dict[str, object]:
    import base64
    import binascii

    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def presented_credentials(request: http.Request, placeholder: str) -> list[Presented]:
    """List every credential the request carries, in headers and query, never their values."""
    found: list[Presented] = []
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            found.append(Presented(bearer_kind(value, placeholder), "authorization header",
                                   fingerprint(value)))
        else:
            found.append(Presented(f"{scheme.lower() or 'empty'} authorization",
                                   "authorization header", fingerprint(authorization.strip())))
    for name in TOKEN_QUERY_PARAMETERS:
        for value in request.query.get_all(name):
            found.append(Presented(bearer_kind(value, placeholder), f"query parameter {name}",
                                   fingerprint(value)))
    for value in request.headers.get_all(API_KEY_HEADER):
        found.append(Presented("API key", f"{API_KEY_HEADER} header", fingerprint(value)))
    for value in request.query.get_all("key"):
        found.append(Presented("API key", "query parameter key", fingerprint(value)))
    return found


def google_error(status: int, code: str, message: str, reason: str) -> http.Response:
    return http.Response.make(
        status,
        json.dumps({"error": {"code": status, "status": code, "message": message,
                              "errors": [{"reason": reason, "domain": "appliance",
                                          "message": message}]}}).encode(),
        {"Content-Type": "application/json; charset=UTF-8"},
    )


class CredentialSubstitution:
    """Swaps the placeholder for the real token and rejects every other credential."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.response is not None or state.get("local") or state.get("blocked") \
                or not state.get("approved"):
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        host = (flow.client_conn.sni or flow.request.pretty_host).lower().rstrip(".")
        if not is_google_api_host(host):
            return
        allow = context.profile.allow_foreign_credentials
        presented = presented_credentials(flow.request, context.placeholder_token)
        service = token_service(host, flow.request.path)
        foreign = [p for p in presented if p.kind != "placeholder"]
        if service is not None or foreign:
            description = (f"call to Google's token service {service}" if service is not None
                           else "foreign credential "
                           + ", ".join(p.describe() for p in foreign))
            if allow:
                logger.info("Session %s flow %s: passing %s through, as agent profile %s "
                            "allows", context.session_id, flow.id, description,
                            context.profile.name)
                state["foreign_credential"] = description
                return
            self._reject_foreign(flow, context, description, token_call=service is not None)
            return
        if presented:
            await self._substitute(flow, context, presented)

    def request(self, flow: http.HTTPFlow) -> None:
        """Add the kind and fingerprint of a rejected token call's body credential."""
        state = flow_state(flow)
        if not state.get("token_call"):
            return
        form = _form(flow.request)
        secrets = [f"{name} {fingerprint(form[name])}" for name in TOKEN_CALL_SECRETS
                   if form.get(name)]
        grant = form.get("grant_type")
        extra = ", ".join(([f"grant_type {grant}"] if grant else []) + secrets)
        if extra:
            state["blocked"] = f"{state['blocked']} [{extra}]"

    def response(self, flow: http.HTTPFlow) -> None:
        """After Google rejects a substituted token, make the next request mint a new one."""
        substituted = flow_state(flow).get("substituted")
        if substituted is None or flow.response is None or flow.response.status_code != 401:
            return
        context = session_of(self.registry, flow.client_conn)
        if context is not None and context.tokens is not None:
            context.tokens.invalidate(substituted)

    async def _substitute(self, flow: http.HTTPFlow, context: SessionContext,
                          presented: list[Presented]) -> None:
        state = flow_state(flow)
        if context.tokens is None:
            return self._reject(flow, context, 503, "UNAVAILABLE",
                                "the session has no credential source to mint a token",
                                "tokenUnavailable")
        try:
            token = await context.tokens.token()
        except CredentialError as error:
            logger.error("Session %s flow %s: no token for the request: %s",
                         context.session_id, flow.id, error)
            return self._reject(flow, context, 503, "UNAVAILABLE",
                                f"no token could be minted for principal "
                                f"{context.principal}: {error}", "tokenUnavailable")
        for item in presented:
            if item.location == "authorization header":
                flow.request.headers["authorization"] = f"Bearer {token.value}"
            else:
                name = item.location.removeprefix("query parameter ")
                flow.request.query[name] = token.value
        state["substituted"] = token.fingerprint
        logger.debug("Session %s flow %s: placeholder replaced by token %s for %s",
                     context.session_id, flow.id, token.fingerprint, context.principal)

    def _reject_foreign(self, flow: http.HTTPFlow, context: SessionContext, description: str,
                        token_call: bool) -> None:
        reason = (f"{description}: agents get tokens only from the session's metadata server"
                  if token_call else
                  f"{description}: requests to Google must carry the session's placeholder "
                  "token")
        reason += (f"; agent profile {context.profile.name!r} does not set "
                   "allow_foreign_credentials")
        self._reject(flow, context, 403, "PERMISSION_DENIED", reason,
                     "tokenServiceCall" if token_call else "foreignCredential")
        flow_state(flow)["token_call"] = token_call

    @staticmethod
    def _reject(flow: http.HTTPFlow, context: SessionContext, status: int, code: str,
                reason: str, error_reason: str) -> None:
        flow_state(flow)["blocked"] = reason
        logger.warning("Session %s flow %s: rejected %s %s: %s", context.session_id, flow.id,
                       flow.request.method, flow.request.pretty_host, reason)
        flow.response = google_error(status, code, f"Rejected by the session recorder: {reason}.",
                                     error_reason)


def _form(request: http.Request) -> dict[str, str]:
    """Return the fields of a form or JSON body, or {} for anything else."""
    content_type = request.headers.get("content-type", "")
    text = request.get_text(strict=False) or ""
    if "json" in content_type:
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return {k: v for k, v in value.items() if isinstance(v, str)} \
            if isinstance(value, dict) else {}
    return {k: v for k, v in urllib.parse.parse_qsl(text, keep_blank_values=True)}
