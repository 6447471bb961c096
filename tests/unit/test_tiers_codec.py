"""Tests of the per-tier value codec and the metadata encoding."""

from __future__ import annotations

import random

import msgspec
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tiers.base import Meta
from tiers.codec import (
    IM_COMPRESSION,
    LTM_COMPRESSION,
    RAW,
    STM_COMPRESSION,
    ZSTD,
    Compression,
    ValueCodec,
    compression_for,
    decode_meta,
    encode_meta,
)
from tiers.errors import CorruptDataError

COMPRESSIONS = [
    pytest.param(STM_COMPRESSION, id="stm"),
    pytest.param(IM_COMPRESSION, id="im"),
    pytest.param(LTM_COMPRESSION, id="ltm"),
]

# One of each JSON-like kind a memory value can contain.
VALUE_KINDS = [
    pytest.param(None, id="none"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(0, id="zero"),
    pytest.param(2**63 - 1, id="int64-max"),
    pytest.param(-(2**63), id="int64-min"),
    pytest.param(2**64 - 1, id="uint64-max"),
    pytest.param(0.1, id="float"),
    pytest.param(-0.0, id="negative-zero"),
    pytest.param(1.7976931348623157e308, id="float-max"),
    pytest.param("", id="empty-str"),
    pytest.param("Grüße, 世界 🧠", id="unicode"),
    pytest.param("x" * 100 * 1024, id="100KiB-str"),
    pytest.param([], id="empty-list"),
    pytest.param({}, id="empty-dict"),
    pytest.param(
        {"turns": [{"role": "user", "text": "hi " * 40}, {"n": [1, 2.5, None]}]},
        id="nested",
    ),
    pytest.param([[[[["deep"]]]]], id="deep-list"),
]

_META = Meta(
    importance=0.75,
    tags=("work", "urgent"),
    created_ts=1_700_000_000_000,
    updated_ts=1_700_000_000_500,
    accessed_ts=1_700_000_001_000,
    access_count=3,
    version=2,
    tier_since_ts=1_700_000_000_000,
    expires_ts=1_800_000_000_000,
    cache_touch=41,
    size=512,
)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("value", VALUE_KINDS)
def test_codec_round_trips_value_kind(compression, value):
    codec = ValueCodec(compression)

    decoded = codec.decode(codec.encode(value))

    assert decoded == value
    assert type(decoded) is type(value)


def test_codec_round_trips_negative_zero_sign():
    codec = ValueCodec(LTM_COMPRESSION)

    decoded = codec.decode(codec.encode(-0.0))

    assert str(decoded) == "-0.0"


def test_codec_returns_tuple_as_list():
    codec = ValueCodec(IM_COMPRESSION)

    assert codec.decode(codec.encode((1, "a", (2,)))) == [1, "a", [2]]


_json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=40,
)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@given(value=_json_like)
def test_codec_round_trips_any_json_like_value(compression, value):
    codec = ValueCodec(compression)

    assert codec.decode(codec.encode(value)) == value


def test_stm_stores_large_value_raw():
    blob = ValueCodec(STM_COMPRESSION).encode("a" * 10_000)

    assert blob[0] == RAW
    assert len(blob) > 10_000


@pytest.mark.parametrize("compression", [IM_COMPRESSION, LTM_COMPRESSION])
def test_large_value_stored_as_zstd(compression):
    packed = msgspec.msgpack.encode("memory " * 1000)

    blob = ValueCodec(compression).encode("memory " * 1000)

    assert blob[0] == ZSTD
    assert len(blob) < len(packed) // 10
    assert zstandard.ZstdDecompressor().decompress(blob[1:]) == packed


def test_value_under_min_size_stored_raw():
    value = "a" * 40
    packed = msgspec.msgpack.encode(value)
    assert len(packed) < LTM_COMPRESSION.min_size

    blob = ValueCodec(LTM_COMPRESSION).encode(value)

    assert blob == bytes([RAW]) + packed


