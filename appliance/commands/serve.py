"""`appliance serve`: run the shared proxy and resolver as a daemon for `appliance run`.

Meant to run as the systemd unit config/appliance.service. While it runs, `appliance run`
with the same runtime directory hands its session to it and starts faster.
"""

from __future__ import annotations

from appliance import config as config_module
from appliance import service
from appliance.commands.render import ConfigOption


def serve(config_path: ConfigOption = None) -> None:
    """Run the proxy and resolver as a service that runs the sessions of `appliance run`.

    Listens on RUNTIME_DIR/serve.sock (root only) until SIGTERM or SIGINT, then ends the
    sessions still running, sealing their recordings.
    """
    service.serve(config_module.load(config_path))
