"""Settings of the embedded stack and of a router process."""

from __future__ import annotations

from pathlib import Path

import msgspec

from bus.router import RouterSettings
from handlers.policy import Policy

__all__ = ["StackConfig", "load_stack_config", "write_stack_config"]


class StackConfig(msgspec.Struct, kw_only=True):
    """Everything a router process needs to find its log, tiers and Ray.

    A URL or address left unset means: the embedded stack starts that server
    itself under `data_dir`.
    """

    data_dir: str = ".tiermem"
    shards: int = 2
    router: RouterSettings = RouterSettings()
    policy: Policy = Policy()
    ray_address: str | None = None
    log_url: str | None = None
    stm_url: str | None = None
    im_url: str | None = None
    allow_everysec: bool = False
    log_stream: str = "tiermem:log"

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")

    @property
    def ltm_dir(self) -> str:
        return str(Path(self.data_dir) / "ltm")


def write_stack_config(config: StackConfig, path: Path) -> None:
    """Write the config as JSON, atomically, for a child process to read."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(config)))
    tmp.replace(path)


def load_stack_config(path: Path) -> StackConfig:
    return msgspec.json.decode(path.read_bytes(), type=StackConfig)
