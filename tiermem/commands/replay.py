"""`tiermem replay` and `tiermem snapshot`: verify, views of the past, rebuilds, snapshots.

Both commands split the work by shard. By default they send one Celery task
per shard to the `replay` queue, so the shards run in parallel on the
stack's worker, and print a line to standard error as each shard finishes.
With `--local` they do the same work in this process, one shard after the
other. With `--json` the last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from events.errors import TiermemError
from tiermem.commands.arguments import non_negative_int, positive_float, positive_int

__all__ = ["add_replay_parser", "add_snapshot_parser", "cmd_replay", "cmd_snapshot", "main", "print_view_get", "run"]

DEFAULT_DATA_DIR = ".tiermem"

# Seconds to wait for all shards' tasks of one command, by default. A
# rebuild from empty reads the whole log once per shard.
DEFAULT_TIMEOUT_S = 3600.0

# How often the command checks whether the Celery tasks have finished.
_POLL_INTERVAL_S = 0.1


# ----------------------------------------------------------- parsers


def _view_name(text: str) -> str:
    from replay.engine import view_root

    try:
        view_root(".", text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _time(text: str) -> int:
    from replay.engine import parse_time

    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seq(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"sequence number {text!r} is invalid: use an integer of 0 or more")
    return int(text)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="data directory of the stack (default: %(default)s)")
    parser.add_argument("--local", action="store_true", help="run in this process instead of as Celery tasks on the replay queue")
    parser.add_argument("--shard", type=non_negative_int, default=None, help="work on this shard only (default: every shard)")
    parser.add_argument("--json", action="store_true", help="end standard output with one JSON object of the results")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the shards' tasks (default: %(default)s)")


def add_replay_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tiermem replay` to an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "replay",
        help="verify live state against the log, build a view of a past point, or rebuild live tiers",
        description=(
            "Rebuild shard state from snapshots and the event log. --verify compares it with the live "
            "digests; --to-seq and --as-of build a named view of a past point that `tiermem get --view` "
            "reads; --apply rebuilds the live tiers."
        ),
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--verify", action="store_true", help="rebuild each shard up to a live digest and compare; exit 1 on a mismatch")
    mode.add_argument("--to-seq", type=_seq, metavar="N", help="build a view of the state after event N")
    mode.add_argument("--as-of", type=_time, metavar="TIME", help="build a view of the state after the last event with ts <= TIME (ISO 8601, UTC if no offset, or Unix ms)")
    mode.add_argument("--apply", action="store_true", help="rebuild the live tiers from the newest snapshot and the log")
    mode.add_argument("--discard", type=_view_name, metavar="NAME", help="delete the view NAME")
    parser.add_argument("--view", type=_view_name, metavar="NAME", help="name of the view --to-seq or --as-of builds (default: seq-N)")
    parser.add_argument("--from-empty", action="store_true", help="with --verify: replay the whole log instead of starting from snapshots")
    parser.add_argument("--max-keys", type=positive_int, default=10, help="with --verify: differing keys listed per tier (default: %(default)s)")
    _add_common(parser)
    parser.set_defaults(handler=cmd_replay)
    return parser


def add_snapshot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tiermem snapshot` to an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "snapshot",
        help="write a snapshot of every shard at the log's last event",
        description=(
            "Build each shard's snapshot from its newest snapshot and the log, write it to "
            "DIR/snapshots/shard-<n>/, and delete all but the newest --keep snapshots."
        ),
    )
    parser.add_argument("--keep", type=int, default=3, help="snapshots kept per shard (default: %(default)s)")
    _add_common(parser)
    parser.set_defaults(handler=cmd_snapshot)
    return parser


# ----------------------------------------------------------- running shards


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _shards(args: argparse.Namespace, shards: int) -> list[int]:
    from replay.engine import ReplayError

    if args.shard is None:
        return list(range(shards))
    if not 0 <= args.shard < shards:
        raise ReplayError(f"--shard {args.shard} does not exist: the stack has shards 0 to {shards - 1}")
    return [args.shard]


def _run_local(
    jobs: list[tuple[int, dict[str, Any]]], local: Callable[[int, dict[str, Any]], Any]
) -> Iterator[tuple[int, dict[str, Any]]]:
    for shard, kwargs in jobs:
        yield shard, msgspec.to_builtins(local(shard, kwargs))


def _run_celery(
    data_dir: str, task: str, jobs: list[tuple[int, dict[str, Any]]], timeout: float
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Send one task per shard to the replay queue; yield each result as it arrives."""
    from replay.engine import ReplayError

    try:
        from replay.celery_app import create_app
    except ImportError as error:
        raise ReplayError(f"the Celery app cannot be loaded ({error}): run with --local") from error
    from tiermem.config import load_stack_config

    app = create_app(load_stack_config(Path(data_dir) / "stack.json"))
    pending = {shard: app.send_task(task, kwargs=kwargs, queue="replay") for shard, kwargs in jobs}
    deadline = time.monotonic() + timeout
    try:
        while pending:
            for shard, result in list(pending.items()):
                if not result.ready():
                    continue
                del pending[shard]
                value = result.get(propagate=False)
                result.forget()
                if result.failed():
                    raise ReplayError(f"shard {shard}: task {result.id} failed: {value!r}")
                yield shard, value
            if pending and time.monotonic() > deadline:
                ids = ", ".join(f"shard {shard}: {result.id}" for shard, result in sorted(pending.items()))
                raise ReplayError(
                    f"{len(pending)} replay task(s) did not finish within {timeout:.0f}s ({ids}); "
                    "is a Celery worker consuming the replay queue? Try --local"
                )
            if pending:
                time.sleep(_POLL_INTERVAL_S)
    finally:
        for result in pending.values():
            result.forget()


