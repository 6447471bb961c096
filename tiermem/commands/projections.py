"""`tiermem stats`, `tiermem history`, `tiermem audit` and `tiermem projections`.

These read the projection database of a data directory directly, so they
work while the stack runs and after it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import msgspec

from tiermem.commands.arguments import positive_float, positive_int

__all__ = ["add_projection_parsers"]


def _db(data_dir: str) -> Path:
    from tiermem.config import StackConfig

    return Path(StackConfig(data_dir=data_dir).projections_db)


def _print(value: object) -> None:
    print(json.dumps(msgspec.to_builtins(value)))


def parse_time(text: str) -> int:
    """Return Unix milliseconds for `text`: an integer, or ISO 8601 (UTC if no zone)."""
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        from datetime import timezone

        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def cmd_stats(args: argparse.Namespace) -> int:
    from replay.projections import cold_keys, hot_keys, stats

    db = _db(args.data_dir)
    report = stats(db, args.namespace)
    result: dict[str, object] = {"stats": msgspec.to_builtins(report)}
    if args.namespace:
        result["hot"] = msgspec.to_builtins(hot_keys(db, args.namespace, args.top))
        result["cold"] = msgspec.to_builtins(cold_keys(db, args.namespace, args.top))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from replay.projections import history

    entries = history(_db(args.data_dir), args.namespace, args.key)
    for entry in entries:
        _print(entry)
    if not entries:
        print(f"no events touched {args.namespace}/{args.key} (the history projection may be behind)", file=sys.stderr)
        return 1
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from replay.projections import audit

    for entry in audit(_db(args.data_dir), args.namespace, parse_time(args.since)):
        _print(entry)
    return 0


def cmd_projections_run(args: argparse.Namespace) -> int:
    import redis

    from events.log import RedisEventLog
    from handlers.effects import RedisEffectLog
    from replay.projections import run_projections
    from tiers.redis_tier import client_from_url
    from tiermem.config import load_stack_config

    config = load_stack_config(Path(args.data_dir) / "stack.json")
    log_client = redis.Redis.from_url(config.log_url or "")
    report = run_projections(
        Path(config.projections_db),
        RedisEventLog(log_client, stream=config.log_stream),
        RedisEffectLog(log_client),
        client_from_url(config.stm_url or ""),
        config.shards,
        max_seconds=args.max_seconds,
    )
    _print(report)
    return 0


def add_projection_parsers(commands: argparse._SubParsersAction) -> None:
    def data_dir(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data-dir", default=".tiermem", help="data directory of the stack (default: %(default)s)")

    stats = commands.add_parser("stats", help="records and bytes per tier per namespace, hot and cold keys")
    stats.add_argument("--namespace", help="one namespace, with its hot and cold keys")
    stats.add_argument("--top", type=positive_int, default=10, help="number of hot and cold keys (default: %(default)s)")
    stats.add_argument("--json", action="store_true", help="print one compact JSON line")
    data_dir(stats)
    stats.set_defaults(handler=cmd_stats)

    history = commands.add_parser("history", help="every event that touched a key, as JSON lines")
    history.add_argument("key")
    history.add_argument("--namespace", default="default", help="namespace of the key (default: %(default)s)")
    data_dir(history)
    history.set_defaults(handler=cmd_history)

    audit = commands.add_parser("audit", help="every event of a namespace since a time, as JSON lines")
    audit.add_argument("--namespace", required=True, help="the namespace to list")
    audit.add_argument("--since", default="0", help="Unix milliseconds or ISO 8601 time (default: the beginning)")
    data_dir(audit)
    audit.set_defaults(handler=cmd_audit)

    projections = commands.add_parser("projections", help="catch the projections up with the log now")
    projections.add_argument("action", choices=("run",), help="run: apply the log to every projection once")
    projections.add_argument("--max-seconds", type=positive_float, default=None, help="stop after this long (default: until caught up)")
    data_dir(projections)
    projections.set_defaults(handler=cmd_projections_run)
