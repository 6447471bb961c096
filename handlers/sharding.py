"""Shard placement: which shard owns a namespace, by a hash stable across processes."""

from __future__ import annotations

import xxhash

__all__ = ["shard_of"]


def shard_of(namespace: str, shards: int) -> int:
    """Return the shard that owns `namespace`, in range(shards).

    A namespace lives on one shard, so its keys, its capacities and its
    maintenance stay on one actor and a Redis Cluster can keep it in one slot.
    xxh64 with a fixed seed gives the same answer in every process; Python's
    `hash()` would not, because it is salted per process (PYTHONHASHSEED).
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return xxhash.xxh64_intdigest(namespace.encode("utf-8", "surrogatepass")) % shards
