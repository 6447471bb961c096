"""`tiermem erase`: run an erasure pass now, AOF rewrites included.

Beat runs the same pass every `erase_interval_s`. This command is for an
operator who must show that a Forget reached the disk, or who cannot wait
for the next scheduled AOF rewrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["add_erase_parser"]


def cmd_erase(args: argparse.Namespace) -> int:
    import redis

    from events.errors import TiermemError
    from replay.erase import erase_stack
    from tiermem.config import load_stack_config

    path = Path(args.data_dir) / "stack.json"
    if not path.exists():
        raise TiermemError(f"{path} does not exist: start the stack with `tiermem up --data-dir {args.data_dir}` first")
    config = load_stack_config(path)
    print(f"erasing forgotten values under {config.data_dir}", file=sys.stderr, flush=True)
    try:
        report = erase_stack(config, force=True)
    except redis.ConnectionError as error:
        raise TiermemError(f"cannot reach a Redis server of the stack ({error}): is the stack running?") from None
    if args.json:
        print(json.dumps(msgspec.to_builtins(report)))
    else:
        print(
            f"{report.forgets} forget(s) since the oldest snapshot; "
            f"{report.files_checked} snapshot file(s) checked, {report.files_rewritten} rewritten, "
            f"{report.records_erased} record(s) erased; {len(report.sqlite_checkpointed)} SQLite file(s) "
            f"checkpointed; AOF rewritten on {len(report.aof_rewritten)} Redis server(s); {report.seconds:.2f}s"
        )
    return 0


def add_erase_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tiermem erase` to an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "erase",
        help="remove forgotten values from snapshots, views, SQLite WAL files and Redis AOF files now",
        description=(
            "Rewrite every snapshot and view taken before a Forget without the values it forgot, "
            "checkpoint the SQLite files of LTM and the projections, and rewrite the AOF of every "
            "Redis server of the stack. See docs/semantics.md for what a Forget erases."
        ),
    )
    parser.add_argument("--data-dir", default=".tiermem", help="the stack's data directory (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=cmd_erase)
    return parser
