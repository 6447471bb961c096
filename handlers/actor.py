"""The Ray actor that hosts one shard, and the settings it is built from.

Only bytes cross the Ray boundary: events, replies and settings are encoded
with msgspec MessagePack by the caller, so nothing of ours is pickled.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import msgspec
import redis
import structlog

from events.log import RedisEventLog
from events.types import AnyEvent, Message, Reply
from handlers.effects import RedisEffectLog
from handlers.policy import Policy
from handlers.shard import RecoveryReport, Shard
from tiers.pools import PoolStats, TierPools, TierPoolSettings
from tiers.redis_tier import RedisTier, client_from_url
from tiers.sqlite_tier import SqliteTier

__all__ = [
    "ShardHost",
    "ShardSettings",
    "ShardStatusInfo",
    "build_shard",
    "decode_replies",
    "spawn_shard_actor",
]

log = structlog.get_logger("tiermem.actor")


class ShardSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The locations of a shard's tiers and the log, and the policy it applies."""

    shard: int
    shards: int
    log_url: str
    # A Redis URL, or a `redis+cluster://` URL of a Redis Cluster (see
    # `tiers.redis_tier.client_from_url`). The log needs a single server.
    stm_url: str
    im_url: str
    ltm_dir: str
    policy: Policy = Policy()
    log_stream: str = "tiermem:log"
    # Root of the snapshot files (`DIR/snapshots`). With None, a rebuild replays the whole log.
    snapshot_dir: str | None = None
    # Sizes of the thread pools that run the shard's IM and LTM commits.
    pools: TierPoolSettings = TierPoolSettings()


class ShardStatusInfo(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    watermark: int
    pid: int
    node: str
    keys: int
    recovery: RecoveryReport | None = None
    pools: list[PoolStats] = []


def build_shard(settings: ShardSettings) -> Shard:
    """Connect a shard's tiers and the log, without recovering it yet."""
    stm = RedisTier("stm", client_from_url(settings.stm_url), settings.shard, owns_client=True)
    im = RedisTier("im", client_from_url(settings.im_url), settings.shard, owns_client=True)
    ltm_path = Path(settings.ltm_dir) / f"ltm-{settings.shard}.sqlite3"
    ltm_path.parent.mkdir(parents=True, exist_ok=True)
    ltm = SqliteTier("ltm", ltm_path, settings.shard)
    log_client = redis.Redis.from_url(settings.log_url)
    event_log = RedisEventLog(log_client, stream=settings.log_stream)
    return Shard(
        settings.shard,
        settings.shards,
        {"stm": stm, "im": im, "ltm": ltm},
        settings.policy,
        event_log,
        RedisEffectLog(log_client),
        snapshot_dir=settings.snapshot_dir,
        pools=TierPools(settings.pools, context={"shard": settings.shard}),
    )


_settings_decoder = msgspec.msgpack.Decoder(ShardSettings)
_events_decoder = msgspec.msgpack.Decoder(list[AnyEvent])
_batch_decoder = msgspec.msgpack.Decoder(tuple[int | None, list[AnyEvent]])
_replies_encoder = msgspec.msgpack.Encoder()
_replies_decoder = msgspec.msgpack.Decoder(list[Reply])


class ShardHost:
    """One shard inside a Ray actor; `bus.dispatch` creates it with `ray.remote`.

    The constructor recovers the shard (redo, consistency check, log tail),
    so Ray's automatic restart of a killed actor brings it back caught up.
    """

    def __init__(self, settings: bytes) -> None:
        self.settings = _settings_decoder.decode(settings)
        self.shard = build_shard(self.settings)
        self.recovery = self.shard.recover()

    def apply(self, payload: bytes) -> bytes:
        """Apply `[prev_seq, events]` (MessagePack); return the encoded replies."""
        prev_seq, events = _batch_decoder.decode(payload)
        replies: list[Message] = self.shard.apply(events, prev_seq=prev_seq)
        return _replies_encoder.encode(replies)

    def digests(self) -> bytes:
        return msgspec.msgpack.encode([self.shard.watermark, self.shard.digests()])

    def rebuild(self) -> bytes:
        """Rebuild the tiers from the newest snapshot and the log; return the encoded RecoveryReport.

        Ray runs one caller's calls to this actor in order, so batches sent
        after this call are applied after the rebuild.
        """
        self.recovery = self.shard.rebuild()
        return msgspec.msgpack.encode(self.recovery)

    def status(self) -> bytes:
        info = ShardStatusInfo(
            shard=self.settings.shard,
            watermark=self.shard.watermark,
            pid=os.getpid(),
            node=socket.gethostname(),
            keys=self.shard.state.entry_count(),
            recovery=self.recovery,
            pools=self.shard.pool_stats(),
        )
        return msgspec.msgpack.encode(info)


def decode_replies(payload: bytes) -> list[Message]:
    """Decode what `ShardHost.apply` returns."""
    return _replies_decoder.decode(payload)


def spawn_shard_actor(
    settings: ShardSettings,
    *,
    num_cpus: float = 0.0,
    node_resource: str | None = None,
    spread: bool = False,
):
    """Start a `ShardHost` Ray actor that Ray restarts whenever its process dies.

    `num_cpus=0` by default: shards mostly wait on Redis and SQLite, and a
    whole CPU each would fill a 2-core machine with two of them. Tasks that
    were running when the process died fail instead of being retried by Ray;
    the dispatcher resends them, and the watermark makes that a no-op for
    what the restarted actor already replayed from the log.

    `node_resource` names a Ray custom resource that the actor requires
    (0.001 of it), so Ray starts and restarts it only on nodes that offer
    it, and an actor whose resource no live node offers waits unscheduled.
    `spread` uses Ray's SPREAD strategy, which places actors on different
    nodes where it can.
    """
    import ray

    options: dict = {
        "num_cpus": num_cpus,
        "max_restarts": -1,
        "max_task_retries": 0,
        "name": None,
    }
    if node_resource:
        options["resources"] = {node_resource: 0.001}
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    remote_class = ray.remote(ShardHost)
    return remote_class.options(**options).remote(msgspec.msgpack.encode(settings))
