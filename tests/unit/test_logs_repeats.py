"""Tests of the rate limit on repeated warnings and errors."""

from __future__ import annotations

import pytest
import structlog

from tiermem.logs import RepeatLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def emit(limiter: RepeatLimiter, level: str = "warning", **fields) -> dict | None:
    event = {"event": "tier.unreachable", **fields}
    try:
        return dict(limiter(None, level, event))
    except structlog.DropEvent:
        return None


def test_burst_passes_then_drops():
    limiter = RepeatLimiter(burst=3, window_s=10, clock=Clock())

    shown = [emit(limiter, shard=1) for _ in range(10)]

    assert sum(line is not None for line in shown) == 3
    assert shown[3:] == [None] * 7


def test_next_window_reports_dropped_count():
    clock = Clock()
    limiter = RepeatLimiter(burst=2, window_s=10, clock=clock)
    for _ in range(7):
        emit(limiter, shard=1)

    clock.now = 10.0
    line = emit(limiter, shard=1)

    assert line is not None
    assert line["repeated"] == 5
    assert "repeated" not in (emit(limiter, shard=1) or {})


def test_kinds_are_limited_apart():
    limiter = RepeatLimiter(burst=1, window_s=10, clock=Clock())

    first = emit(limiter, shard=1)
    other_shard = emit(limiter, shard=2)
    repeat = emit(limiter, shard=1)

    assert first is not None
    assert other_shard is not None
    assert repeat is None


def test_event_ids_do_not_split_kinds():
    limiter = RepeatLimiter(burst=1, window_s=10, clock=Clock())

    emit(limiter, shard=1, event_id="a", seq=1)

    assert emit(limiter, shard=1, event_id="b", seq=2) is None


@pytest.mark.parametrize("level", ["debug", "info"])
def test_info_and_debug_never_limited(level):
    limiter = RepeatLimiter(burst=1, window_s=10, clock=Clock())

    shown = [emit(limiter, level=level) for _ in range(5)]

    assert None not in shown


def test_tracked_kinds_bounded():
    limiter = RepeatLimiter(burst=1, window_s=10, max_kinds=3, clock=Clock())

    for shard in range(10):
        emit(limiter, shard=shard)

    assert len(limiter._kinds) == 3


def test_invalid_burst_rejected():
    with pytest.raises(ValueError, match="burst 0"):
        RepeatLimiter(burst=0)
