"""`tiermem bench`: the benchmark suite, tiermem beside its building blocks in one run.

The scenarios live in the `bench` package at the repository root. Each one
alternates tiermem and its baselines over several rounds and reports the
median, the min-max over rounds and the ratio of medians. Progress goes to
standard error and the tables to standard output. With `--json` the last
line of standard output is one JSON object with every figure, the machine
and the versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_bench_parser", "cmd_bench"]

SCENARIO_NAMES = (
    "durable-ingest",
    "ack-latency",
    "read-latency",
    "priority-isolation",
    "article",
    "replay",
    "recovery",
)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tiermem bench` to an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark tiermem against bare pyzmq, bare Redis and eventsourcing in one run",
        description=(
            "Start private stacks and baselines on 127.0.0.1, run each scenario in alternating rounds, "
            "and print medians, min-max over rounds and the ratio to each baseline."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller rounds and a 100k-event log; a few minutes on 2 cores",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="end standard output with one JSON object of the results",
    )
    parser.add_argument(
        "--scenario",
        action="extend",
        nargs="+",
        choices=SCENARIO_NAMES,
        metavar="NAME",
        help=f"run only these scenarios (repeatable; default: all of {', '.join(SCENARIO_NAMES)})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="an empty directory for the stacks, kept afterwards (default: a temporary one, removed)",
    )
    parser.add_argument(
        "--plot-dir",
        type=Path,
        default=None,
        help="write one PNG chart per scenario here (needs matplotlib)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="write the tables as Markdown to this file",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "sample with py-spy, into DIR: the router and shard actors during the tiermem rounds of "
            "durable-ingest and read-latency, and this process during the replay rebuilds"
        ),
    )
    parser.set_defaults(handler=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from bench import report
        from bench.runner import run_suite
    except ModuleNotFoundError as error:
        if error.name != "bench":
            raise
        print(
            "tiermem bench: the benchmark suite (the `bench` package of the tiermem repository) "
            "is not importable; run `python -m tiermem.cli bench` from the repository root",
            file=sys.stderr,
        )
        return 2

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if (
        args.data_dir is not None
        and args.data_dir.exists()
        and any(args.data_dir.iterdir())
    ):
        print(
            f"tiermem bench: --data-dir {args.data_dir} is not empty; pass a new or empty directory",
            file=sys.stderr,
        )
        return 2
    document = run_suite(
        args.scenario,
        quick=args.quick,
        data_dir=args.data_dir,
        profile_dir=args.profile,
        say=say,
    )
    print(report.format_text(document), flush=True)
    if args.markdown is not None:
        args.markdown.write_text(report.format_markdown(document))
        say(f"wrote {args.markdown}")
    if args.plot_dir is not None:
        for path in report.write_plots(document, args.plot_dir):
            say(f"wrote {path}")
    if args.json:
        print(report.to_json(document), flush=True)
    return 0
