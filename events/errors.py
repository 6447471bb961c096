"""The root of tiermem's exceptions and the errors of the wire layer."""

from __future__ import annotations

__all__ = ["ErrorCode", "LogError", "LogConfigError", "ProtocolError", "TiermemError"]


class ErrorCode:
    """Stable error codes sent in `Error` replies; clients branch on these."""

    MALFORMED = "malformed"
    EMPTY_FRAME = "empty_frame"
    EXTRA_FRAMES = "extra_frames"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    MISSING_FIELD = "missing_field"
    UNSUPPORTED_VERSION = "unsupported_version"
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"

    ALL = (
        MALFORMED,
        EMPTY_FRAME,
        EXTRA_FRAMES,
        TOO_LARGE,
        TOO_DEEP,
        UNKNOWN_TYPE,
        INVALID_FIELD,
        MISSING_FIELD,
        UNSUPPORTED_VERSION,
        CONFLICT,
        FORBIDDEN,
        UNAVAILABLE,
        INTERNAL,
    )


class TiermemError(Exception):
    """Base class of every exception tiermem raises on purpose."""


class ProtocolError(TiermemError):
    """A message that cannot be accepted, with the code sent back to the client.

    `field` is the JSON path of the offending field (`$.importance`) when the
    problem belongs to one field, and `event_id` the client's id when the
    message got far enough to show one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.event_id = event_id


class LogError(TiermemError):
    """The event log failed to append or read."""


class LogConfigError(LogError):
    """The log's Redis is configured in a way that could lose acknowledged events."""

    def __init__(self, setting: str, actual: str, required: str, fix: str) -> None:
        super().__init__(
            f"the event log's Redis has {setting}={actual!r}, which can lose or "
            f"evict acknowledged events; it must be {required}. Fix: {fix}"
        )
        self.setting = setting
        self.actual = actual
        self.required = required
