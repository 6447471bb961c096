"""Tests of the input limits that `check_limits` enforces on decoded messages."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from events.errors import ErrorCode, ProtocolError
from events.limits import Limits, check_limits, value_size
from events.types import Digest, Forget, Get, Maintain, Message, Status, Store

LIMITS = Limits()


def reject(message: Message, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        check_limits(message, limits)
    return caught.value


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_maps(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# Defaults, which docs/protocol.md lists.


def test_limits_defaults():
    assert LIMITS.max_frame_bytes == 2 * 1024 * 1024
    assert LIMITS.max_value_bytes == 1024 * 1024
    assert LIMITS.max_key_bytes == 512
    assert LIMITS.max_namespace_bytes == 256
    assert LIMITS.max_id_bytes == 128
    assert LIMITS.max_tags == 32
    assert LIMITS.max_tag_bytes == 64
    assert LIMITS.max_depth == 32


def test_limits_frozen():
    with pytest.raises(AttributeError):
        LIMITS.max_depth = 64  # type: ignore[misc]


def test_value_size_is_msgpack_length():
    value = {"text": "héllo", "numbers": [1, 2.5, 10**9], "flag": None}

    assert value_size(value) == len(msgspec.msgpack.encode(value))


# Ids, namespaces and keys.


def test_id_at_max_id_bytes_accepted():
    check_limits(Get(key="k", id="r" * 128), LIMITS)


def test_id_over_max_id_bytes_rejected():
    error = reject(Get(key="k", id="r" * 129))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.id"
    assert "129 bytes" in error.message
    assert "limit is 128" in error.message


def test_id_counts_utf8_bytes():
    # "é" is two bytes in UTF-8, so 64 of them fit in 128 bytes and 65 do not.
    check_limits(Get(key="k", id="é" * 64), LIMITS)

    error = reject(Get(key="k", id="é" * 65))

    assert error.code == ErrorCode.TOO_LARGE
    assert "130 bytes" in error.message


def test_empty_id_rejected():
    error = reject(Get(key="k", id=""))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.id"
    assert "must not be empty" in error.message


@pytest.mark.parametrize("message_type", [Status, Digest])
def test_admin_request_id_checked(message_type):
    error = reject(message_type(id="r" * 129))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.id"


def test_namespace_over_max_rejected():
    check_limits(Get(key="k", namespace="n" * 256), LIMITS)

    error = reject(Get(key="k", namespace="n" * 257, id="r1"))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.namespace"
    assert error.event_id == "r1"


def test_namespace_with_nul_rejected():
    error = reject(Forget(key="k", namespace="agent\x00"))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.namespace"
    assert "NUL byte" in error.message


def test_maintain_without_namespace_accepted():
    check_limits(Maintain(), LIMITS)


def test_maintain_empty_namespace_rejected():
    error = reject(Maintain(namespace=""))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.namespace"


@pytest.mark.parametrize("message_type", [Get, Forget])
def test_key_over_max_rejected(message_type):
    check_limits(message_type(key="k" * 512), LIMITS)

    error = reject(message_type(key="k" * 513))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.key"
    assert "513 bytes" in error.message


@pytest.mark.parametrize("message_type", [Get, Forget])
def test_key_with_nul_rejected(message_type):
    error = reject(message_type(key="a\x00b", id="r1"))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.key"
    assert "'a\\x00b'" in error.message
    assert error.event_id == "r1"


def test_empty_key_rejected():
    error = reject(Store(key="", value=1))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.key"


# Tags.


def test_tags_at_max_count_accepted():
    check_limits(Store(key="k", value=1, tags=[f"t{i}" for i in range(32)]), LIMITS)


def test_tags_over_max_count_rejected():
    error = reject(Store(key="k", value=1, tags=[f"t{i}" for i in range(33)]))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.tags"
    assert "33 tags" in error.message


def test_tag_over_max_bytes_rejected():
    check_limits(Store(key="k", value=1, tags=["ok", "t" * 64]), LIMITS)

    error = reject(Store(key="k", value=1, tags=["ok", "t" * 65]))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.tags[1]"


def test_empty_tag_rejected():
    error = reject(Store(key="k", value=1, tags=[""]))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.tags[0]"


def test_tag_with_nul_rejected():
    error = reject(Store(key="k", value=1, tags=["a", "b\x00"]))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.tags[1]"


# Values.


@pytest.mark.parametrize("build", [nested_lists, nested_maps])
def test_value_at_max_depth_accepted(build):
    check_limits(Store(key="k", value=build(32)), LIMITS)


def test_list_over_max_depth_rejected():
    error = reject(Store(key="k", value=nested_lists(33)))

    assert error.code == ErrorCode.TOO_DEEP
    assert error.field == "$.value" + "[0]" * 32
    assert "deeper than 32 levels" in error.message


def test_map_over_max_depth_rejected():
    error = reject(Store(key="k", value=nested_maps(33)))

    assert error.code == ErrorCode.TOO_DEEP
    assert error.field == "$.value" + ".a" * 32


def test_very_deep_value_rejected_without_recursion():
    # Built in Python, past the decoder: the check itself must not recurse.
    error = reject(Store(key="k", value=nested_lists(10_000)))

    assert error.code == ErrorCode.TOO_DEEP


def test_max_depth_configurable():
    limits = Limits(max_depth=2)
    check_limits(Store(key="k", value=[[1]]), limits)

    error = reject(Store(key="k", value=[[[1]]]), limits)

    assert error.code == ErrorCode.TOO_DEEP


@pytest.mark.parametrize("number", [2**64 - 1, -(2**63), 0, True])
def test_64_bit_integer_in_value_accepted(number):
    check_limits(Store(key="k", value={"n": number}), LIMITS)


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 2**100])
def test_65_bit_integer_in_value_rejected(number):
    error = reject(Store(key="k", value={"n": number}))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value.n"
    assert str(number) in error.message


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_float_in_value_rejected(number):
    error = reject(Store(key="k", value=[1.5, number]))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value[1]"
    assert "not finite" in error.message


def test_non_string_map_key_rejected():
    error = reject(Store(key="k", value={"ok": {7: "seven"}}))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value.ok"
    assert "must be strings" in error.message
    assert "int 7" in error.message


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(b"raw", "bytes"), (msgspec.msgpack.Ext(1, b"x"), "Ext"), ({1, 2}, "set")],
)
def test_non_json_value_rejected(value, type_name):
    error = reject(Store(key="k", value=value))

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.value"
    assert f"values of type {type_name} are not allowed" in error.message


def test_value_at_max_value_bytes_accepted():
    limits = Limits(max_value_bytes=10)
    value = "x" * 9  # a fixstr: one header byte and 9 bytes of text

    assert value_size(value) == 10
    check_limits(Store(key="k", value=value), limits)


def test_value_over_max_value_bytes_rejected():
    limits = Limits(max_value_bytes=10)

    error = reject(Store(key="k", value="x" * 10, id="r1"), limits)

    assert error.code == ErrorCode.TOO_LARGE
    assert error.field == "$.value"
    assert "11 bytes as MessagePack" in error.message
    assert "limit is 10" in error.message
    assert error.event_id == "r1"
