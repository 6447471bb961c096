"""Checks that mutation testing of `events/` showed missing.

Each test pins a behaviour that a surviving mutant changed while every other
unit test still passed. The areas are the event id echoed in every `Error`,
the walk over a whole value, value sizes, loosely typed headers, upcasting
of log entries and of maps, and the error messages. docs/testing.md lists
the mutants and the command that runs them.
"""

from __future__ import annotations

import math

import msgspec
import pytest

from events import upcast as upcast_module
from events.codec import decode_event, decode_request
from events.errors import ErrorCode, LogConfigError, LogError, ProtocolError
from events.limits import Limits, check_limits
from events.schema import schema_document
from events.types import Store
from events.upcast import CURRENT_VERSIONS, register, upcast

LIMITS = Limits()


def reject(frame: bytes, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_request(frame, limits)
    return caught.value


def reject_store(value: object, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        check_limits(Store(id="e1", key="k", value=value), limits)
    return caught.value


# ----------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value, code, field",
    [
        ([[[[1]]]], ErrorCode.TOO_DEEP, "$.value[0][0][0]"),
        ({"a": {1: "x"}}, ErrorCode.INVALID_FIELD, "$.value.a"),
        ([2**64], ErrorCode.INVALID_FIELD, "$.value[0]"),
        ({"f": math.inf}, ErrorCode.INVALID_FIELD, "$.value.f"),
        ([b"raw"], ErrorCode.INVALID_FIELD, "$.value[0]"),
    ],
)
def test_value_error_echoes_event_id(value, code, field):
    error = reject_store(value, Limits(max_depth=3))

    assert error.code == code
    assert error.field == field
    assert error.event_id == "e1"


@pytest.mark.parametrize("scalar", ["text", None, True])
def test_value_walk_continues_after_scalar(scalar):
    # The walk pops the last child first, so the scalar is checked before the NaN.
    in_list = reject_store([math.nan, scalar])
    in_map = reject_store({"bad": math.nan, "ok": scalar})

    assert in_list.field == "$.value[0]"
    assert in_map.field == "$.value.bad"


def test_integer_of_forty_digits_shown_whole():
    number = 10**39

    error = reject_store(number)

    assert error.message == f"integer {number} does not fit in 64 bits"


def test_integer_over_forty_digits_abbreviated():
    number = 10**40

    error = reject_store(number)

    assert error.message == (
        f"integer {str(number)[:20]}...(41 digits) does not fit in 64 bits"
    )


@pytest.mark.parametrize(
    "store, field",
    [
        (Store(id="e1", namespace="", key="k", value=1), "$.namespace"),
        (Store(id="e1", key="k\x00", value=1), "$.key"),
        (Store(id="e1", key="k" * 513, value=1), "$.key"),
        (Store(id="e1", key="k", value=1, tags=["t"] * 33), "$.tags"),
        (Store(id="e1", key="k", value=1, tags=["ok", ""]), "$.tags[1]"),
    ],
)
def test_name_error_echoes_event_id(store, field):
    with pytest.raises(ProtocolError) as caught:
        check_limits(store, LIMITS)

    assert caught.value.field == field
    assert caught.value.event_id == "e1"


def test_structured_value_size_counted():
    value = [1] * 10  # 11 bytes as MessagePack: a fixarray header and 10 bytes

    error = reject_store(value, Limits(max_value_bytes=10))

    assert error.code == ErrorCode.TOO_LARGE
    assert error.message == "value is 11 bytes as MessagePack; the limit is 10"


@pytest.mark.parametrize("length", [31, 32, 255, 256, 65_535, 65_536])
def test_string_value_size_matches_msgpack(length):
    value = "s" * length
    size = len(msgspec.msgpack.encode(value))

    check_limits(Store(id="e1", key="k", value=value), Limits(max_value_bytes=size))
    error = reject_store(value, Limits(max_value_bytes=size - 1))

    assert error.message == (
        f"value is {size} bytes as MessagePack; the limit is {size - 1}"
    )


def test_empty_frame_message():
    error = reject(b"")

    assert error.code == ErrorCode.EMPTY_FRAME
    assert error.message == "the message frame is empty"


# ----------------------------------------------------------------- headers


def test_header_id_of_wrong_type_echoes_none():
    error = reject(b'{"type":"Store","id":7,"key":"k","value":1}')

    assert error.field == "$.id"
    assert error.event_id is None


def test_boolean_version_rejected():
    error = reject(b'{"type":"Store","v":true,"id":"x","key":"k","value":1}')

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.v"
    assert error.event_id == "x"


def test_type_not_a_string_is_invalid_field():
    error = reject(b'{"type":5,"id":"x","key":"k","value":1}')

    assert error.code == ErrorCode.INVALID_FIELD
    assert error.field == "$.type"


@pytest.mark.parametrize(
    "frame, code, field",
    [
        (b'{"type":"Nope","id":"x"}', ErrorCode.UNKNOWN_TYPE, "$.type"),
        (
            b'{"type":"Store","id":"x","key":"k","value":1,"bogus":1}',
            ErrorCode.INVALID_FIELD,
            "$.bogus",
        ),
        (b'{"type":"Store","id":"x","value":1}', ErrorCode.MISSING_FIELD, "$.key"),
        (
            b'{"type":"Store","v":1,"id":"x","key":"k","tags":"a","value":1,"bogus":1}',
            ErrorCode.INVALID_FIELD,
            "$.bogus",
        ),
    ],
)
def test_field_error_echoes_event_id(frame, code, field):
    error = reject(frame)

    assert error.code == code
    assert error.field == field
    assert error.event_id == "x"


def test_log_config_error_names_setting():
    error = LogConfigError("appendfsync", "no", "always", "set appendfsync always")

    assert str(error) == (
        "the event log's Redis has appendfsync='no', which can lose or evict "
        "acknowledged events; it must be always. Fix: set appendfsync always"
    )
    assert error.setting == "appendfsync"
    assert error.actual == "no"
    assert error.required == "always"


def test_missing_upcaster_is_unsupported_version(monkeypatch):
    monkeypatch.setattr(upcast_module, "_UPCASTERS", {})
    frame = b'{"type":"Store","v":1,"id":"x","key":"k","tags":"a","value":1}'

    error = reject(frame)

    assert error.code == ErrorCode.UNSUPPORTED_VERSION
    assert error.field == "$.v"
    assert error.event_id == "x"
    assert error.message == (
        f"Store v1 has no upcaster to v{CURRENT_VERSIONS['Store']}"
    )


def test_protocol_error_str_is_message():
    error = ProtocolError(ErrorCode.MALFORMED, "the frame is broken", field="$.x")

    assert str(error) == "the frame is broken"


# ----------------------------------------------------------------- log entries


def log_entry(**fields) -> bytes:
    base = {
        "type": "Store",
        "id": "i",
        "namespace": "n",
        "key": "k",
        "value": 1,
        "seq": 3,
        "ts": 5,
    }
    return msgspec.msgpack.encode({**base, **fields})


def test_log_entry_of_old_version_upcast():
    event = decode_event(log_entry(v=1, tags=["a"]))

    assert event.v == CURRENT_VERSIONS["Store"]
    assert event.tags == ["a"]


def test_log_entry_of_newer_version_rejected():
    newer = CURRENT_VERSIONS["Store"] + 1

    with pytest.raises(LogError) as caught:
        decode_event(log_entry(v=newer))

    assert str(caught.value) == (
        f"log entry seq 3 is Store v{newer}, newer than this release reads "
        f"(v{CURRENT_VERSIONS['Store']}); upgrade tiermem to replay it"
    )


def test_unreadable_log_entry_quotes_80_bytes():
    data = msgspec.msgpack.encode({"value": "x" * 100})

    with pytest.raises(LogError) as caught:
        decode_event(data)

    assert str(caught.value) == f"cannot read log entry {data[:80]!r}: KeyError('type')"


# ----------------------------------------------------------------- upcasters


def test_register_stores_upcaster_once(monkeypatch):
    monkeypatch.setattr(upcast_module, "_UPCASTERS", {})

    def lift(message):
        return message

    assert register("Store", 7)(lift) is lift
    assert upcast_module._UPCASTERS == {("Store", 7): lift}
    with pytest.raises(ValueError) as caught:
        register("Store", 7)(lift)
    assert str(caught.value) == "an upcaster for Store v7 exists"


def test_upcast_current_version_unchanged():
    message = {"type": "Store", "v": CURRENT_VERSIONS["Store"], "tags": "a, b"}

    assert upcast(dict(message)) == message


def test_upcast_without_version_reads_v1():
    lifted = upcast({"type": "Store", "tags": "a, b"})

    assert lifted == {
        "type": "Store",
        "tags": ["a", "b"],
        "v": CURRENT_VERSIONS["Store"],
    }


# ----------------------------------------------------------------- schema


def test_schema_title_and_description():
    document = schema_document()

    assert document["title"] == "tiermem wire protocol"
    assert document["description"].startswith(
        "Requests and replies of the tiermem wire protocol in the JSON codec."
    )
