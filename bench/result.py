"""The result of one scenario: figures per system, ratios and targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.stats import spread

__all__ = ["ScenarioResult"]


class ScenarioResult:
    """Figures of one scenario, each measured once per round.

    A figure is one (system, metric) pair, for example ("tiermem", "events/s")
    or ("redis GET", "p99"). Its value in every round is kept, and reports
    show the median and the min-max over rounds. `higher_is_better` is
    true when a larger value is the better one.
    """

    def __init__(
        self, name: str, title: str, unit: str, *, higher_is_better: bool
    ) -> None:
        self.name = name
        self.title = title
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.settings: dict[str, Any] = {}
        self.notes: list[str] = []
        self._figures: dict[tuple[str, str], list[float]] = {}
        self._ratios: list[dict[str, Any]] = []
        self._targets: list[dict[str, Any]] = []
        self._tallies: dict[str, dict[str, int]] = {}
        self.seconds = 0.0

    def add(self, system: str, metric: str, value: float) -> None:
        """Record one round's value of a figure."""
        self._figures.setdefault((system, metric), []).append(float(value))

    def tally(self, system: str, what: str, amount: int) -> None:
        """Add to a count kept over all rounds, such as the number of Busy replies."""
        if amount:
            counts = self._tallies.setdefault(system, {})
            counts[what] = counts.get(what, 0) + amount

    def median(self, system: str, metric: str) -> float:
        values = self._figures.get((system, metric))
        if not values:
            return math.nan
        return float(spread(values)["median"])

    def systems(self) -> list[str]:
        return list(dict.fromkeys(system for system, _ in self._figures))

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(metric for _, metric in self._figures))

    def figures(self) -> list[dict[str, Any]]:
        return [
            {"system": system, "metric": metric, **spread(values)}
            for (system, metric), values in self._figures.items()
        ]

    def ratio(
        self,
        system: str,
        baseline: str,
        metric: str,
        *,
        baseline_metric: str | None = None,
    ) -> float:
        """Record and return median(system) / median(baseline) for `metric`."""
        numerator = self.median(system, metric)
        denominator = self.median(baseline, baseline_metric or metric)
        value = (
            numerator / denominator
            if denominator and not math.isnan(denominator)
            else math.nan
        )
        self._ratios.append(
            {
                "system": system,
                "baseline": baseline,
                "metric": metric
                if baseline_metric is None
                else f"{metric} / {baseline_metric}",
                "ratio": value,
            }
        )
        return value

    def target(
        self, description: str, measured: float, threshold: float, *, at_most: bool
    ) -> None:
        """Record a target: `measured` must be at most (or at least) `threshold`."""
        if math.isnan(measured):
            met = None
        else:
            met = measured <= threshold if at_most else measured >= threshold
        self._targets.append(
            {
                "target": description,
                "measured": measured,
                "threshold": threshold,
                "comparison": "<=" if at_most else ">=",
                "met": met,
            }
        )

    @property
    def ratios(self) -> Sequence[dict[str, Any]]:
        return self._ratios

    @property
    def targets(self) -> Sequence[dict[str, Any]]:
        return self._targets

    def to_document(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "seconds": round(self.seconds, 1),
            "settings": self.settings,
            "figures": self.figures(),
            "ratios": list(self._ratios),
            "targets": list(self._targets),
            "tallies": self._tallies,
            "notes": list(self.notes),
        }