def _run(
    args: argparse.Namespace,
    task: str,
    jobs: list[tuple[int, dict[str, Any]]],
    local: Callable[[int, dict[str, Any]], Any],
    describe: Callable[[dict[str, Any]], str],
) -> dict[int, dict[str, Any]]:
    """Run one job per shard, locally or as Celery tasks; return the results by shard."""
    if args.local:
        results = _run_local(jobs, local)
    else:
        tasks = [(shard, dict(kwargs, shard=shard)) for shard, kwargs in jobs]
        results = _run_celery(args.data_dir, task, tasks, args.timeout)
    done: dict[int, dict[str, Any]] = {}
    for shard, result in results:
        done[shard] = result
        _say(f"shard {shard}: {describe(result)} ({len(done)}/{len(jobs)})")
    return dict(sorted(done.items()))


def _summary(started: float, results: dict[int, dict[str, Any]], events_field: str = "events", **fields: Any) -> dict[str, Any]:
    seconds = time.monotonic() - started
    events = sum(result.get(events_field, 0) for result in results.values())
    return {
        **fields,
        "events": events,
        "events_per_s": round(events / seconds, 1) if seconds > 0 else 0.0,
        "seconds": round(seconds, 3),
        "shards": list(results.values()),
    }


def _finish(args: argparse.Namespace, summary: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        for line in lines:
            _say(line)
        print(json.dumps(summary, default=str), flush=True)
    else:
        for line in lines:
            print(line, flush=True)


# ----------------------------------------------------------- replay


def cmd_replay(args: argparse.Namespace) -> int:
    """Run `tiermem replay`; return the exit status."""
    import redis

    from replay.engine import ReplayError

    if args.view is not None and (args.verify or args.apply or args.discard):
        raise ReplayError("--view names the view that --to-seq or --as-of builds; it does nothing with --verify, --apply or --discard")
    try:
        if args.discard:
            return _discard(args)
        if args.verify:
            return _verify(args)
        if args.apply:
            return _apply(args)
        return _view(args)
    except redis.ConnectionError as error:
        raise ReplayError(
            f"cannot reach a Redis server of the stack ({error}): is `tiermem up --data-dir {args.data_dir}` running?"
        ) from error


def _discard(args: argparse.Namespace) -> int:
    from replay.engine import discard_view

    found = discard_view(args.data_dir, args.discard)
    line = f"view {args.discard}: discarded" if found else f"view {args.discard}: not found"
    _finish(args, {"view": args.discard, "discarded": found}, [line])
    return 0 if found else 1


def _verify(args: argparse.Namespace) -> int:
    from replay.engine import live_digest, load_target, verify_shard

    started = time.monotonic()
    target = load_target(args.data_dir)
    shards = _shards(args, target.shards)
    seq, digests = live_digest(args.data_dir)
    _say(f"verifying {len(shards)} shard(s) at seq {seq}")
    expected = msgspec.to_builtins(digests)
    options = {"seq": seq, "expected": expected, "from_empty": args.from_empty, "max_keys": args.max_keys}

    def local(shard: int, kwargs: dict[str, Any]) -> Any:
        return verify_shard(
            target,
            shard,
            seq,
            digests,
            from_empty=args.from_empty,
            max_keys=args.max_keys,
            redigest=lambda: live_digest(args.data_dir),
        )

    def describe(result: dict[str, Any]) -> str:
        state = "verified" if result["verified"] else "MISMATCH in " + ", ".join(item["tier"] for item in result["mismatches"])
        return f"{state}, {result['events']} events after seq {result['base_seq']} in {result['seconds']:.2f}s"

    results = _run(args, "tiermem.replay.verify_shard", [(shard, options) for shard in shards], local, describe)
    verified = all(result["verified"] for result in results.values())
    # A shard that had to verify again after a Forget did so at a newer seq.
    seq = max([seq, *(result["seq"] for result in results.values())])
    summary = _summary(started, results, verified=verified, seq=seq)
    lines = [f"verified: {'true' if verified else 'false'} at seq {seq}"]
    for shard, result in results.items():
        lines += _mismatch_lines(shard, result)
    lines.append(f"{summary['events']} events replayed in {summary['seconds']:.2f}s ({summary['events_per_s']:.0f} events/s)")
    _finish(args, summary, lines)
    return 0 if verified else 1


def _mismatch_lines(shard: int, result: dict[str, Any]) -> list[str]:
    lines = []
    for mismatch in result["mismatches"]:
        tier = mismatch["tier"]
        lines.append(f"shard {shard} {tier}: digest {_short(mismatch['actual'])} rebuilt, {_short(mismatch['expected'])} live")
        keys = [item for item in result["differences"] if item["tier"] == tier]
        for item in keys:
            name = f"{item['namespace']}/{item['key']}" if item["key"] or item["namespace"] else "(tier)"
            lines.append(f"  {name}: {item['problem']}")
            if item.get("rebuilt") is not None:
                lines.append(f"    rebuilt: {item['rebuilt']}")
            if item.get("live") is not None:
                lines.append(f"    live:    {item['live']}")
        if not keys:
            lines.append("  no differing keys found in the live tiers, so the difference is in the shard actor's memory: run --apply")
    if result.get("compared_seq") not in (None, result["seq"]):
        lines.append(f"  keys compared at seq {result['compared_seq']}, where the live tiers were")
    return lines


def _short(digest: str | None) -> str:
    return "(none)" if digest is None else digest[:12]


def _view(args: argparse.Namespace) -> int:
    from replay.engine import ReplayError, build_view_shard, load_target, seq_at_time, write_view_manifest

    if args.shard is not None:
        raise ReplayError("--shard is not used with --to-seq or --as-of: a view always covers every shard")
    started = time.monotonic()
    target = load_target(args.data_dir)
    event_log = target.event_log()
    last = event_log.last_seq()
    if args.as_of is not None:
        seq = seq_at_time(event_log, args.as_of)
    else:
        seq = args.to_seq
        if seq > last:
            raise ReplayError(f"--to-seq {seq} is past the end of the log, which ends at seq {last}")
    name = args.view or f"seq-{seq}"
    shards = list(range(target.shards))
    _say(f"building view {name} at seq {seq} from {len(shards)} shard(s)")

    def local(shard: int, kwargs: dict[str, Any]) -> Any:
        return build_view_shard(target, name, shard, seq)

    def describe(result: dict[str, Any]) -> str:
        return f"{result['events']} events after seq {result['base_seq']} in {result['seconds']:.2f}s"

    results = _run(args, "tiermem.replay.build_view_shard", [(shard, {"view": name, "seq": seq}) for shard in shards], local, describe)
    manifest = write_view_manifest(target, name, seq, as_of=args.as_of)
    summary = _summary(started, results, verified=None, view=name, seq=seq, as_of=args.as_of, now_ms=manifest.now_ms)
    state = (
        "the empty state before the first event"
        if seq == 0
        else f"the state after seq {seq}, read at {_iso(manifest.now_ms)}"
    )
    lines = [
        f"view {name}: {state}",
        f"read it with: tiermem get KEY --namespace NS --view {name} --data-dir {args.data_dir}",
        f"{summary['events']} events replayed in {summary['seconds']:.2f}s ({summary['events_per_s']:.0f} events/s)",
    ]
    _finish(args, summary, lines)
    return 0


def _iso(ms: int) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _apply_through_router(args: argparse.Namespace, started: float) -> int:
    """Ask the running router to rebuild its shards; it keeps logging events meanwhile."""
    from bus.client import Client
    from events.types import Rebuild, Rebuilt
    from replay.engine import ReplayError

    with Client.from_data_dir(args.data_dir, timeout=args.timeout, attempts=1) as client:
        reply = client.request(Rebuild(shard=args.shard), lane="high")
    if not isinstance(reply, Rebuilt):
        raise ReplayError(f"the router answered {type(reply).__name__} to Rebuild")
    results = {item.shard: msgspec.to_builtins(item) for item in reply.shards}
    for item in results.values():
        start = f"snapshot at seq {item['snapshot_seq']}" if item["snapshot_seq"] is not None else "empty tiers"
        print(f"shard {item['shard']}: rebuilt from {start}, {item['replayed']} events replayed, watermark {item['watermark']}", file=sys.stderr)
    summary = _summary(started, results, events_field="replayed", verified=None)
    lines = [f"rebuilt {len(results)} shard(s) through the router: {summary['events']} events replayed in {summary['seconds']:.2f}s"]
    _finish(args, summary, lines)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from replay.engine import ReplayError, apply_local, check_router_stopped, load_target

    started = time.monotonic()
    if not args.local:
        return _apply_through_router(args, started)
    target = load_target(args.data_dir)
    check_router_stopped(args.data_dir)
    shards = _shards(args, target.shards)

    def local(shard: int, kwargs: dict[str, Any]) -> Any:
        return apply_local(target, shard)

    def describe(result: dict[str, Any]) -> str:
        start = f"snapshot at seq {result['snapshot_seq']}" if result["snapshot_seq"] is not None else "empty tiers"
        return f"rebuilt from {start}, {result['replayed']} events replayed, watermark {result['watermark']}, in {result['seconds']:.2f}s"

    results = _run(args, "", [(shard, {}) for shard in shards], local, describe)
    summary = _summary(started, results, events_field="replayed", verified=None)
    lines = [f"rebuilt {len(results)} shard(s): {summary['events']} events replayed in {summary['seconds']:.2f}s"]
    _finish(args, summary, lines)
    return 0


# ----------------------------------------------------------- snapshot


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Run `tiermem snapshot`; return the exit status."""
    import redis

    from replay.engine import ReplayError, load_target
    from replay.snapshot import take_snapshot

    started = time.monotonic()
    target = load_target(args.data_dir)
    shards = _shards(args, target.shards)
    if args.keep < 1:
        raise ReplayError(f"--keep {args.keep} is invalid: keep at least 1 snapshot")
    try:
        until = target.event_log().last_seq()
    except redis.ConnectionError as error:
        raise ReplayError(f"cannot reach the log Redis at {target.log_url} ({error}): is the stack running?") from error
    _say(f"taking snapshots of {len(shards)} shard(s) at seq {until}")

    def local(shard: int, kwargs: dict[str, Any]) -> Any:
        return take_snapshot(target.data_dir, target.event_log(), target.shards, target.policy, shard, until, keep=args.keep)

    def describe(result: dict[str, Any]) -> str:
        state = "written" if result["written"] else "already there"
        return f"{result['path']} {state}, {result['events']} events after seq {result['base_seq']} in {result['seconds']:.2f}s"

    options = {"until_seq": until, "keep": args.keep}
    results = _run(args, "tiermem.replay.snapshot_shard", [(shard, options) for shard in shards], local, describe)
    summary = _summary(started, results, verified=None, seq=until)
    lines = [f"snapshots at seq {until}: {len(results)} shard(s), {summary['events']} events replayed in {summary['seconds']:.2f}s"]
    _finish(args, summary, lines)
    return 0


# ----------------------------------------------------------- views


def print_view_get(data_dir: str, view: str, namespace: str, key: str) -> int:
    """Print what `tiermem get KEY --view NAME` prints: the reply as one JSON line.

    Returns the exit status: 0 for a Value, 1 for NotFound.
    """
    from events.types import Value
    from replay.engine import view_get

    reply = view_get(data_dir, view, namespace, key)
    print(msgspec.json.encode(reply).decode(), flush=True)
    return 0 if isinstance(reply, Value) else 1


def run(argv: list[str]) -> int:
    """Parse and run `replay ...` or `snapshot ...` without configuring logging; return the exit status."""
    parser = argparse.ArgumentParser(prog="tiermem")
    commands = parser.add_subparsers(dest="command", required=True)
    add_replay_parser(commands)
    add_snapshot_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TiermemError as error:
        print(f"tiermem {args.command}: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Configure logging, then run `replay ...` or `snapshot ...` from `argv` (default: sys.argv)."""
    from tiermem.logs import configure_logging

    configure_logging()
    return run(sys.argv[1:] if argv is None else argv)
