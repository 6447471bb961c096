"""The console's options, and the rule that a non-loopback bind needs a token."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from events.errors import TiermemError

__all__ = ["ConsoleSettings", "SettingsError", "is_loopback"]

# Samples kept for the overview plots: at the default interval of 1 s, five
# minutes of history.
DEFAULT_SAMPLES = 300


class SettingsError(TiermemError):
    """The console's options are invalid; the message names the option and the reason."""


def is_loopback(host: str) -> bool:
    """Return whether `host` names only this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ConsoleSettings:
    """Options of `tiermem console`: the stack, the address, the token and the sampling.

    `token`, when set, must come with every request: as the `token` query
    parameter of the first page load (the server then sets a cookie), as
    that cookie, or as an `Authorization: Bearer` header. `allow_get` lets
    the key page send `Get` through the bus, which is logged and counts as
    an access, so the console sends none unless it is set.
    `sample_interval_s` is the time between two overview samples, and
    `samples` how many of them the plots keep.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7460
    token: str | None = None
    allow_get: bool = False
    sample_interval_s: float = 1.0
    samples: int = DEFAULT_SAMPLES
    bus_timeout_s: float = 2.0
    backlog_events: int = 500

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise SettingsError(
                f"--host {self.host} is not a loopback address, so anyone who can reach it "
                "could read every memory: pass --token with a secret that every request "
                "must carry, or bind to 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 16:
            raise SettingsError(
                f"--token is {len(self.token)} characters long: use at least 16, "
                f"for example {secrets.token_urlsafe(24)}"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(
                f"--port {self.port} is invalid: use 0 (any free port) to 65535"
            )
        if not self.sample_interval_s > 0:
            raise SettingsError(
                f"sample_interval_s {self.sample_interval_s} is invalid: use a positive number of seconds"
            )
        if self.samples < 2:
            raise SettingsError(
                f"samples {self.samples} is invalid: the plots need at least 2"
            )
        if not self.bus_timeout_s > 0:
            raise SettingsError(
                f"bus_timeout_s {self.bus_timeout_s} is invalid: use a positive number of seconds"
            )
        if self.backlog_events < 0:
            raise SettingsError(
                f"backlog_events {self.backlog_events} is invalid: use 0 or more"
            )
