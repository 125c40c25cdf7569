"""Serve local-bigquery over TLS as the testbed's BigQuery upstream.

Run it with the upstream venv's Python (the one that has local-bigquery installed):

    python testbed/upstream_server.py --rest-address 198.19.0.10 \
        --grpc-address 198.19.0.11 --cert server.pem --key server-key.pem \
        --data-dir /var/tmp/cloud/upstream-data

The REST API (uvicorn, ALPN http/1.1) and the BigQuery Storage gRPC API (ALPN h2) run in
this one process and share local-bigquery's DuckDB engine. SIGTERM or SIGINT stops both
servers and the process exits 0. The line "upstream ready" on stdout means both listen.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import signal
import ssl
import sys

# DuckDB cannot download extensions on these machines, so local-bigquery's come from wheels.
EXTENSION_PACKAGES = (
    "duckdb_extension_icu",
    "duckdb_extension_ducklake",
    "duckdb_extension_spatial",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rest-address", required=True, help="IP address for the REST API")
    parser.add_argument("--rest-port", type=int, default=443)
    parser.add_argument("--grpc-address", required=True, help="IP address for the Storage API")
    parser.add_argument("--grpc-port", type=int, default=443)
    parser.add_argument("--cert", required=True, type=pathlib.Path, help="PEM certificate chain")
    parser.add_argument("--key", required=True, type=pathlib.Path, help="PEM private key")
    parser.add_argument("--data-dir", required=True, type=pathlib.Path)
    parser.add_argument("--project", default="demo-project")
    parser.add_argument("--dataset", default="demo_dataset", help="dataset created at start")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--token-secret", type=pathlib.Path,
                        help="verify bearer tokens against this stub token secret "
                             "(testbed/token_verifier.py); without it any token is accepted")
    return parser.parse_args(argv)


def install_duckdb_extensions(home: pathlib.Path) -> None:
    """Copy the wheel-shipped DuckDB extensions into HOME's extension directory.

    local-bigquery opens its own DuckDB connections with the default extension directory
    (~/.duckdb/extensions), where DuckDB autoloads them from without any network access.
    """
    import importlib

    import duckdb

    home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(home)
    with duckdb.connect() as con:
        for package in EXTENSION_PACKAGES:
            try:
                module = importlib.import_module(package)
            except ImportError:
                sys.exit(
                    f"upstream: Python package {package} is missing from {sys.prefix}; "
                    f"install it with: pip install {package.replace('_', '-')}=={duckdb.__version__}"
                )
            root = pathlib.Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"
            files = list(root.glob("*.duckdb_extension"))
            if not files:
                sys.exit(
                    f"upstream: {package} has no extension for DuckDB {duckdb.__version__} "
                    f"under {root}; pin it to the installed duckdb version"
                )
            for file in files:
                con.install_extension(str(file), force_install=True)


def rest_ssl_context(cert: pathlib.Path, key: pathlib.Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir.resolve()
    install_duckdb_extensions(data_dir / "home")

    from local_bigquery.settings import settings

    settings.bigquery_host = args.rest_address
    settings.bigquery_port = args.rest_port
    settings.grpc_port = args.grpc_port
    settings.default_project_id = args.project
    settings.default_dataset_id = args.dataset
    settings.data_dir = data_dir / "bigquery"

    import grpc
    import uvicorn
    from local_bigquery import app
    from local_bigquery.engine import database
    from local_bigquery.grpc import server as grpc_services

    # Opening the engine now makes a broken DuckDB setup fail at start, not on a request.
    database.connection()

    interceptors = []
    if args.token_secret:
        import token_verifier

        checker = token_verifier.TokenChecker(args.token_secret.read_text().strip().encode())
        app = token_verifier.RestVerifier(app, checker)
        interceptors.append(token_verifier.grpc_interceptor(checker))

    grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16),
                              interceptors=interceptors)
    grpc_server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(n, h) for n, h in grpc_services.SERVICES.items()]
    )
    credentials = grpc.ssl_server_credentials([(args.key.read_bytes(), args.cert.read_bytes())])
    grpc_server.add_secure_port(f"{args.grpc_address}:{args.grpc_port}", credentials)
    grpc_server.start()

    config = uvicorn.Config(
        app,
        host=args.rest_address,
        port=args.rest_port,
        http="h11",
        ws="none",
        lifespan="off",
        log_level=args.log_level,
        # An idle keep-alive TLS client may not reply to close_notify, and asyncio would wait
        # 30 s for it by default, so shutdown gives up after 2 s.
        timeout_graceful_shutdown=2,
        ssl_certfile=str(args.cert),
        ssl_keyfile=str(args.key),
        ssl_context_factory=lambda _config, _default: rest_ssl_context(args.cert, args.key),
    )
    rest_server = uvicorn.Server(config)

    # Uvicorn re-raises the stop signal once it has shut down. These handlers absorb it, so
    # the gRPC server can stop too.
    stop_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: stop_signals.append(number))

    original_startup = rest_server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        if rest_server.started:
            print("upstream ready", flush=True)

    rest_server.startup = startup
    try:
        rest_server.run()
    finally:
        grpc_server.stop(grace=2).wait(5)
    if not rest_server.started:
        print(
            f"upstream: REST server did not start on {args.rest_address}:{args.rest_port}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
