"""Argument types for the command line that reject values no option accepts."""

from __future__ import annotations

import argparse

__all__ = ["non_negative_int", "positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """Parse an integer of 1 or more."""
    value = _parse(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of 1 or more, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """Parse an integer of 0 or more."""
    value = _parse(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite number greater than 0, such as a number of seconds."""
    value = _parse(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number greater than 0, got {text}")
    return value


def _parse(text: str, kind: type, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
