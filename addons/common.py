"""Helpers the addons share: finding a flow's session and building event rows from flows."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mitmproxy import connection, http

from appliance.context import Registry, SessionContext, fingerprint

# Query parameters that carry credentials; their values are replaced by a fingerprint.
SECRET_QUERY_PARAMETERS = frozenset({"access_token", "key", "oauth_token", "token"})

# Request headers kept in an event's detail, because reviewers ask which client sent what.
RECORDED_HEADERS = ("user-agent", "x-goog-api-client", "x-goog-user-project",
                    "x-allowed-locations", "content-type", "content-encoding")

METADATA_KEY = "appliance"
AUTHORIZATION_SCHEMES = frozenset({"bearer", "basic", "negotiate", "digest"})


def session_of(registry: Registry, client: connection.Client) -> SessionContext | None:
    """Return the session of a client connection, found from its source address alone."""
    return registry.lookup(client.peername[0]) if client.peername else None


def address(value: tuple[str, int] | None) -> str | None:
    return f"{value[0]}:{value[1]}" if value else None


def redacted_path(path: str) -> str:
    """Return `path` with credential query parameters replaced by their fingerprints."""
    parts = urlsplit(path)
    if not parts.query:
        return path
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(name.lower() in SECRET_QUERY_PARAMETERS for name, _ in pairs):
        return path
    cleaned = [(name, fingerprint(value) if name.lower() in SECRET_QUERY_PARAMETERS else value)
               for name, value in pairs]
    return urlunsplit(parts._replace(query=urlencode(cleaned)))


def credential_of(request: http.Request) -> str | None:
    """Describe the credential a request carries as `kind:fingerprint`, never the secret."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, separator, value = authorization.strip().partition(" ")
        if separator and scheme.lower() in AUTHORIZATION_SCHEMES:
            return f"{scheme.lower()}:{fingerprint(value.strip())}"
        return f"unknown:{fingerprint(authorization.strip())}"
    for name in ("access_token", "oauth_token"):
        if request.query.get(name):
            return f"bearer:{fingerprint(request.query[name])}"
    value = request.headers.get("x-goog-api-key") or request.query.get("key")
    if value:
        return f"api-key:{fingerprint(value)}"
    return None


def flow_state(flow: http.HTTPFlow) -> dict[str, Any]:
    """Return the appliance's per-flow scratch space in the flow's metadata."""
    state: dict[str, Any] = flow.metadata.setdefault(METADATA_KEY, {})
    return state


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)
