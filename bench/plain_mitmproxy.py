"""The plain-mitmproxy reference: mitmproxy 12 in transparent mode with no addons of ours.

It loads only what a transparent TLS-intercepting proxy needs (core, proxyserver, next_layer,
tlsconfig), with the same options the appliance's embedded proxy sets, so the difference to
the appliance is exactly the appliance's addons and recording. Prints "plain mitmproxy ready"
when it listens and runs until SIGTERM or SIGINT.

    python bench/plain_mitmproxy.py --listen 198.18.109.253:15001 --confdir DIR \
        --upstream-ca CA.pem
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from mitmproxy import options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master


class Ready:
    def running(self) -> None:
        print("plain mitmproxy ready", flush=True)


async def serve(listen: str, confdir: str, upstream_ca: str) -> None:
    master = Master(options.Options())
    master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                      tlsconfig.TlsConfig(), Ready())
    master.options.update(mode=[f"transparent@{listen}"], confdir=confdir,
                          connection_strategy="lazy", ssl_verify_upstream_trusted_ca=upstream_ca)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, master.shutdown)
    await master.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT for the transparent listener")
    parser.add_argument("--confdir", required=True, help="directory of the proxy's CA")
    parser.add_argument("--upstream-ca", required=True, help="CA file the upstream is trusted by")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.confdir, args.upstream_ca))


if __name__ == "__main__":
    main()
