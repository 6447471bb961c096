"""The exceptions the projections raise."""

from __future__ import annotations

from events.errors import TiermemError

__all__ = ["DatabaseNotFoundError", "LogGapError", "ProjectionError"]


class ProjectionError(TiermemError):
    """Base class of the projection errors, and the error for an invalid projection."""


class DatabaseNotFoundError(ProjectionError):
    """The projection database file does not exist yet."""

    def __init__(self, db_path: str) -> None:
        super().__init__(
            f"projection database {db_path!r} not found: the projections have not run "
            "there yet; start the stack with `tiermem up`, or run `tiermem projections run`"
        )
        self.db_path = db_path


class LogGapError(ProjectionError):
    """The log has no event with the next sequence number a projection needs.

    `actual_seq` is the seq the log returned instead, or None when it
    returned nothing although its last seq is higher.
    """

    def __init__(self, expected_seq: int, actual_seq: int | None) -> None:
        found = f"got seq {actual_seq}" if actual_seq is not None else "found no event"
        super().__init__(
            f"the event log has a gap: expected seq {expected_seq}, {found}; "
            "projections need every event after their checkpoint, so rebuild "
            "them from a complete log"
        )
        self.expected_seq = expected_seq
        self.actual_seq = actual_seq
