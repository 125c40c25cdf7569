"""Emulate the GCE metadata server for the agent, so unmodified clients find credentials.

Requests to 169.254.169.254:80 or metadata.google.internal are answered here and never leave
the appliance. As on GCE, a request needs `Metadata-Flavor: Google` and must not carry
`X-Forwarded-For`. The token served is the session's placeholder, which is worthless outside
the session and which the credential substitution addon replaces by the real token on the way
to Google; the email served is the principal that real token belongs to. Nothing real is ever
served. ID tokens (`identity`) are not issued: an agent has nothing to present one to through
the recorder.
"""

from __future__ import annotations

import json
import logging
import time

from mitmproxy import http

from appliance.addons.common import flow_state, session_of
from appliance.context import Registry, SessionContext

logger = logging.getLogger(__name__)

METADATA_ADDRESS = "169.254.169.254"
METADATA_HOSTS = frozenset({METADATA_ADDRESS, "metadata.google.internal", "metadata"})
PLACEHOLDER_LIFETIME_SECONDS = 3599
DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def is_metadata_flow(flow: http.HTTPFlow) -> bool:
    """Tell whether the agent addressed the metadata server, by destination or Host."""
    destination = flow.server_conn.address[0] if flow.server_conn.address else None
    # Clients also use the fully qualified form with a trailing dot.
    names = {(flow.request.host_header or "").rsplit(":", 1)[0].rstrip("."),
             flow.request.pretty_host.rstrip(".")}
    return destination == METADATA_ADDRESS or bool(names & METADATA_HOSTS)


class MetadataEmulator:
    """Serves metadata requests from the session's own data."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.issued_at: dict[str, float] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Mark metadata flows as answered locally before egress policy sees them."""
        if flow.response is None and is_metadata_flow(flow):
            flow_state(flow)["local"] = "metadata"

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow_state(flow).get("local") != "metadata":
            return
        context = session_of(self.registry, flow.client_conn)
        if context is None:
            return
        port = flow.server_conn.address[1] if flow.server_conn.address else None
        if flow.request.scheme != "http" or port != 80:
            flow.response = _text(404, "The metadata server listens on port 80 only.\n")
        elif flow.request.headers.get("metadata-flavor", "").lower() != "google":
            flow.response = _text(403, "Missing required header \"Metadata-Flavor\": "
                                       "\"Google\"\n")
        elif "x-forwarded-for" in flow.request.headers:
            flow.response = _text(403, "Request had an X-Forwarded-For header and was "
                                       "rejected.\n")
        else:
            flow.response = self._answer(context, flow.request.path)

    def _answer(self, context: SessionContext, full_path: str) -> http.Response:
        path, _, query = full_path.partition("?")
        account = _account(context)
        if path in ("", "/"):
            return _text(200, "computeMetadata/\n")
        if path in ("/computeMetadata", "/computeMetadata/"):
            return _text(200, "v1/\n")
        prefix = "/computeMetadata/v1/"
        if not path.startswith(prefix):
            return _text(404, "Not found\n")
        key = path[len(prefix):].rstrip("/")
        project = context.profile.project or ""
        if key == "project/project-id":
            return _text(200, project) if project else _text(404, "Not found\n")
        if key == "project/numeric-project-id":
            number = context.profile.project_number
            return _text(200, number) if number else _text(404, "Not found\n")
        if key == "project":
            return _text(200, "numeric-project-id\nproject-id\n")
        if key == "instance":
            # Only the service accounts of this instance exist here; clients probe this path
            # to detect the metadata server.
            return _text(200, "service-accounts/\n")
        if key == "universe/universe-domain":
            return _text(200, "googleapis.com")
        if key == "instance/service-accounts":
            return _text(200, f"default/\n{account}/\n")
        if key in ("instance/service-accounts/default", f"instance/service-accounts/{account}"):
            if "recursive=true" not in query:
                return _text(200, "aliases\nemail\nscopes\ntoken\n")
            return _json({"aliases": ["default"], "email": account,
                          "scopes": list(DEFAULT_SCOPES)})
        for alias in ("default", account):
            base = f"instance/service-accounts/{alias}/"
            if key.startswith(base):
                return self._service_account_field(context, key[len(base):], account)
        return _text(404, "Not found\n")

    def _service_account_field(self, context: SessionContext, field: str,
                               account: str) -> http.Response:
        if field == "email":
            return _text(200, account)
        if field == "aliases":
            return _text(200, "default\n")
        if field == "scopes":
            return _text(200, "\n".join(DEFAULT_SCOPES) + "\n")
        if field == "token":
            issued = self.issued_at.setdefault(context.session_id, time.time())
            remaining = PLACEHOLDER_LIFETIME_SECONDS - int(time.time() - issued) % \
                PLACEHOLDER_LIFETIME_SECONDS
            return _json({"access_token": context.placeholder_token, "expires_in": remaining,
                          "token_type": "Bearer"})
        if field == "identity":
            return _text(404, "ID tokens are not issued inside a recorded session.\n")
        return _text(404, "Not found\n")


def _account(context: SessionContext) -> str:
    """The email the agent sees: the real token's principal when it is a service account."""
    for candidate in (context.principal, context.profile.principal):
        if candidate and "@" in candidate and "/" not in candidate:
            return candidate
    return "default"


def _headers(content_type: str) -> dict[str, str]:
    return {"Metadata-Flavor": "Google", "Content-Type": content_type, "Server": "Metadata Server"}


def _text(status: int, body: str) -> http.Response:
    return http.Response.make(status, body.encode(), _headers("application/text"))


def _json(value: object) -> http.Response:
    return http.Response.make(200, json.dumps(value).encode(), _headers("application/json"))
