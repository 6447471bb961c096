"""Tests of codec detection, request decoding and the Error codes of bad input."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from events import upcast as upcast_module
from events.codec import (
    JSON,
    MSGPACK,
    decode_reply,
    decode_request,
    detect_codec,
    encode_reply,
    encode_request,
)
from events.errors import ErrorCode, ProtocolError
from events.limits import Limits
from events.types import Ack, Error, Forget, Get, Status, Store

LIMITS = Limits()
UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)
DEEP = 10_000

CODECS = [JSON, MSGPACK]


def encode_map(codec: str, fields: dict[str, Any]) -> bytes:
    """Encode a plain map, so tests can send what the typed encoders would not."""
    if codec == JSON:
        return msgspec.json.encode(fields)
    return msgspec.msgpack.encode(fields)


def store_fields(**overrides: Any) -> dict[str, Any]:
    return {"type": "Store", "key": "k", "value": 1, **overrides}


def reject(frame: bytes, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_request(frame, limits)
    return caught.value


def deep_json_store(depth: int) -> bytes:
    return b'{"type":"Store","key":"k","value":' + b"[" * depth + b"]" * depth + b"}"


def deep_msgpack_store(depth: int) -> bytes:
    """Build a Store whose value is `depth` nested arrays, byte by byte.

    msgspec's encoder would recurse as deeply as the value, so the nesting is
    written as fixarray headers (0x91 contains one element, 0x90 none).
    """
    head = msgspec.msgpack.encode({"type": "Store", "key": "k"})
    assert head[0] == 0x82
    entries = head[1:] + msgspec.msgpack.encode("value")
    nesting = b"\x91" * (depth - 1) + b"\x90"
    return b"\x83" + entries + nesting


# Codec detection and replies.


@pytest.mark.parametrize("first", [b"{", b"[", b" ", b"\t", b"\r", b"\n"])
def test_detect_codec_json_first_bytes(first):
    assert detect_codec(first + b"rest") == JSON


@pytest.mark.parametrize("first", [b"\x80", b"\x8f", b"\xde", b"\xdf", b'"', b"h"])
def test_detect_codec_other_bytes_msgpack(first):
    assert detect_codec(first + b"rest") == MSGPACK


@pytest.mark.parametrize("codec", CODECS)
def test_decode_request_returns_codec(codec):
    frame = encode_request(Get(key="k", id="r1"), codec)

    message, used = decode_request(frame, LIMITS)

    assert used == codec
    assert message == Get(key="k", id="r1")


def test_decode_request_json_leading_whitespace():
    message, used = decode_request(b' \n\t{"type":"Get","key":"k"}', LIMITS)

    assert used == JSON
    assert message == Get(key="k")


def test_encode_reply_json_codec():
    frame = encode_reply(Ack(seq=7, id="r1"), JSON)

    assert frame.startswith(b"{")
    assert decode_reply(frame) == Ack(seq=7, id="r1")


def test_encode_reply_msgpack_codec():
    frame = encode_reply(Ack(seq=7, id="r1"), MSGPACK)

    assert 0x80 <= frame[0] <= 0x8F
    assert decode_reply(frame) == Ack(seq=7, id="r1")


def test_decode_request_admin_status():
    message, _ = decode_request(b'{"type":"Status","id":"r1"}', LIMITS)

    assert message == Status(id="r1")


# Frames that are not a message.


def test_empty_frame_rejected():
    error = reject(b"")

    assert error.code == ErrorCode.EMPTY_FRAME
    assert "empty" in error.message


def test_neither_json_nor_msgpack_rejected():
    # 0xc1 is the one byte that MessagePack never uses.
    error = reject(b"\xc1\x00\x01")

    assert error.code == ErrorCode.MALFORMED
    assert "not valid MessagePack" in error.message
    assert "invalid opcode" in error.message
    assert error.field is None


def test_plain_text_frame_rejected():
    # "h" is 0x68, a MessagePack positive fixint, so the frame reads as an int.
    error = reject(b"hello")

    assert error.code == ErrorCode.MALFORMED
    assert "got a MessagePack int" in error.message
    assert "read as JSON" in error.message


def test_invalid_json_rejected():
    error = reject(b'{"type": "Get", "key": }')

    assert error.code == ErrorCode.MALFORMED
    assert "not valid JSON" in error.message
    assert "byte 23" in error.message


def test_json_trailing_data_rejected():
    error = reject(b'{"type":"Get","key":"k"} {}')

    assert error.code == ErrorCode.MALFORMED
    assert "trailing characters" in error.message


@pytest.mark.parametrize(
    ("frame", "description"),
    [
        (b"[1, 2]", "got a JSON array"),
        (b" null", "got a JSON null"),
        (msgspec.msgpack.encode(["Get", "k"]), "got a MessagePack array"),
    ],
)
def test_message_not_a_map_rejected(frame, description):
    error = reject(frame)

    assert error.code == ErrorCode.MALFORMED
    assert description in error.message


def test_frame_over_max_frame_bytes_rejected():
    limits = Limits(max_frame_bytes=100)
    body = b'{"type":"Get","key":"k"}'
    frame = b" " * (101 - len(body)) + body

    error = reject(frame, limits)

    assert error.code == ErrorCode.TOO_LARGE
    assert "101 bytes" in error.message
    assert "limit is 100" in error.message


def test_frame_at_max_frame_bytes_accepted():
    limits = Limits(max_frame_bytes=100)
    body = b'{"type":"Get","key":"k"}'
    frame = b" " * (100 - len(body)) + body

    message, _ = decode_request(frame, limits)

    assert len(frame) == 100
    assert message == Get(key="k")


# Unknown types and fields.


@pytest.mark.parametrize("codec", CODECS)
def test_unknown_type_rejected(codec):
    error = reject(encode_map(codec, {"type": "Remember", "key": "k"}))

    assert error.code == ErrorCode.UNKNOWN_TYPE
    assert error.field == "$.type"
    assert "'Remember'" in error.message
    assert "Digest, Forget, Get, Maintain, ReadLog, Rebuild, Search, Status, Store" in error.message


def test_reply_type_as_request_rejected():
    error = reject(b'{"type":"Ack","seq":1}')

    assert error.code == ErrorCode.UNKNOWN_TYPE
    assert error.field == "$.type"


def test_missing_type_rejected():
    error = reject(b'{"key":"k"}')

    assert error.code == ErrorCode.MISSING_FIELD
    assert error.field == "$.type"


@pytest.mark.parametrize("codec", CODECS)
def test_unknown_field_rejected(codec):
    error = reject(encode_map(codec, {"type": "Get", "key": "k", "colour": "red"}))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.colour"
    assert "unknown field `colour`" in error.message


@pytest.mark.parametrize("codec", CODECS)
def test_forget_without_key_is_a_namespace_forget(codec):
    message, _ = decode_request(encode_map(codec, {"type": "Forget", "namespace": "agent-1"}), LIMITS)

    assert isinstance(message, Forget)
    assert message.key is None
    assert message.namespace == "agent-1"


@pytest.mark.parametrize("codec", CODECS)
def test_namespace_forget_with_expected_version_rejected(codec):
    error = reject(encode_map(codec, {"type": "Forget", "namespace": "agent-1", "expected_version": 2}))

    assert error.code == ErrorCode.INVALID_FIELD
    assert "a Forget of a whole namespace takes no expected_version" in error.message


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("type_name", ["Get", "Store"])
def test_missing_key_rejected(codec, type_name):
    fields: dict[str, Any] = {"type": type_name}
    if type_name == "Store":
        fields["value"] = 1

    error = reject(encode_map(codec, fields))

    assert error.code == ErrorCode.MISSING_FIELD
    assert error.field == "$.key"
    assert "missing required field `key`" in error.message


# Wrong field types and numbers out of range.


@pytest.mark.parametrize("codec", CODECS)
def test_wrong_field_type_rejected(codec):
    error = reject(encode_map(codec, store_fields(importance="high")))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.importance"
    assert "Expected `float`, got `str`" in error.message


@pytest.mark.parametrize("codec", CODECS)
def test_wrong_key_type_rejected(codec):
    error = reject(encode_map(codec, {"type": "Get", "key": 5}))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.key"
    assert "Expected `str`, got `int`" in error.message


def test_error_carries_client_id():
    # The id comes after the bad field, so the codec must look past the error.
    error = reject(b'{"type":"Store","key":"k","value":1,"importance":"x","id":"r1"}')

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.event_id == "r1"


@pytest.mark.parametrize("number", [2**64, 2**65 - 1, INT64_MIN - 1])
def test_65_bit_integer_in_value_json(number):
    error = reject(b'{"type":"Store","key":"k","value":%d}' % number)

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value"
    assert f"integer {number} does not fit in 64 bits" in error.message


def test_65_bit_integer_nested_in_value_json():
    error = reject(b'{"type":"Store","key":"k","value":{"a":[1,%d]}}' % 2**64)

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value.a[1]"


def test_65_bit_integer_in_ttl_json():
    error = reject(b'{"type":"Store","key":"k","value":1,"ttl_s":%d}' % 2**64)

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.ttl_s"
    assert "<= 315360000" in error.message


def test_65_bit_integer_in_seq_json():
    error = reject(b'{"type":"Get","key":"k","seq":%d}' % 2**64)

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.seq"
    assert "<= 9223372036854775807" in error.message


def test_msgpack_cannot_encode_65_bit_integer():
    # So the largest integers a MessagePack client can send are the 64-bit edges.
    with pytest.raises(OverflowError):
        msgspec.msgpack.encode(2**64)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("number", [UINT64_MAX, INT64_MIN])
def test_64_bit_edges_in_value_accepted(codec, number):
    message, _ = decode_request(encode_map(codec, store_fields(value=number)), LIMITS)

    assert message.value == number


@pytest.mark.parametrize(("number", "bound"), [(UINT64_MAX, "<="), (INT64_MIN, ">=")])
def test_64_bit_edges_in_ttl_msgpack(number, bound):
    error = reject(encode_map(MSGPACK, store_fields(ttl_s=number)))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.ttl_s"
    assert f"Expected `int` {bound}" in error.message


@pytest.mark.parametrize(
    ("number", "bound"),
    [(float("nan"), ">= 0.0"), (float("inf"), "<= 1.0"), (float("-inf"), ">= 0.0")],
)
def test_non_finite_importance_msgpack(number, bound):
    error = reject(encode_map(MSGPACK, store_fields(importance=number)))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.importance"
    assert f"Expected `float` {bound}" in error.message


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_in_value_msgpack(number):
    error = reject(encode_map(MSGPACK, store_fields(value={"score": [number]})))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value.score[0]"
    assert "not finite" in error.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literal_json_malformed(literal):
    # JSON has no NaN or Infinity, so these literals make the frame invalid JSON.
    frame = b'{"type":"Store","key":"k","value":1,"importance":' + literal + b"}"

    error = reject(frame)

    assert error.code == ErrorCode.MALFORMED
    assert "not valid JSON" in error.message


def test_float_overflow_json_rejected():
    error = reject(b'{"type":"Store","key":"k","value":1e400}')

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value"
    assert "out of range" in error.message


# Nesting depth and size.


def test_deep_value_json_rejected():
    error = reject(deep_json_store(DEEP))

    assert error.code == ErrorCode.TOO_DEEP
    assert error.field == "$.value"
    assert "nested deeper than 32 levels" in error.message


def test_deep_value_msgpack_rejected():
    frame = deep_msgpack_store(DEEP)
    assert len(frame) > DEEP

    error = reject(frame)

    assert error.code == ErrorCode.TOO_DEEP
    assert error.field == "$.value"
    assert "nested deeper than 32 levels" in error.message


@pytest.mark.parametrize("build", [deep_json_store, deep_msgpack_store])
def test_value_at_max_depth_accepted(build):
    message, _ = decode_request(build(LIMITS.max_depth), LIMITS)

    depth = 0
    item = message.value
    while isinstance(item, list):
        depth += 1
        item = item[0] if item else None
    assert depth == LIMITS.max_depth


@pytest.mark.parametrize("build", [deep_json_store, deep_msgpack_store])
def test_value_over_max_depth_rejected(build):
    error = reject(build(LIMITS.max_depth + 1))

    assert error.code == ErrorCode.TOO_DEEP
    assert error.field == "$.value" + "[0]" * LIMITS.max_depth


def string_of_msgpack_size(size: int) -> str:
    """Return a string whose MessagePack encoding is exactly `size` bytes."""
    # A str of 65,536 bytes or more has a 5-byte str32 header.
    assert size - 5 >= 2**16
    text = "x" * (size - 5)
    assert len(msgspec.msgpack.encode(text)) == size
    return text


@pytest.mark.parametrize("codec", CODECS)
def test_value_at_max_value_bytes_accepted(codec):
    value = string_of_msgpack_size(LIMITS.max_value_bytes)

    message, _ = decode_request(encode_map(codec, store_fields(value=value)), LIMITS)

    assert message.value == value


@pytest.mark.parametrize("codec", CODECS)
def test_value_over_max_value_bytes_rejected(codec):
    value = string_of_msgpack_size(LIMITS.max_value_bytes + 1)

    error = reject(encode_map(codec, store_fields(value=value)))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.value"
    size = LIMITS.max_value_bytes + 1
    assert f"value is {size} bytes as MessagePack" in error.message


def test_value_size_counts_msgpack_not_json():
    # Each 10**9 is 5 bytes in MessagePack but 10 characters in JSON.
    limits = Limits(max_value_bytes=76)
    value = [10**9] * 15
    frame = encode_map(JSON, store_fields(value=value))
    assert len(msgspec.json.encode(value)) == 166
    assert len(msgspec.msgpack.encode(value)) == 76

    message, _ = decode_request(frame, limits)

    assert message.value == value


# Names.


@pytest.mark.parametrize("codec", CODECS)
def test_key_with_nul_rejected(codec):
    error = reject(encode_map(codec, {"type": "Get", "key": "a\x00b"}))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.key"
    assert "NUL byte" in error.message


def test_id_over_max_id_bytes_rejected():
    error = reject(encode_map(JSON, {"type": "Get", "key": "k", "id": "r" * 129}))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.id"


# Versions and upcasting.


@pytest.mark.parametrize("codec", CODECS)
def test_newer_version_rejected(codec):
    error = reject(encode_map(codec, store_fields(v=3, id="r1")))

    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error.field == "$.v"
    assert "Store v3" in error.message
    assert "versions 1 to 2" in error.message
    assert error.event_id == "r1"


def test_newer_version_with_new_field_rejected():
    # A field added in a later version must not hide the version mismatch.
    error = reject(encode_map(JSON, store_fields(v=3, colour="red")))

    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error.field == "$.v"


def test_version_zero_rejected():
    error = reject(encode_map(JSON, {"type": "Get", "key": "k", "v": 0}))

    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error.field == "$.v"
    assert "Get v0" in error.message
    assert "versions 1 to 1" in error.message


@pytest.mark.parametrize("codec", CODECS)
def test_store_v1_comma_tags_upcast(codec):
    frame = encode_map(codec, store_fields(v=1, tags="red, green,,blue"))

    message, _ = decode_request(frame, LIMITS)

    assert isinstance(message, Store)
    assert message.v == 2
    assert message.tags == ["red", "green", "blue"]


def test_store_v1_upcast_checked_against_limits():
    tags = ",".join(f"t{index}" for index in range(LIMITS.max_tags + 1))

    error = reject(encode_map(JSON, store_fields(v=1, tags=tags)))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.tags"


def test_store_v1_upcast_invalid_field_rejected():
    error = reject(encode_map(JSON, store_fields(v=1, tags="a", importance="x")))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.importance"


def test_missing_upcaster_rejected(monkeypatch):
    monkeypatch.setitem(upcast_module.CURRENT_VERSIONS, "Get", 2)

    error = reject(encode_map(JSON, {"type": "Get", "key": "k", "v": 1}))

    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error.field == "$.v"
    assert "Get v1 has no upcaster to v2" in error.message


def test_error_reply_encodes_code_and_field():
    reply = Error(id="r1", code=ErrorCode.MISSING_FIELD, message="m", field="$.key")

    decoded = msgspec.json.decode(encode_reply(reply, JSON))

    assert decoded["type"] == "Error"
    assert decoded["code"] == "missing_field"
    assert decoded["field"] == "$.key"
    assert decoded["id"] == "r1"


@pytest.mark.parametrize("codec", CODECS)
def test_ack_encodes_every_field(codec):
    frame = encode_reply(Ack(id="r1", seq=3), codec)
    if codec == JSON:
        decoded = msgspec.json.decode(frame)
    else:
        decoded = msgspec.msgpack.decode(frame)

    assert decoded == {"type": "Ack", "id": "r1", "seq": 3, "duplicate": False}


def test_error_encodes_missing_field_as_null():
    reply = Error(id="r1", code=ErrorCode.INTERNAL, message="m")

    decoded = msgspec.json.decode(encode_reply(reply, JSON))

    assert "field" in decoded
    assert decoded["field"] is None


def test_old_version_with_invalid_utf8_is_malformed():
    # The header reads (a Forget v1 needs upcasting), but a later string is
    # not UTF-8, so the untyped decode of the upcast path fails too.
    frame = b'{"type":"Forget","v":1,"namespace":"fz","namespae":"\xff","id":"x1"}'

    error = reject(frame)

    assert error.code == ErrorCode.MALFORMED
    assert error.event_id == "x1"


@pytest.mark.parametrize("codec", CODECS)
def test_forget_v1_without_key_rejected(codec):
    # v1 required the key, so its absence is a client's mistake, never a
    # Forget of the whole namespace.
    error = reject(encode_map(codec, {"type": "Forget", "v": 1, "namespace": "agent-1", "id": "old-1"}))

    assert error.code == ErrorCode.MISSING_FIELD
    assert error.field == "$.key"
    assert error.event_id == "old-1"


def test_namespace_forget_error_names_field():
    error = reject(encode_map(JSON, {"type": "Forget", "namespace": "agent-1", "expected_version": 2}))

    assert error.field == "$.expected_version"
