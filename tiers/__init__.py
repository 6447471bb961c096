"""Tier storage: the `Tier` protocol, its Memory, Redis and SQLite backends, codecs."""

from tiers.base import TIER_NAMES, Meta, Record, Tier, TierWrites
from tiers.codec import (
    IM_COMPRESSION,
    LTM_COMPRESSION,
    STM_COMPRESSION,
    Compression,
    ValueCodec,
    compression_for,
)
from tiers.digest import digest_records, digest_sorted_records
from tiers.errors import CorruptDataError, StorageError, TierError
from tiers.memory import MemoryTier
from tiers.redis_tier import RedisTier
from tiers.sqlite_tier import SqliteTier

__all__ = [
    "Compression",
    "CorruptDataError",
    "IM_COMPRESSION",
    "LTM_COMPRESSION",
    "MemoryTier",
    "Meta",
    "Record",
    "RedisTier",
    "STM_COMPRESSION",
    "SqliteTier",
    "StorageError",
    "TIER_NAMES",
    "Tier",
    "TierError",
    "TierWrites",
    "ValueCodec",
    "compression_for",
    "digest_records",
    "digest_sorted_records",
]
