"""Exceptions that tier backends raise when storage fails or contains invalid data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from events.errors import TiermemError

__all__ = ["CorruptDataError", "StorageError", "TierError", "storage_errors"]


class TierError(TiermemError):
    """Base class of tier failures.

    `tier` and `shard` identify the backend instance, and are None when the
    failing code (a codec, for example) does not know them.
    """

    def __init__(
        self, message: str, *, tier: str | None = None, shard: int | None = None
    ) -> None:
        super().__init__(message)
        self.tier = tier
        self.shard = shard


class StorageError(TierError):
    """A call to the storage behind a tier failed.

    The cause is chained as `__cause__`: a lost Redis connection, a timeout,
    an out-of-memory rejection, a locked or full SQLite file. Whether a write
    that raised this took effect depends on the backend's documentation.
    `action` is the tier method that failed (`commit`, `get_many`, ...).
    """

    def __init__(self, message: str, *, tier: str, shard: int, action: str) -> None:
        super().__init__(message, tier=tier, shard=shard)
        self.action = action


class CorruptDataError(TierError):
    """Stored bytes that cannot be decoded or do not fit the tier's layout."""


@contextmanager
def storage_errors(
    tier: str, shard: int, action: str, errors: tuple[type[BaseException], ...]
) -> Iterator[None]:
    """Re-raise the backend's `errors` as `StorageError` naming the tier and action."""
    try:
        yield
    except errors as error:
        raise StorageError(
            f"{tier} shard {shard}: {action} failed: {error}",
            tier=tier,
            shard=shard,
            action=action,
        ) from error
