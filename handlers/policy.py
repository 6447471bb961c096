"""The tier policy: capacities, idle times and the retention score.

These settings are part of what the log means: the same log applied under a
different policy gives a different state. Shards store the policy's
fingerprint and rebuild from the log when it changes.
"""

from __future__ import annotations

import msgspec
import xxhash

from tiers.base import Meta

__all__ = ["Policy", "retention"]


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """Tier capacities (records per namespace unless stated) and idle times (ms)."""

    cache_capacity: int = 1024  # records per shard
    stm_capacity: int = 16
    stm_idle_ms: int = 15 * 60 * 1000
    im_capacity: int = 64
    im_idle_ms: int = 24 * 3600 * 1000
    ltm_capacity: int = 100_000
    half_life_ms: int = 3600 * 1000
    access_weight: int = 100

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"policy.{name} must be at least 1, got {value}")

    def fingerprint(self) -> str:
        """Return a hex digest of the settings, stable across processes."""
        return xxhash.xxh64_hexdigest(msgspec.msgpack.encode(self))


def retention(meta: Meta, now_ms: int, policy: Policy) -> int:
    """Return the retention score of a memory at `now_ms`: higher stays longer.

    Integer arithmetic only, so every platform ranks memories identically:
    importance in thousandths, halved once per full half-life of idleness,
    plus `access_weight` per bit of the access count.
    """
    base = round(meta.importance * 1000)
    idle = max(0, now_ms - meta.accessed_ts)
    halvings = idle // policy.half_life_ms
    decayed = base >> halvings if halvings < 64 else 0
    return decayed + policy.access_weight * meta.access_count.bit_length()
