"""The appliance's mitmproxy addons, and the one order they run in."""

from __future__ import annotations

from typing import Any

from appliance.addons.attribution import Attribution
from appliance.addons.bigquery import BigQueryDecoder
from appliance.addons.credentials import CredentialSubstitution
from appliance.addons.egress import Egress
from appliance.addons.metadata import MetadataEmulator
from appliance.addons.recorder import Recorder
from appliance.addons.storage import StorageApi
from appliance.context import Registry


def chain(registry: Registry) -> list[Any]:
    """Return the addons in the order mitmproxy must call them.

    1. Attribution first: a connection from an address of no session goes no further.
    2. The metadata emulator answers its requests locally, before egress policy, because the
       metadata address is never an upstream host.
    3. Egress policy refuses disallowed hosts before anything is decoded or forwarded.
    3a. Credential substitution on approved flows only, before decoding and recording, so that
        a refused foreign credential is recorded as blocked and never decoded as a statement.
    4. BigQuery decoding fills in what the recorder writes.
    4a. The Storage gRPC addon after the REST decoder, whose statement ids it reads to link a
        read session to the query whose result table it reads, and after egress policy, so a
        refused call is never streamed. It records its calls itself (a streamed request must
        be recorded in `requestheaders`, which the recorder does not see for gRPC), so the
        recorder, placed after it, skips the flows it marks.
    5. The recorder last: its request hook makes the event durable, and mitmproxy forwards
       the request only after every request hook has returned.
    """
    return [
        Attribution(registry),
        MetadataEmulator(registry),
        Egress(registry),
        CredentialSubstitution(registry),
        BigQueryDecoder(registry),
        StorageApi(registry),
        Recorder(registry),
    ]
