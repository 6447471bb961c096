"""Summaries of repeated measurements: percentiles, medians and spreads."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["latency_percentiles", "percentile", "spread"]

# Latency percentiles every latency scenario reports, as (label, fraction).
PERCENTILES = (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999))


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted samples.

    Nearest rank never interpolates, so every percentile is a value that was
    really measured: p99.9 of 2,000 samples is the 1,998th smallest, the
    third largest.
    """
    if not ordered:
        return math.nan
    # Rounding first keeps float error (0.999 * n) from adding one to the rank.
    rank = max(1, math.ceil(round(fraction * len(ordered), 9)))
    return ordered[rank - 1]


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """Return p50, p99 and p99.9 of latencies given in seconds, in milliseconds."""
    ordered = sorted(seconds)
    return {
        label: percentile(ordered, fraction) * 1000 for label, fraction in PERCENTILES
    }


def spread(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Return the median, minimum and maximum of one figure over rounds."""
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        return {
            "median": math.nan,
            "min": math.nan,
            "max": math.nan,
            "rounds": list(values),
        }
    return {
        "median": statistics.median(finite),
        "min": min(finite),
        "max": max(finite),
        "rounds": [round(value, 6) for value in values],
    }