def test_value_at_min_size_compressed():
    compression = Compression(level=3, min_size=64)
    value = "a" * 62
    assert len(msgspec.msgpack.encode(value)) == 64

    blob = ValueCodec(compression).encode(value)

    assert blob[0] == ZSTD


def test_incompressible_value_stored_raw():
    value = random.Random(7).randbytes(4096)
    packed = msgspec.msgpack.encode(value)

    blob = ValueCodec(LTM_COMPRESSION).encode(value)

    assert blob == bytes([RAW]) + packed


def test_codec_reads_values_of_other_settings():
    value = {"text": "remember this " * 100}
    written = [ValueCodec(c).encode(value) for c in (STM_COMPRESSION, IM_COMPRESSION)]

    reader = ValueCodec(LTM_COMPRESSION)

    assert [reader.decode(blob) for blob in written] == [value, value]


@pytest.mark.parametrize(
    "blob, message",
    [
        pytest.param(b"", "stored value is empty", id="empty"),
        pytest.param(b"\x07\x90", "header byte 0x07", id="unknown-header"),
        pytest.param(b"\x01not a zstd frame", "not a valid zstd frame", id="bad-zstd"),
        pytest.param(b"\x00\xc1", "not valid MessagePack", id="bad-msgpack"),
        pytest.param(b"\x00\x92\x01", "not valid MessagePack", id="truncated-msgpack"),
    ],
)
def test_decode_rejects_corrupt_blob(blob, message):
    with pytest.raises(CorruptDataError, match=message):
        ValueCodec(IM_COMPRESSION).decode(blob)


def test_decode_rejects_truncated_zstd_frame():
    blob = ValueCodec(IM_COMPRESSION).encode("memory " * 1000)

    with pytest.raises(CorruptDataError, match="not a valid zstd frame"):
        ValueCodec(IM_COMPRESSION).decode(blob[:-4])


def test_encode_rejects_unsupported_type():
    with pytest.raises(TypeError):
        ValueCodec(STM_COMPRESSION).encode({"a": 1j})


def test_encode_rejects_int_beyond_64_bits():
    with pytest.raises(OverflowError):
        ValueCodec(STM_COMPRESSION).encode(2**64)


@pytest.mark.parametrize("level", [0, -1, zstandard.MAX_COMPRESSION_LEVEL + 1])
def test_compression_rejects_invalid_level(level):
    with pytest.raises(ValueError, match=f"zstd level {level} is invalid"):
        Compression(level=level)


def test_compression_rejects_negative_min_size():
    with pytest.raises(ValueError, match="min_size -1 is invalid"):
        Compression(level=3, min_size=-1)


def test_compression_grows_with_tier_depth():
    assert compression_for("stm").level is None
    assert compression_for("im").level == 3
    assert compression_for("ltm").level == 12


def test_compression_for_rejects_unknown_tier():
    with pytest.raises(ValueError, match="tier name 'cache' is invalid"):
        compression_for("cache")


def test_meta_round_trips():
    assert decode_meta(encode_meta(_META)) == _META


def test_meta_encodes_as_array():
    blob = encode_meta(_META)

    assert msgspec.msgpack.decode(blob) == [
        0.75,
        ["work", "urgent"],
        1_700_000_000_000,
        1_700_000_000_500,
        1_700_000_001_000,
        3,
        2,
        1_700_000_000_000,
        1_800_000_000_000,
        41,
        512,
    ]


def test_meta_defaults_for_missing_fields():
    blob = msgspec.msgpack.encode([0.5, [], 1, 2, 3, 4, 5, 6])

    meta = decode_meta(blob)

    assert meta.expires_ts is None
    assert meta.cache_touch == 0
    assert meta.size == 0


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b"", id="empty"),
        pytest.param(msgspec.msgpack.encode([0.5]), id="too-few-fields"),
        pytest.param(
            msgspec.msgpack.encode(["high", [], 1, 2, 3, 4, 5, 6]), id="bad-type"
        ),
    ],
)
def test_decode_meta_rejects_invalid_blob(blob):
    with pytest.raises(CorruptDataError, match="stored metadata is invalid"):
        decode_meta(blob)
