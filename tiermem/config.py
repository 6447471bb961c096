"""Settings of the embedded stack and of a router process."""

from __future__ import annotations

from pathlib import Path

import msgspec

from bus.dispatch import placement_resources
from bus.router import RouterSettings
from handlers.policy import Policy
from tiers.pools import TierPoolSettings

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
    # Thread pools of each shard, one per tier, that run a batch's IM and
    # LTM commits in parallel.
    pools: TierPoolSettings = TierPoolSettings()
    ray_address: str | None = None
    # Ray custom resources that place the shard actors: one name for every
    # shard, or one name per shard. Each actor requires 0.001 of its name,
    # on first start and on every restart, so a shard can only move to a
    # node that offers it. The actors spread over the nodes that do. None
    # places the actors wherever Ray's default strategy puts them.
    shard_resources: list[str] | None = None
    log_url: str | None = None
    # STM and IM also take a `redis+cluster://HOST:PORT[,HOST:PORT...]` URL
    # of a Redis Cluster. The log needs a single Redis server.
    stm_url: str | None = None
    im_url: str | None = None
    allow_everysec: bool = False
    log_stream: str = "tiermem:log"
    # The Redis of Celery's broker and result backend. When it is unset, the
    # embedded stack starts one.
    broker_url: str | None = None
    # Seconds between the Maintain events that beat sends. Each pass has one
    # slot of this length.
    maintain_interval_s: float = 60.0
    # Seconds between the beat runs that catch the projections up.
    projection_interval_s: float = 1.0
    # Seconds between scheduled snapshots of each shard.
    snapshot_interval_s: float = 600.0
    # Seconds between erasure passes (replay.erase), which rewrite snapshots
    # taken before a Forget; a pass with no Forget since the last costs one GET.
    erase_interval_s: float = 5.0
    # Minimum seconds between the AOF rewrites of scheduled erasure passes.
    erase_aof_interval_s: float = 3600.0
    # Seconds for which the log's id index keeps an event id after its
    # append, so that a retry with the same id gets the original Ack
    # instead of being logged again. 0 keeps every id forever.
    ids_retention_s: float = 604800.0
    # Seconds between the beat runs that remove expired ids from the index.
    ids_trim_interval_s: float = 3600.0
    # Pool processes of the embedded worker. Its tasks mostly wait on the bus,
    # and it shares the host with Redis, Ray and the router.
    celery_concurrency: int = 2
    # Seconds after which the Redis broker delivers an unacknowledged task
    # again, so it must exceed the longest task. The task of a worker killed
    # outright also waits this long, and up to 10 s more, to run again.
    broker_visibility_timeout_s: int = 3600

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")
        for name in (
            "projection_interval_s",
            "snapshot_interval_s",
            "erase_interval_s",
            "erase_aof_interval_s",
            "ids_trim_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.ids_retention_s >= 0:
            raise ValueError(f"ids_retention_s must be 0 (keep every id) or positive, got {self.ids_retention_s}")
        if not self.maintain_interval_s > 0:
            raise ValueError(f"maintain_interval_s must be positive, got {self.maintain_interval_s}")
        if self.shard_resources is not None:
            placement_resources(self.shard_resources, self.shards)
        if self.celery_concurrency < 1:
            raise ValueError(f"celery_concurrency must be at least 1, got {self.celery_concurrency}")
        if self.broker_visibility_timeout_s < 1:
            raise ValueError(
                f"broker_visibility_timeout_s must be at least 1, got {self.broker_visibility_timeout_s}"
            )

    @property
    def ltm_dir(self) -> str:
        return str(Path(self.data_dir) / "ltm")

    @property
    def projections_db(self) -> str:
        return str(Path(self.data_dir) / "projections.sqlite3")


def write_stack_config(config: StackConfig, path: Path) -> None:
    """Write the config as JSON, atomically, for a child process to read."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(config)))
    tmp.replace(path)


def load_stack_config(path: Path) -> StackConfig:
    return msgspec.json.decode(path.read_bytes(), type=StackConfig)
