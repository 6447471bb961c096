"""Input limits and the checks that enforce them after a message is decoded."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from events.errors import ErrorCode, ProtocolError
from events.types import Event, Message, Store

__all__ = ["Limits", "check_limits", "value_size"]

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1

_encode = msgspec.msgpack.Encoder().encode


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on every message the router accepts; all sizes are in bytes.

    `max_value_bytes` bounds the MessagePack encoding of a `Store` value,
    whichever codec the client used, so a limit means the same in both.
    """

    max_frame_bytes: int = 2 * 1024 * 1024
    max_value_bytes: int = 1024 * 1024
    max_key_bytes: int = 512
    max_namespace_bytes: int = 256
    max_id_bytes: int = 128
    max_tags: int = 32
    max_tag_bytes: int = 64
    max_depth: int = 32


def value_size(value: Any) -> int:
    """Return the size of `value` as the limits count it: its MessagePack length."""
    return len(_encode(value))


def _check_name(what: str, text: str, max_bytes: int, event_id: str | None) -> None:
    if not text:
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            f"{what} must not be empty",
            field=f"$.{what}",
            event_id=event_id,
        )
    if "\x00" in text:
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            f"{what} {text!r} contains a NUL byte, which is not allowed",
            field=f"$.{what}",
            event_id=event_id,
        )
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{what} is {size} bytes; the limit is {max_bytes}",
            field=f"$.{what}",
            event_id=event_id,
        )


def _check_value(value: Any, max_depth: int, event_id: str | None) -> None:
    """Walk `value` iteratively: depth, integer range and finite floats."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$.value")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > max_depth:
                raise ProtocolError(
                    ErrorCode.TOO_DEEP,
                    f"value is nested deeper than {max_depth} levels",
                    field=path,
                    event_id=event_id,
                )
            if isinstance(item, list):
                for index, child in enumerate(item):
                    stack.append((child, depth + 1, f"{path}[{index}]"))
            else:
                for name, child in item.items():
                    if not isinstance(name, str):
                        raise ProtocolError(
                            ErrorCode.INVALID_FIELD,
                            f"map keys inside a value must be strings, got "
                            f"{type(name).__name__} {name!r}",
                            field=path,
                            event_id=event_id,
                        )
                    stack.append((child, depth + 1, f"{path}.{name}"))
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        elif isinstance(item, int):
            if item < _INT64_MIN or item > _UINT64_MAX:
                raise ProtocolError(
                    ErrorCode.INVALID_FIELD,
                    f"integer {_abbreviate(item)} does not fit in 64 bits",
                    field=path,
                    event_id=event_id,
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ProtocolError(
                    ErrorCode.INVALID_FIELD,
                    f"float {item!r} is not finite; NaN and Infinity are not allowed",
                    field=path,
                    event_id=event_id,
                )
        else:
            raise ProtocolError(
                ErrorCode.INVALID_FIELD,
                f"values of type {type(item).__name__} are not allowed",
                field=path,
                event_id=event_id,
            )


def _abbreviate(number: int) -> str:
    text = str(number)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def check_limits(message: Message, limits: Limits) -> None:
    """Raise `ProtocolError` if a decoded message breaks a limit."""
    event_id = message.id
    if event_id is not None:
        _check_name("id", event_id, limits.max_id_bytes, None)
    if not isinstance(message, Event):
        return

    if message.namespace is not None:
        _check_name("namespace", message.namespace, limits.max_namespace_bytes, event_id)
    key = getattr(message, "key", None)
    if key is not None:
        _check_name("key", key, limits.max_key_bytes, event_id)
    if not isinstance(message, Store):
        return

    if len(message.tags) > limits.max_tags:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{len(message.tags)} tags given; the limit is {limits.max_tags}",
            field="$.tags",
            event_id=event_id,
        )
    for index, tag in enumerate(message.tags):
        _check_name(f"tags[{index}]", tag, limits.max_tag_bytes, event_id)

    value = message.value
    if isinstance(value, str):
        # The common case: a string needs no walk, and its MessagePack size
        # is its UTF-8 length plus a header of at most 5 bytes.
        size = len(value.encode("utf-8", "surrogatepass"))
        size += 1 if size < 32 else 2 if size < 256 else 3 if size < 65536 else 5
    else:
        # Depth first: a very deep value would also exhaust the encoder's stack.
        _check_value(value, limits.max_depth, event_id)
        size = value_size(value)
    if size > limits.max_value_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"value is {size} bytes as MessagePack; the limit is "
            f"{limits.max_value_bytes}",
            field="$.value",
            event_id=event_id,
        )
