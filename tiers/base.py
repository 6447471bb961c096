"""The record shape and the `Tier` protocol every storage backend implements.

A tier instance serves one shard. Its state is a set of records keyed by
(namespace, key), a watermark (the sequence number of the last event whose
writes it holds) and a few named control values. `commit` applies one batch
of writes together with the new watermark and control values, atomically:
after a crash a tier holds all of a commit or none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import msgspec

__all__ = ["TIER_NAMES", "Meta", "Record", "Tier", "TierWrites"]

# Depth order of the durable tiers. The cache lives in the shard's memory and
# is described by `Meta.cache_touch`, so it has no backend of its own.
TIER_NAMES = ("stm", "im", "ltm")


class Meta(msgspec.Struct, frozen=True, array_like=True):
    """What the policy knows about a memory besides its value.

    Times are Unix milliseconds taken from event ingest timestamps, never
    from a clock. `cache_touch` is the sequence number of the event that last
    put or refreshed the memory in the shard's cache, or 0 when it is not
    cached; the cache is rebuilt from it after a restart.
    """

    importance: float
    tags: tuple[str, ...]
    created_ts: int
    updated_ts: int
    accessed_ts: int
    access_count: int
    version: int
    tier_since_ts: int
    expires_ts: int | None = None
    cache_touch: int = 0
    size: int = 0


class Record(msgspec.Struct, frozen=True):
    """One memory: its identity, its decoded value and its metadata."""

    namespace: str
    key: str
    value: Any
    meta: Meta


class TierWrites(msgspec.Struct):
    """The writes of one commit to one tier.

    `puts` replace whole records; `touches` replace only the metadata of
    records the tier already holds; `deletes` remove records (a missing one
    is not an error). A (namespace, key) appears in at most one of the three.
    """

    puts: list[Record] = []
    touches: list[tuple[str, str, Meta]] = []
    deletes: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.puts or self.touches or self.deletes)


@runtime_checkable
class Tier(Protocol):
    """A storage backend for one shard of one tier."""

    name: str
    shard: int

    def watermark(self) -> int:
        """Return the sequence number covered by the last commit, 0 if none."""
        ...

    def get(self, namespace: str, key: str) -> Record | None:
        """Return one record, or None."""
        ...

    def get_many(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], Record]:
        """Return the records among `keys` that exist, in one round trip."""
        ...

    def scan_meta(self) -> Iterator[tuple[str, str, Meta]]:
        """Yield (namespace, key, meta) for every record, in no set order."""
        ...

    def records(self) -> Iterator[Record]:
        """Yield every record, sorted by (namespace, key)."""
        ...

    def commit(
        self,
        writes: TierWrites,
        watermark: int,
        control: dict[str, bytes | None] | None = None,
    ) -> None:
        """Apply `writes`, set the watermark and control values, atomically.

        A control value of None deletes that control entry.
        """
        ...

    def control(self, name: str) -> bytes | None:
        """Return a control value written by `commit` or `put_control`."""
        ...

    def put_control(self, name: str, value: bytes | None) -> None:
        """Write one control value durably, outside any commit."""
        ...

    def digest(self) -> tuple[str, int]:
        """Return the canonical digest of the records and their count."""
        ...

    def clear(self) -> None:
        """Remove every record, the watermark and the control values."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...
