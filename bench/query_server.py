"""A synthetic BigQuery REST responder for the concurrency benchmark.

local-bigquery keeps every job and slows down as its history grows (about 12 ms more per
jobs.query after a thousand jobs on the bench machine), so 50,000 statements against it would
measure the upstream, not the appliance. This server answers jobs.query at once with a finished
job whose single row echoes the first quoted string of the SQL, the way BigQuery answers, so the
agent's real client library parses a real response. Any other call gets a 404 in Google's
error format. HTTP/1.1 with keep-alive, over TLS; standard library only.

    python bench/query_server.py --address 198.19.109.31 --cert server.pem --key key.pem
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import ssl
import uuid

QUERY_PATH = re.compile(r"^/bigquery/v2/projects/([^/]+)/queries$")
QUOTED = re.compile(r"'([^']*)'")


def answer(path: str, body: bytes) -> tuple[int, dict[str, object]]:
    match = QUERY_PATH.match(path.split("?", 1)[0])
    if match is None:
        return 404, {"error": {"code": 404, "status": "NOT_FOUND",
                               "message": f"Not found: {path}"}}
    request = json.loads(body or b"{}")
    marker = QUOTED.search(request.get("query", ""))
    job_id = f"job_{uuid.uuid4().hex}"
    return 200, {
        "kind": "bigquery#queryResponse",
        "jobReference": {"projectId": match.group(1), "jobId": job_id, "location": "US"},
        "schema": {"fields": [{"name": "marker", "type": "STRING", "mode": "NULLABLE"}]},
        "rows": [{"f": [{"v": marker.group(1) if marker else None}]}],
        "totalRows": "1", "jobComplete": True, "cacheHit": False,
        "totalBytesProcessed": "0", "queryId": job_id,
    }


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            _method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status, document = answer(path, body)
            payload = json.dumps(document).encode()
            reason = "OK" if status == 200 else "Not Found"
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; "
                         f"charset=UTF-8\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                         + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(handle, args.address, args.port, ssl=context,
                                        backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print("query server ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
