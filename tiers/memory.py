"""An in-process tier backend kept in dicts, for scratch rebuilds and tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tiers.base import Meta, Record, TierWrites
from tiers.checks import (
    check_control,
    check_control_name,
    check_identity,
    check_watermark,
    check_writes,
)
from tiers.codec import (
    STM_COMPRESSION,
    Compression,
    ValueCodec,
    decode_meta,
    encode_meta,
)
from tiers.digest import digest_sorted_records

__all__ = ["MemoryTier"]


class MemoryTier:
    """A `Tier` whose state lives in this process and ends with it.

    Values and metadata are stored encoded, as the durable backends store
    them, so a caller that mutates a returned value or the record it passed
    to `commit` never changes the stored state. `compression` defaults to
    none, whatever the tier name, because nothing here is written to disk and
    zstd would only cost time.
    """

    def __init__(
        self, name: str, shard: int, *, compression: Compression | None = None
    ) -> None:
        check_identity(name, shard)
        self.name = name
        self.shard = shard
        self._codec = ValueCodec(compression or STM_COMPRESSION)
        # (namespace, key) -> (encoded value, encoded meta)
        self._records: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self._control: dict[str, bytes] = {}
        self._watermark = 0

    def __repr__(self) -> str:
        return f"MemoryTier(name={self.name!r}, shard={self.shard})"

    def watermark(self) -> int:
        return self._watermark

    def get(self, namespace: str, key: str) -> Record | None:
        return self.get_many([(namespace, key)]).get((namespace, key))

    def get_many(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], Record]:
        found: dict[tuple[str, str], Record] = {}
        for namespace, key in keys:
            identity = (namespace, key)
            stored = self._records.get(identity)
            if stored is not None:
                found[identity] = self._decode(identity, stored)
        return found

    def scan_meta(self) -> Iterator[tuple[str, str, Meta]]:
        # Iterate over a copy, so a commit between two steps of the caller's
        # loop does not raise "dictionary changed size during iteration".
        for (namespace, key), (_, meta_blob) in list(self._records.items()):
            yield namespace, key, decode_meta(meta_blob)

    def records(self) -> Iterator[Record]:
        for identity, stored in sorted(self._records.items()):
            yield self._decode(identity, stored)

    def commit(
        self,
        writes: TierWrites,
        watermark: int,
        control: dict[str, bytes | None] | None = None,
    ) -> None:
        """Apply `writes`, the watermark and control values.

        Everything is checked and encoded before the first change, so a commit
        that raises changes nothing. A touch of a record the tier does not
        contain is ignored.
        """
        check_writes(writes)
        check_watermark(watermark)
        check_control(control)
        puts = [
            (
                (record.namespace, record.key),
                self._codec.encode(record.value),
                encode_meta(record.meta),
            )
            for record in writes.puts
        ]
        touches = [
            ((namespace, key), encode_meta(meta))
            for namespace, key, meta in writes.touches
        ]

        for namespace, key in writes.deletes:
            self._records.pop((namespace, key), None)
        for identity, value_blob, meta_blob in puts:
            self._records[identity] = (value_blob, meta_blob)
        for identity, meta_blob in touches:
            stored = self._records.get(identity)
            if stored is not None:
                self._records[identity] = (stored[0], meta_blob)
        self._watermark = watermark
        for name, value in (control or {}).items():
            self._set_control(name, value)

    def control(self, name: str) -> bytes | None:
        check_control_name(name)
        return self._control.get(name)

    def put_control(self, name: str, value: bytes | None) -> None:
        check_control({name: value})
        self._set_control(name, value)

    def digest(self) -> tuple[str, int]:
        return digest_sorted_records(self.records())

    def clear(self) -> None:
        self._records.clear()
        self._control.clear()
        self._watermark = 0

    def close(self) -> None:
        """Do nothing, because a memory tier has no connection or file to release."""

    def _set_control(self, name: str, value: bytes | None) -> None:
        if value is None:
            self._control.pop(name, None)
        else:
            self._control[name] = value

    def _decode(self, identity: tuple[str, str], stored: tuple[bytes, bytes]) -> Record:
        value_blob, meta_blob = stored
        namespace, key = identity
        return Record(
            namespace, key, self._codec.decode(value_blob), decode_meta(meta_blob)
        )
