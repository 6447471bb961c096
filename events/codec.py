"""Wire codecs: MessagePack and JSON, chosen by the client per message.

A frame whose first byte is `{`, `[` or JSON white space is JSON; anything
else is MessagePack. No MessagePack event can start with those bytes, because
an event is a map and MessagePack maps start with 0x80-0x8f, 0xde or 0xdf.
Replies go back in the codec of the request.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from events.errors import ErrorCode, LogError, ProtocolError
from events.limits import Limits, check_limits
from events.types import AnyEvent, Event, Message, Reply, Request
from events.upcast import CURRENT_VERSIONS, needs_upcast, upcast

__all__ = [
    "JSON",
    "MSGPACK",
    "decode_event",
    "decode_reply",
    "decode_request",
    "detect_codec",
    "encode_event",
    "encode_reply",
    "encode_request",
]

JSON = "json"
MSGPACK = "msgpack"

_JSON_START = frozenset(b"{[ \t\r\n")

_json_request = msgspec.json.Decoder(Request)
_msgpack_request = msgspec.msgpack.Decoder(Request)
_json_reply = msgspec.json.Decoder(Reply)
_msgpack_reply = msgspec.msgpack.Decoder(Reply)
_msgpack_event = msgspec.msgpack.Decoder(AnyEvent)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


class _Header(msgspec.Struct):
    """The fields needed to route a message to an upcaster and to echo its id.

    Typed loosely, so a wrong `type` or `v` does not also lose a readable id.
    """

    type: Any = None
    v: Any = None
    id: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str):
            self.type = None
        if not isinstance(self.v, int) or isinstance(self.v, bool):
            self.v = None
        if not isinstance(self.id, str):
            self.id = None


_json_header = msgspec.json.Decoder(_Header)
_msgpack_header = msgspec.msgpack.Decoder(_Header)

_PATH = re.compile(r"at `(\$[^`]*)`")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]*)`")
# The message of Forget.__post_init__, which msgspec reports without a path.
_NAMESPACE_FORGET = "a Forget of a whole namespace takes no expected_version"
_NOT_A_MAP = re.compile(r"^Expected `object`, got `([^`]*)`")

_CODEC_NAMES = {JSON: "JSON", MSGPACK: "MessagePack"}
_DETECTION_RULE = (
    "Frames that start with `{`, `[` or JSON white space are read as JSON, "
    "all others as MessagePack."
)


def detect_codec(frame: bytes) -> str:
    """Return `json` or `msgpack` for a non-empty frame."""
    return JSON if frame[0] in _JSON_START else MSGPACK


def _peek_header(frame: bytes, codec: str) -> _Header | None:
    try:
        if codec == JSON:
            return _json_header.decode(frame)
        return _msgpack_header.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return None


def _validation_error(
    error: msgspec.ValidationError, event_id: str | None, codec: str
) -> ProtocolError:
    text = str(error)
    path = _PATH.search(text)
    field = path.group(1) if path else None
    not_a_map = _NOT_A_MAP.search(text)
    if field is None and not_a_map:
        return ProtocolError(
            ErrorCode.MALFORMED,
            f"expected a JSON object or a MessagePack map, got a "
            f"{_CODEC_NAMES[codec]} {not_a_map.group(1)}. {_DETECTION_RULE}",
        )
    if field == "$.type" and text.startswith("Invalid value"):
        return ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"{text}; known types are {', '.join(sorted(_known_types()))}",
            field=field,
            event_id=event_id,
        )
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown:
        return ProtocolError(
            ErrorCode.INVALID_FIELD,
            text,
            field=f"{field or '$'}.{unknown.group(1)}",
            event_id=event_id,
        )
    missing = _MISSING_FIELD.search(text)
    if missing:
        return ProtocolError(
            ErrorCode.MISSING_FIELD,
            text,
            field=f"{field or '$'}.{missing.group(1)}",
            event_id=event_id,
        )
    if field is None and _NAMESPACE_FORGET in text:
        field = "$.expected_version"
    return ProtocolError(ErrorCode.INVALID_FIELD, text, field=field, event_id=event_id)


def _known_types() -> list[str]:
    return [cls.__struct_config__.tag for cls in Request.__args__]


def _decode_untyped(frame: bytes, codec: str) -> Any:
    if codec == JSON:
        return msgspec.json.decode(frame)
    return msgspec.msgpack.decode(frame)


def _decode_upcast(frame: bytes, codec: str, header: _Header) -> Message:
    try:
        raw = _decode_untyped(frame, codec)
    except RecursionError:
        raise ProtocolError(
            ErrorCode.TOO_DEEP, "message is nested too deeply", event_id=header.id
        ) from None
    except msgspec.DecodeError as error:
        # The header read, but the whole frame does not (invalid UTF-8 in a
        # later field, say): the typed decode failed for the same reason.
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"the frame is not valid {_CODEC_NAMES[codec]}: {error}. {_DETECTION_RULE}",
            event_id=header.id,
        ) from None
    try:
        lifted = upcast(raw)
    except msgspec.ValidationError as error:
        raise _validation_error(error, header.id, codec) from None
    except KeyError:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{header.type} v{header.v} has no upcaster to v"
            f"{CURRENT_VERSIONS[header.type or '']}",
            field="$.v",
            event_id=header.id,
        ) from None
    try:
        return msgspec.convert(lifted, Request)
    except msgspec.ValidationError as error:
        raise _validation_error(error, header.id, codec) from None


def decode_request(frame: bytes, limits: Limits) -> tuple[Message, str]:
    """Decode, upcast and check one request frame; return it and its codec.

    Every failure raises `ProtocolError` with a stable code, so the caller
    only has one exception to turn into an `Error` reply.
    """
    if not frame:
        raise ProtocolError(ErrorCode.EMPTY_FRAME, "the message frame is empty")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"frame is {len(frame)} bytes; the limit is {limits.max_frame_bytes}",
        )
    codec = detect_codec(frame)
    decoder = _json_request if codec == JSON else _msgpack_request
    try:
        message = decoder.decode(frame)
    except RecursionError:
        header = _peek_header(frame, codec)
        raise ProtocolError(
            ErrorCode.TOO_DEEP,
            f"message is nested deeper than {limits.max_depth} levels",
            field="$.value",
            event_id=header.id if header else None,
        ) from None
    except msgspec.ValidationError as error:
        header = _peek_header(frame, codec)
        event_id = header.id if header else None
        if header is not None and header.type in CURRENT_VERSIONS and header.v:
            _check_version(header)
            if needs_upcast(header.type, header.v):
                message = _decode_upcast(frame, codec, header)
                check_limits(message, limits)
                return message, codec
        raise _validation_error(error, event_id, codec) from None
    except msgspec.DecodeError as error:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"the frame is not valid {_CODEC_NAMES[codec]}: {error}. "
            f"{_DETECTION_RULE}",
        ) from None

    if isinstance(message, Event):
        type_name = message.__struct_config__.tag
        header = _Header(type=type_name, v=message.v, id=message.id)
        _check_version(header)
        if needs_upcast(type_name, message.v):
            message = _decode_upcast(frame, codec, header)
    check_limits(message, limits)
    return message, codec


def _check_version(header: _Header) -> None:
    current = CURRENT_VERSIONS[header.type or ""]
    if header.v is not None and (header.v > current or header.v < 1):
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{header.type} v{header.v} is not known to this server; it reads "
            f"versions 1 to {current}",
            field="$.v",
            event_id=header.id,
        )


def encode_reply(reply: Message, codec: str) -> bytes:
    """Encode a reply in the codec the request used."""
    if codec == JSON:
        return _json_encoder.encode(reply)
    return _msgpack_encoder.encode(reply)


def encode_request(request: Message, codec: str = MSGPACK) -> bytes:
    """Encode a request for the wire; clients use this."""
    if codec == JSON:
        return _json_encoder.encode(request)
    return _msgpack_encoder.encode(request)


def decode_reply(frame: bytes) -> Message:
    """Decode a reply frame in either codec."""
    if detect_codec(frame) == JSON:
        return _json_reply.decode(frame)
    return _msgpack_reply.decode(frame)


def encode_event(event: Event) -> bytes:
    """Encode an event for the log: MessagePack, always."""
    return _msgpack_encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode an event read from the log, upcasting entries of older versions.

    Raises `LogError` for an entry this release cannot read: a version newer
    than it knows (written by a later release), or one with no upcaster.
    """
    try:
        event = _msgpack_event.decode(data)
    except msgspec.ValidationError:
        event = None
    if event is not None:
        tag = event.__struct_config__.tag
        if event.v > CURRENT_VERSIONS[tag]:
            raise LogError(
                f"log entry seq {event.seq} is {tag} v{event.v}, newer than this "
                f"release reads (v{CURRENT_VERSIONS[tag]}); upgrade tiermem to replay it"
            )
        if not needs_upcast(tag, event.v):
            return event
    try:
        return msgspec.convert(upcast(msgspec.msgpack.decode(data)), AnyEvent)
    except (KeyError, msgspec.DecodeError) as error:
        raise LogError(f"cannot read log entry {data[:80]!r}: {error!r}") from error
