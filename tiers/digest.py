"""The canonical digest of a tier's records, used to compare tier states.

The digest is the SHA-256 of the concatenated MessagePack encodings of
`[namespace, key, value, meta]`, one per record, in (namespace, key) order.
Dict keys are encoded sorted, so the order in which a dict was built does not
change the digest. A tuple and a list encode alike (both are arrays), as they
do in storage. The digest covers decoded values, so the compression a backend
uses never changes it, and it leaves out the watermark and control values:
two tiers with the same records have the same digest whatever they applied
to get there.

Each encoding is self-delimiting, so distinct record sequences never produce
the same bytes: the records ("a", "bc") and ("ab", "c") hash differently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from tiers.base import Record

__all__ = ["digest_records", "digest_sorted_records"]

_encoder = msgspec.msgpack.Encoder(order="sorted")


def digest_sorted_records(records: Iterable[Record]) -> tuple[str, int]:
    """Return the hex digest and count of records given in (namespace, key) order.

    This streams, so a tier can digest a million records without keeping
    them in memory. Raises ValueError when a record does not sort strictly after the one
    before it, which also rejects a repeated (namespace, key).
    """
    digest = hashlib.sha256()
    count = 0
    previous: tuple[str, str] | None = None
    for record in records:
        identity = (record.namespace, record.key)
        if previous is not None and identity <= previous:
            raise ValueError(
                f"record {identity!r} follows {previous!r}: records must be "
                "sorted by (namespace, key) with no repeats"
            )
        digest.update(
            _encoder.encode((record.namespace, record.key, record.value, record.meta))
        )
        count += 1
        previous = identity
    return digest.hexdigest(), count


def digest_records(records: Iterable[Record]) -> tuple[str, int]:
    """Return the hex digest and count of `records`, given in any order.

    Raises ValueError when two records share a (namespace, key).
    """
    ordered = sorted(records, key=lambda record: (record.namespace, record.key))
    return digest_sorted_records(ordered)
