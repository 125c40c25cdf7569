"""The appliance's exception tree.

    ApplianceError                 base class; the CLI prints its message as one line
     ├── ConfigError               invalid or unreadable configuration (exit code 2)
     │    └── CredentialError     a profile's credential cannot be loaded or minted
     ├── PrivilegeError            not root, or a kernel feature is missing (exit code 3)
     ├── NetworkSetupError         namespace, link, address or nftables setup failed (exit code 4)
     ├── ProxyError                the embedded proxy could not start (exit code 4)
     ├── StoreError                the recording store cannot be read or written (exit code 5)
     │    └── RecordingFailed     an event could not be made durable (the request fails closed)
     └── NotFound                  a session or other named object does not exist (exit code 6)

Errors from pyroute2, nftables, DuckDB and the operating system are translated into these
where they enter the appliance, so callers never see a library's exception type.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class of every error the appliance raises on purpose."""

    exit_code = 1


class ConfigError(ApplianceError):
    """The configuration file or a command-line value is invalid."""

    exit_code = 2


class CredentialError(ConfigError):
    """An agent profile's credential source cannot be loaded, trusted or turned into a token."""


class PrivilegeError(ApplianceError):
    """The appliance lacks a privilege or a kernel feature it needs."""

    exit_code = 3


class NetworkSetupError(ApplianceError):
    """Creating or removing a session's namespace, links, addresses or rules failed."""

    exit_code = 4


class ProxyError(ApplianceError):
    """The embedded mitmproxy could not start or stopped unexpectedly."""

    exit_code = 4


class StoreError(ApplianceError):
    """The recording store cannot be read or written."""

    exit_code = 5


class RecordingFailed(StoreError):
    """An event could not be written durably, so its request must not be forwarded."""


class NotFound(ApplianceError):
    """A session or other named object does not exist."""

    exit_code = 6
