"""Per-tier encoding of stored values and metadata.

A stored value is one header byte followed by the MessagePack encoding of the
value, either as is (`RAW`) or as one zstandard frame (`ZSTD`). Decoding reads
the header, so a tier reads values written with any compression setting and a
setting can change without rewriting stored data. Metadata is the MessagePack
array of the `Meta` fields, never compressed.

Compression grows with depth: none in STM, where values are read and
rewritten most often, a medium zstd level in IM and a high one in LTM.
"""

from __future__ import annotations

from typing import Any

import msgspec
import zstandard

from tiers.base import Meta
from tiers.errors import CorruptDataError

__all__ = [
    "Compression",
    "IM_COMPRESSION",
    "LTM_COMPRESSION",
    "RAW",
    "STM_COMPRESSION",
    "ValueCodec",
    "ZSTD",
    "compression_for",
    "decode_meta",
    "encode_meta",
]

RAW = 0x00
ZSTD = 0x01

_RAW_HEADER = bytes([RAW])
_ZSTD_HEADER = bytes([ZSTD])


class Compression(msgspec.Struct, frozen=True):
    """The compression setting of a tier's values.

    `level` is a zstandard level from 1 to 22, or None to store every value
    raw. Encoded values shorter than `min_size` bytes are stored raw, because
    the zstd frame header alone (at least 6 bytes, usually more) makes short
    values longer. A value whose zstd frame is not shorter than its raw
    encoding is stored raw as well.
    """

    level: int | None = None
    min_size: int = 64

    def __post_init__(self) -> None:
        max_level = zstandard.MAX_COMPRESSION_LEVEL
        if self.level is not None and not 1 <= self.level <= max_level:
            raise ValueError(
                f"zstd level {self.level} is invalid: use 1 to {max_level}, "
                "or None for no compression"
            )
        if self.min_size < 0:
            raise ValueError(
                f"min_size {self.min_size} is invalid: use 0 or more bytes"
            )


STM_COMPRESSION = Compression(level=None)
IM_COMPRESSION = Compression(level=3)

# Level 12 encodes a 100 KiB text value in about 6.5 ms and a small value in
# about 7 us. Levels 15 and 19 shrink large text only from 0.37 to 0.36 of
# its size, at 2x and 4x the time of level 12. Measured with
# `python bench/tier_compression.py` on the 2-core development machine (ext4,
# zstandard 0.25, msgspec 0.23) over chat text from chitchat-dataset. A
# commit is a SqliteTier commit of 1,000 small or 10 large records, encoding
# included. Two runs, rounded:
#
#   level | 10,000 values of ~113 B | 100 values of 100 KiB | large size
#         |   encode    commit      |   encode    commit    |
#    none |     5 ms     45 ms      |     5 ms     50 ms    |   1.00
#      3  |    40 ms    100 ms      |    60 ms     90 ms    |   0.39
#     12  |    70 ms    120 ms      |   650 ms    700 ms    |   0.37
#     15  |   130 ms    160 ms      |  1300 ms   1200 ms    |   0.36
#     19  |   140 ms    170 ms      |  2400 ms   2400 ms    |   0.36
#
# Small values shrink to 0.87-0.88 of their size at every zstd level, with
# the 31 % of them under `min_size` stored raw.
LTM_COMPRESSION = Compression(level=12)

_TIER_COMPRESSION = {
    "stm": STM_COMPRESSION,
    "im": IM_COMPRESSION,
    "ltm": LTM_COMPRESSION,
}


def compression_for(tier_name: str) -> Compression:
    """Return the default compression of the tier called `tier_name`."""
    try:
        return _TIER_COMPRESSION[tier_name]
    except KeyError:
        raise ValueError(
            f"tier name {tier_name!r} is invalid: use one of "
            f"{', '.join(_TIER_COMPRESSION)}"
        ) from None


class ValueCodec:
    """Encoder and decoder of stored values for one compression setting.

    An instance keeps its own zstd contexts, which are not safe to share
    between threads, so each tier instance creates its own codec.
    """

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self._encoder = msgspec.msgpack.Encoder()
        self._compressor = (
            zstandard.ZstdCompressor(level=compression.level)
            if compression.level is not None
            else None
        )
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, value: Any) -> bytes:
        """Serialize `value` and compress it when that makes it shorter.

        Raises TypeError for a value MessagePack cannot represent (a complex
        number, an arbitrary object) and OverflowError for an int outside the
        signed and unsigned 64-bit range. A set or tuple is stored as an array
        and reads back as a list.
        """
        packed = self._encoder.encode(value)
        if self._compressor is None or len(packed) < self.compression.min_size:
            return _RAW_HEADER + packed

        compressed = self._compressor.compress(packed)
        if len(compressed) >= len(packed):
            return _RAW_HEADER + packed
        return _ZSTD_HEADER + compressed

    def decode(self, blob: bytes) -> Any:
        """Return the value stored as `blob`; raise CorruptDataError if invalid."""
        if not blob:
            raise CorruptDataError("stored value is empty: expected a header byte")

        header = blob[0]
        body = memoryview(blob)[1:]
        if header == ZSTD:
            try:
                body = self._decompressor.decompress(body)
            except zstandard.ZstdError as error:
                raise CorruptDataError(
                    f"stored value is not a valid zstd frame: {error}"
                ) from error
        elif header != RAW:
            raise CorruptDataError(
                f"stored value has header byte {header:#04x}: expected "
                f"{RAW:#04x} (raw) or {ZSTD:#04x} (zstd)"
            )

        try:
            return msgspec.msgpack.decode(body)
        except msgspec.DecodeError as error:
            raise CorruptDataError(
                f"stored value is not valid MessagePack: {error}"
            ) from error


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(Meta)


def encode_meta(meta: Meta) -> bytes:
    """Return the MessagePack array of `meta`'s fields."""
    return _meta_encoder.encode(meta)


def decode_meta(blob: bytes) -> Meta:
    """Return the `Meta` stored as `blob`; raise CorruptDataError if it is invalid."""
    try:
        return _meta_decoder.decode(blob)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise CorruptDataError(f"stored metadata is invalid: {error}") from error
