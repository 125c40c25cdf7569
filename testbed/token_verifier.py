"""The testbed upstream's token check: BigQuery accepts only tokens Google's services issued.

local-bigquery reads the caller from a bearer token's claims but never verifies it. Wrapped
in `RestVerifier` (ASGI) and `GrpcVerifier` (a gRPC server interceptor), the upstream
answers a request whose token is missing, unsigned, forged or expired as Google does: HTTP 401
with Google's JSON error, or gRPC UNAUTHENTICATED. A valid token is one the testbed's stub token
services signed (HMAC-SHA256 under the shared token secret) and that has not expired.

Every decision is logged on stderr as one line `token-check accepted|rejected sha256:... ...`,
with the token's fingerprint only, so a test can compare what the upstream saw with what the
stubs issued. Standard library only: it runs in the upstream venv.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

UNAUTHENTICATED = {
    "error": {
        "code": 401,
        "message": "Request had invalid authentication credentials. Expected OAuth 2 access "
                   "token, login cookie or other valid authentication credential. See "
                   "https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "errors": [{"message": "Invalid Credentials", "domain": "global", "reason": "authError",
                    "location": "Authorization", "locationType": "header"}],
        "status": "UNAUTHENTICATED",
    }
}
# Google serves its discovery documents without credentials.
OPEN_PATHS = ("/$discovery/rest", "/discovery/v1/apis/")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fingerprint(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


class TokenChecker:
    """Verifies bearer tokens against the stub token services' secret."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def problem(self, authorization: str | None) -> tuple[str | None, str | None]:
        """Return (fingerprint, why the credential is refused or None when it is valid)."""
        if not authorization:
            return None, "no Authorization header"
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, f"scheme {scheme!r} is not Bearer"
        print_id = fingerprint(token)
        parts = token.split(".")
        if len(parts) != 3:
            return print_id, "not a token the token services issued"
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (ValueError, binascii.Error):
            return print_id, "not a token the token services issued"
        if not isinstance(header, dict) or header.get("alg") != "HS256" \
                or not isinstance(claims, dict):
            return print_id, "not a token the token services issued"
        expected = hmac.new(self.secret, f"{parts[0]}.{parts[1]}".encode(),
                            hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            return print_id, "bad signature"
        if claims.get("token_use") != "access":
            return print_id, "not an access token"
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= time.time():
            return print_id, "expired"
        return print_id, None

    def check(self, authorization: str | None, where: str) -> bool:
        print_id, reason = self.problem(authorization)
        verdict = "accepted" if reason is None else "rejected"
        sys.stderr.write(f"token-check {verdict} {print_id or '-'} {where}"
                         f"{'' if reason is None else ': ' + reason}\n")
        sys.stderr.flush()
        return reason is None


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RestVerifier:
    """ASGI middleware that answers 401 before the app sees an unauthenticated request."""

    def __init__(self, app: Any, checker: TokenChecker) -> None:
        self.app = app
        self.checker = checker

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        if self.checker.check(authorization, f"{scope['method']} {scope['path']}"):
            return await self.app(scope, receive, send)
        body = json.dumps(UNAUTHENTICATED).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json; charset=UTF-8"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", (b'Bearer realm="https://accounts.google.com/", '
                                   b'error="invalid_token"')),
        ]})
        await send({"type": "http.response.body", "body": body})


def grpc_interceptor(checker: TokenChecker) -> Any:
    """Return a grpc.ServerInterceptor that aborts calls without a valid token."""
    import grpc

    class GrpcVerifier(grpc.ServerInterceptor):  # type: ignore[misc]
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            metadata = dict(details.invocation_metadata or ())
            if checker.check(metadata.get("authorization"), details.method):
                return continuation(details)

            def abort(_request: Any, context: Any) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              UNAUTHENTICATED["error"]["message"])

            handler = continuation(details)
            if handler is not None and handler.response_streaming:
                if handler.request_streaming:
                    return grpc.stream_stream_rpc_method_handler(abort)
                return grpc.unary_stream_rpc_method_handler(abort)
            if handler is not None and handler.request_streaming:
                return grpc.stream_unary_rpc_method_handler(abort)
            return grpc.unary_unary_rpc_method_handler(abort)

    return GrpcVerifier()
