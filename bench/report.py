"""Present a result document: plain-text tables, Markdown tables, JSON and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["format_markdown", "format_text", "to_json", "write_plots"]


def number(value: float | None) -> str:
    """Format a figure with three significant digits (whole numbers from 1,000), or "n/a"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 999.5:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _verdict(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return "not measured"
    return "met" if target["met"] else "missed"


def _direction(scenario: dict[str, Any]) -> str:
    return "higher is better" if scenario["higher_is_better"] else "lower is better"


def format_text(document: dict[str, Any]) -> str:
    """Return every scenario as aligned text tables, then the machine and versions."""
    lines: list[str] = []
    for name, scenario in document["scenarios"].items():
        lines.append("")
        lines.append(
            f"{scenario['title']} [{name}] ({scenario['unit']}, {_direction(scenario)}; {scenario['seconds']:.0f}s)"
        )
        rows = [("system", "metric", "median", "min-max")]
        for figure in scenario["figures"]:
            rows.append(
                (
                    figure["system"],
                    figure["metric"],
                    number(figure["median"]),
                    f"{number(figure['min'])}-{number(figure['max'])}",
                )
            )
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        for row in rows:
            lines.append(
                f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}"
            )
        for ratio in scenario["ratios"]:
            lines.append(
                f"  ratio {ratio['system']} / {ratio['baseline']} ({ratio['metric']}): {number(ratio['ratio'])}"
            )
        for target in scenario["targets"]:
            lines.append(
                f"  target {target['target']} {target['comparison']} {number(target['threshold'])}: "
                f"measured {number(target['measured'])}, {_verdict(target)}"
            )
        for system, counts in scenario.get("tallies", {}).items():
            lines.append(
                f"  counts for {system}: "
                + ", ".join(f"{what} {amount:,}" for what, amount in counts.items())
            )
        for note in scenario["notes"]:
            lines.append(f"  note: {note}")
    machine = document["machine"]
    lines.append("")
    lines.append(
        f"machine: {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.1f} GiB, {machine['cpu']}; "
        f"load average {machine['load_average']} at start, {machine.get('load_average_end')} at end"
    )
    lines.append(
        "versions: "
        + ", ".join(
            f"{name} {version}" for name, version in document["versions"].items()
        )
    )
    lines.append(f"plan {document['plan']}, {document['seconds']:.0f}s in all")
    return "\n".join(lines)


def format_markdown(document: dict[str, Any]) -> str:
    """Return one Markdown table per scenario, with its ratios and targets below it."""
    parts: list[str] = []
    for name, scenario in document["scenarios"].items():
        parts.append(
            f"### {scenario['title']} (`{name}`, {scenario['unit']}, {_direction(scenario)})"
        )
        parts.append("")
        parts.append("| system | metric | median | min-max |")
        parts.append("| --- | --- | ---: | ---: |")
        for figure in scenario["figures"]:
            parts.append(
                f"| {figure['system']} | {figure['metric']} | {number(figure['median'])} | "
                f"{number(figure['min'])}-{number(figure['max'])} |"
            )
        parts.append("")
        for ratio in scenario["ratios"]:
            parts.append(
                f"- {ratio['system']} / {ratio['baseline']}, {ratio['metric']}: **{number(ratio['ratio'])}**"
            )
        for target in scenario["targets"]:
            parts.append(
                f"- target: {target['target']} {target['comparison']} {number(target['threshold'])}; "
                f"measured {number(target['measured'])}: **{_verdict(target)}**"
            )
        for system, counts in scenario.get("tallies", {}).items():
            parts.append(
                f"- counts for {system}: "
                + ", ".join(f"{what} {amount:,}" for what, amount in counts.items())
            )
        for note in scenario["notes"]:
            parts.append(f"- note: {note}")
        parts.append("")
    return "\n".join(parts)


def _finite(value: Any) -> Any:
    """Replace NaN and infinities, which JSON cannot carry, with null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(_finite(document), sort_keys=False, allow_nan=False)


def write_plots(document: dict[str, Any], directory: Path) -> list[Path]:
    """Write one PNG bar chart per scenario: medians, with min-max over rounds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, scenario in document["scenarios"].items():
        figures = scenario["figures"]
        systems = list(dict.fromkeys(figure["system"] for figure in figures))
        metrics = list(dict.fromkeys(figure["metric"] for figure in figures))
        by_key = {(figure["system"], figure["metric"]): figure for figure in figures}
        width = 0.8 / len(systems)
        fig, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics) + 3), 4.2))
        for index, system in enumerate(systems):
            positions, heights, below, above = [], [], [], []
            for slot, metric in enumerate(metrics):
                figure = by_key.get((system, metric))
                if (
                    figure is None
                    or figure["median"] is None
                    or math.isnan(figure["median"])
                ):
                    continue
                positions.append(slot - 0.4 + width * (index + 0.5))
                heights.append(figure["median"])
                below.append(figure["median"] - figure["min"])
                above.append(figure["max"] - figure["median"])
            axes.bar(
                positions, heights, width, yerr=[below, above], capsize=3, label=system
            )
        axes.set_xticks(range(len(metrics)), metrics)
        axes.set_ylabel(scenario["unit"])
        medians = [
            f["median"] for f in figures if f["median"] is not None and f["median"] > 0
        ]
        # A log scale once the bars span more than 20x, or small ones vanish.
        if medians and max(medians) / min(medians) > 20:
            axes.set_yscale("log")
        axes.set_title(
            f"{scenario['title']} ({_direction(scenario)}; median, min-max over rounds)",
            fontsize=10,
        )
        axes.legend(fontsize=8)
        axes.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = directory / f"bench-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
