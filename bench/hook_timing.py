"""Run `appliance` with every appliance addon hook timed, to find where a flow's time goes.

    python bench/hook_timing.py OUTPUT.json run --config ... --agent-cmd ...

Wraps each hook of the addons in appliance.addons.chain (sync and async alike) with a wall
clock, runs the normal CLI, and at exit writes {addon.hook: [milliseconds, ...]} to OUTPUT.json.
A profile of wall time, not CPU: an awaited fsync shows up here and not in py-spy's samples.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import sys
import time
from collections import defaultdict
from typing import Any

HOOKS = ("client_connected", "requestheaders", "request", "responseheaders", "response",
         "error", "server_connect", "tls_failed_client", "tcp_start", "tcp_end")


def _wrap(name: str, method: Any, timings: dict[str, list[float]]) -> Any:
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                timings[name].append((time.perf_counter() - started) * 1000)
        return timed_async

    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            timings[name].append((time.perf_counter() - started) * 1000)
    return timed


def install(output: str) -> None:
    from appliance import addons

    timings: dict[str, list[float]] = defaultdict(list)
    original_chain = addons.chain

    def chain(registry: Any) -> list[Any]:
        result = original_chain(registry)
        for addon in result:
            for hook in HOOKS:
                method = getattr(addon, hook, None)
                if method is not None:
                    setattr(addon, hook, _wrap(f"{type(addon).__name__}.{hook}", method,
                                               timings))
        return result

    addons.chain = chain
    import appliance.session as session_module

    session_module.addons.chain = chain  # type: ignore[attr-defined]

    def dump() -> None:
        with open(output, "w") as handle:
            json.dump(timings, handle)

    atexit.register(dump)


if __name__ == "__main__":
    install(sys.argv.pop(1))
    sys.argv[0] = "appliance"
    from appliance.cli import main

    main()
