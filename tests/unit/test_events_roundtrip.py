"""Property tests: every request, event and reply survives both wire codecs.

The strategies are derived from the msgspec type information of each class,
so a field added to a type is generated without changing this file. Strings
in ids, namespaces, keys and tags, and the JSON-like values of `Any` fields,
stay within the default `Limits`, because requests go through `decode_request`.
"""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import (
    JSON,
    MSGPACK,
    decode_event,
    decode_reply,
    decode_request,
    encode_event,
    encode_reply,
    encode_request,
)
from events.limits import Limits
from events.types import EVENT_TYPES, REPLY_TYPES, REQUEST_TYPES, Forget, Message, Store
from events.upcast import CURRENT_VERSIONS

LIMITS = Limits()
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

# No deadline: a slow or loaded CI machine would fail examples for time alone.
SETTINGS = settings(deadline=None)

# Maximum UTF-8 size of the string fields that `check_limits` bounds.
NAME_BYTES = {
    "id": LIMITS.max_id_bytes,
    "namespace": LIMITS.max_namespace_bytes,
    "key": LIMITS.max_key_bytes,
    "tags": LIMITS.max_tag_bytes,
}

# Any Unicode scalar value: lone surrogates cannot be encoded as UTF-8.
any_text = st.text(st.characters(codec="utf-8"), max_size=20)


def names(max_bytes: int) -> st.SearchStrategy[str]:
    """Non-empty strings without NUL that fit in `max_bytes` of UTF-8."""
    alphabet = st.characters(codec="utf-8", exclude_characters="\x00")
    text = st.text(alphabet, min_size=1, max_size=min(max_bytes, 24))
    return text.filter(lambda name: len(name.encode()) <= max_bytes)


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)

# Hypothesis stacks `extend` about log2(max_leaves) times, so values nest
# about 5 deep, far below `max_depth`.
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(any_text, children, max_size=4),
    max_leaves=16,
)


def strategy_for(info: mi.Type, field_name: str | None = None) -> st.SearchStrategy:
    """Build a strategy for one msgspec type within its bounds and the limits."""
    if isinstance(info, mi.AnyType):
        return json_values
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.IntType):
        low = info.ge if info.ge is not None else INT64_MIN
        high = info.le if info.le is not None else INT64_MAX
        return st.integers(low, high)
    if isinstance(info, mi.FloatType):
        return st.floats(
            min_value=info.ge,
            max_value=info.le,
            allow_nan=False,
            allow_infinity=False,
        )
    if isinstance(info, mi.StrType):
        if field_name in NAME_BYTES:
            return names(NAME_BYTES[field_name])
        return any_text
    if isinstance(info, mi.UnionType):
        return st.one_of([strategy_for(member, field_name) for member in info.types])
    if isinstance(info, mi.ListType):
        max_size = LIMITS.max_tags if field_name == "tags" else 4
        return st.lists(strategy_for(info.item_type, field_name), max_size=max_size)
    if isinstance(info, mi.DictType):
        return st.dictionaries(
            strategy_for(info.key_type), strategy_for(info.value_type), max_size=4
        )
    if isinstance(info, mi.StructType):
        return struct_strategy(info.cls)
    raise TypeError(f"no strategy for {info!r}: add a branch to strategy_for")


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy:
    """Build instances of `cls`, leaving optional fields at their default sometimes."""
    info = mi.type_info(cls)
    required: dict[str, st.SearchStrategy] = {}
    optional: dict[str, st.SearchStrategy] = {}
    tag = info.tag if isinstance(info.tag, str) else None
    for field in info.fields:
        if field.name == "v" and tag in CURRENT_VERSIONS:
            # An older `v` would be upcast, so the decoded event would differ.
            strategy = st.just(CURRENT_VERSIONS[tag])
        else:
            strategy = strategy_for(field.type, field.name)
        (required if field.required else optional)[field.name] = strategy
    fields = st.fixed_dictionaries(required, optional=optional)
    if cls is Forget:
        # A Forget of a whole namespace (no key) cannot be conditional.
        fields = fields.filter(lambda kwargs: kwargs.get("key") is not None or kwargs.get("expected_version") is None)
    return fields.map(lambda kwargs: cls(**kwargs))


def type_id(cls: type) -> str:
    return cls.__name__


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
@pytest.mark.parametrize("request_type", REQUEST_TYPES, ids=type_id)
@SETTINGS
@given(data=st.data())
def test_request_roundtrip(request_type, codec, data):
    request: Message = data.draw(struct_strategy(request_type))

    decoded, used = decode_request(encode_request(request, codec), LIMITS)

    assert used == codec
    assert decoded == request


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=type_id)
@SETTINGS
@given(data=st.data())
def test_event_log_roundtrip(event_type, data):
    event = data.draw(struct_strategy(event_type))

    assert decode_event(encode_event(event)) == event


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
@pytest.mark.parametrize("reply_type", REPLY_TYPES, ids=type_id)
@SETTINGS
@given(data=st.data())
def test_reply_roundtrip(reply_type, codec, data):
    reply = data.draw(struct_strategy(reply_type))

    assert decode_reply(encode_reply(reply, codec)) == reply


@pytest.mark.parametrize("codec", [JSON, MSGPACK])
@SETTINGS
@given(value=json_values)
def test_value_roundtrip_exact(codec, value: Any):
    # Equality alone would let 1 and 1.0, or True and 1, pass for each other.
    frame = encode_request(Store(key="k", value=value), codec)

    decoded, _ = decode_request(frame, LIMITS)

    assert msgspec.msgpack.encode(decoded.value) == msgspec.msgpack.encode(value)
