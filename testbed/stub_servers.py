"""Small HTTPS servers of the testbed cloud besides BigQuery (standard library only).

- An echo server for "other host" and "other port" tests: HTTPS on --echo-address:443 and
  plain HTTP on --echo-address:--echo-plain-port. Any method and path gets 200 and a small
  JSON body describing the request.
- Google token endpoints on --token-address:443 (oauth2, sts and iamcredentials host names),
  so google-auth can mint access tokens without Google. The tokens are unsigned JWT-shaped
  strings whose "email" claim names the principal, which local-bigquery reads as the caller.

The line "stubs ready" on stdout means every listener is bound. SIGTERM or SIGINT stops them.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import http.server
import json
import re
import secrets
import signal
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
from typing import Any

TOKEN_LIFETIME = 3600
DEFAULT_PRINCIPAL = "testbed-user@example.test"
GENERATE_ACCESS_TOKEN = re.compile(
    r"^/v1/projects/[^/]+/serviceAccounts/([^/:]+):generateAccessToken$"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(principal: str, **claims: object) -> str:
    """Return an unsigned JWT-shaped access token for principal."""
    now = int(time.time())
    header = {"alg": "none", "typ": "JWT", "kid": "testbed"}
    payload = {
        "iss": "https://oauth2.googleapis.com",
        "email": principal,
        "sub": principal,
        "iat": now,
        "exp": now + TOKEN_LIFETIME,
        "jti": secrets.token_hex(8),
        **claims,
    }
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), "testbed"]
    )


def jwt_claims(token: str) -> dict[str, Any]:
    """Return the payload claims of a JWT without verifying it, or {} if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "testbed-stub"
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(
            f"{getattr(self.server, 'name', 'stub')} {self.address_string()} {format % args}\n"
        )

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
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


class TokenHandler(Handler):
    def handle_any(self) -> None:
        body = self.read_body()
        path = urllib.parse.urlsplit(self.path).path
        host = self.headers.get("Host", "").split(":")[0]
        if self.command != "POST":
            return self.error(405, f"{self.command} {path} is not supported; use POST")
        if match := GENERATE_ACCESS_TOKEN.match(path):
            return self.send_json(200, self.iam_token(urllib.parse.unquote(match[1])))
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode(errors="replace")).items()}
        if path == "/v1/token" or host.startswith("sts."):
            return self.send_json(200, self.sts_token(form))
        if path in ("/token", "/oauth2/v4/token"):
            return self.oauth2_token(form)
        self.error(404, f"no token endpoint at {host}{path}")

    def error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": "invalid_request", "error_description": message})

    def iam_token(self, email: str) -> dict[str, Any]:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=TOKEN_LIFETIME)
        return {
            "accessToken": mint_token(email),
            "expireTime": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def sts_token(self, form: dict[str, str]) -> dict[str, Any]:
        subject = jwt_claims(form.get("subject_token", ""))
        principal = str(subject.get("email") or subject.get("sub") or DEFAULT_PRINCIPAL)
        return {
            "access_token": mint_token(principal),
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME,
        }

    def oauth2_token(self, form: dict[str, str]) -> None:
        grant = form.get("grant_type", "")
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            claims = jwt_claims(form.get("assertion", ""))
            principal = str(claims.get("iss") or claims.get("sub") or "")
            if not principal:
                return self.error(400, "the assertion has no iss claim naming the principal")
            if audience := claims.get("target_audience"):
                return self.send_json(200, {"id_token": mint_token(principal, aud=audience)})
        elif grant == "refresh_token":
            principal = DEFAULT_PRINCIPAL
        else:
            return self.error(400, f"grant_type {grant!r} is not supported by the testbed")
        self.send_json(
            200,
            {
                "access_token": mint_token(principal),
                "expires_in": TOKEN_LIFETIME,
                "token_type": "Bearer",
            },
        )


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, name: str, address: tuple[str, int], handler: type, tls: ssl.SSLContext | None
    ) -> None:
        self.name = name
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
    args = parser.parse_args(argv)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    tls.set_alpn_protocols(["http/1.1"])
    servers = [
        Server("echo-tls", (args.echo_address, args.tls_port), EchoHandler, tls),
        Server("echo-plain", (args.echo_address, args.echo_plain_port), EchoHandler, None),
        Server("token", (args.token_address, args.tls_port), TokenHandler, tls),
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
