"""Logging setup for tiermem's processes: structlog, JSON unless on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["configure_logging"]


def configure_logging(level: str | None = None, *, json_output: bool | None = None) -> None:
    """Configure structlog for a process; call once from an entry point, never at import.

    Logs go to standard error, so a command's standard output stays clean
    for its results. `TIERMEM_LOG_LEVEL` sets the level (default INFO) and
    `TIERMEM_LOG_JSON=1` forces JSON lines on a terminal too.
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
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
