"""Logging setup for tiermem's processes: structlog, JSON unless on a terminal.

Warnings and errors that repeat are rate-limited by `RepeatLimiter`, so a
Redis that is down for a minute produces a few lines and a count, not
thousands of identical lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = ["RepeatLimiter", "configure_logging"]

# Fields that tell one repeating problem from another; ids and sequence
# numbers are left out on purpose, since they differ on every line.
_IDENTITY_FIELDS = ("shard", "tier", "role", "lane", "queue", "check")
_LIMITED_LEVELS = frozenset({"warning", "error", "critical"})


class RepeatLimiter:
    """A structlog processor that passes at most `burst` lines per kind per `window_s` seconds.

    A kind is the event name, the level and the fields in `_IDENTITY_FIELDS`.
    Lines of a kind beyond the burst are dropped and counted. The first line
    of the kind after its window has passed carries `repeated`, the number
    dropped since the last line shown. Only warnings and errors are limited.
    At most `max_kinds` kinds are tracked, the least recent forgotten first.
    """

    def __init__(
        self,
        *,
        burst: int = 5,
        window_s: float = 10.0,
        max_kinds: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window_s <= 0:
            raise ValueError(f"burst {burst} and window_s {window_s} are invalid: use burst >= 1 and window_s > 0")
        self.burst = burst
        self.window_s = window_s
        self.max_kinds = max_kinds
        self._clock = clock
        self._lock = threading.Lock()
        # kind -> [window start, lines passed in the window, lines dropped]
        self._kinds: OrderedDict[tuple[Any, ...], list[float]] = OrderedDict()

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if method_name not in _LIMITED_LEVELS:
            return event_dict
        kind = (event_dict.get("event"), method_name, *(repr(event_dict.get(name)) for name in _IDENTITY_FIELDS))
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                state = [now, 0, 0]
                self._kinds[kind] = state
                while len(self._kinds) > self.max_kinds:
                    self._kinds.popitem(last=False)
            else:
                self._kinds.move_to_end(kind)
            if now - state[0] >= self.window_s:
                state[0], state[1] = now, 0
            if state[1] >= self.burst:
                state[2] += 1
                raise structlog.DropEvent
            state[1] += 1
            dropped, state[2] = int(state[2]), 0
        if dropped:
            event_dict["repeated"] = dropped
        return event_dict


def configure_logging(level: str | None = None, *, json_output: bool | None = None) -> None:
    """Configure structlog for a process; call once from an entry point, never at import.

    Logs go to standard error, so a command's standard output stays clean
    for its results. `TIERMEM_LOG_LEVEL` sets the level (default INFO) and
    `TIERMEM_LOG_JSON=1` forces JSON lines on a terminal too. Repeated
    warnings and errors are rate-limited (`RepeatLimiter`).
    """
    level_name = (level or os.environ.get("TIERMEM_LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level_name!r} is not one of DEBUG, INFO, WARNING, ERROR")
    if json_output is None:
        json_output = os.environ.get("TIERMEM_LOG_JSON") == "1" or not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            RepeatLimiter(),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
