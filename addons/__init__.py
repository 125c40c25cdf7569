"""The appliance's mitmproxy addons, and the one order they run in."""

from __future__ import annotations

from typing import Any

from appliance.addons.attribution import Attribution
from appliance.addons.bigquery import BigQueryDecoder
from appliance.addons.egress import Egress
from appliance.addons.metadata import MetadataEmulator
from appliance.addons.recorder import Recorder
from appliance.context import Registry


def chain(registry: Registry) -> list[Any]:
    """Return the addons in the order mitmproxy must call them.

    1. Attribution first: a connection from an address of no session goes no further.
    2. The metadata emulator answers its requests locally, before egress policy, because the
       metadata address is never an upstream host.
    3. Egress policy refuses disallowed hosts before anything is decoded or forwarded.
    4. BigQuery decoding fills in what the recorder writes.
    5. The recorder last: its request hook makes the event durable, and mitmproxy forwards
       the request only after every request hook has returned.
    """
    return [
        Attribution(registry),
        MetadataEmulator(registry),
        Egress(registry),
        BigQueryDecoder(registry),
        Recorder(registry),
    ]
