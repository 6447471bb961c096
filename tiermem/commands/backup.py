"""`tiermem backup` and `tiermem restore`: copy a stack's data out, and back into a new directory.

`tiermem backup --data-dir DIR OUT` needs the stack of DIR running (its
Redis servers, and its router if a shard is behind the log). `tiermem
restore OUT --data-dir NEWDIR` needs nothing running: it starts and stops
a private log Redis under NEWDIR, unless `--log-url` names an empty one.
Progress lines go to standard error. With `--json` the last line of
standard output is one JSON object: the manifest, or the restore result.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from events.errors import TiermemError
from tiermem.commands.arguments import positive_float

__all__ = ["add_backup_parser", "cmd_backup", "cmd_restore", "main", "run"]

DEFAULT_DATA_DIR = ".tiermem"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def add_backup_parser(subparsers: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add `tiermem backup` and `tiermem restore` to an argparse subparsers object; return both parsers."""
    backup = subparsers.add_parser(
        "backup",
        help="copy a running stack's snapshots, log, projections and stack.json into a new directory",
        description=(
            "Copy the projection database, wait until every shard has applied the log, take a fresh "
            "snapshot of every shard, and export the log (stream, id index, effects) into OUT, with a "
            "manifest of SHA-256 checksums."
        ),
    )
    backup.add_argument("out", metavar="OUT", help="new or empty directory to write the backup into")
    backup.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="data directory of the running stack (default: %(default)s)")
    backup.add_argument("--timeout", type=positive_float, default=300.0, help="seconds to wait for the shards to apply the log (default: %(default)s)")
    backup.add_argument("--keep", type=int, default=3, help="snapshots kept per shard in the stack's own DIR/snapshots (default: %(default)s)")
    backup.add_argument("--json", action="store_true", help="end standard output with the manifest as one JSON object")
    backup.set_defaults(handler=cmd_backup)

    restore = subparsers.add_parser(
        "restore",
        help="rebuild a data directory from a backup; then start it with `tiermem up`",
        description=(
            "Check the backup's checksums, load its log into a fresh log Redis, and put its snapshots "
            "and projection database into a new data directory. A stack started there recovers every "
            "shard from its snapshot and the log after it."
        ),
    )
    restore.add_argument("backup", metavar="BACKUP", help="directory written by `tiermem backup`")
    restore.add_argument("--data-dir", required=True, help="new or empty data directory to restore into")
    restore.add_argument(
        "--log-url",
        help="empty log Redis to load the log into (default: a private one under --data-dir, which `tiermem up` starts)",
    )
    restore.add_argument("--json", action="store_true", help="end standard output with the result as one JSON object")
    restore.set_defaults(handler=cmd_restore)
    return backup, restore


def cmd_backup(args: argparse.Namespace) -> int:
    """Run `tiermem backup`; return the exit status."""
    from tiermem.backup import BackupError, create_backup

    if args.keep < 1:
        raise BackupError(f"--keep {args.keep} is invalid: keep at least 1 snapshot")
    manifest = create_backup(args.data_dir, args.out, timeout=args.timeout, keep=args.keep, say=_say)
    total = sum(entry.bytes for entry in manifest.files)
    _say(
        f"backup {args.out}: snapshots at seq {manifest.snapshot_seq}, log up to seq {manifest.log_seq}, "
        f"{len(manifest.files)} files, {total} bytes, in {manifest.seconds:.2f}s"
    )
    if args.json:
        print(msgspec.json.encode(manifest).decode(), flush=True)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Run `tiermem restore`; return the exit status."""
    from tiermem.backup import restore_backup

    result = restore_backup(args.backup, args.data_dir, log_url=args.log_url, say=_say)
    _say(f"restored {args.backup} into {result.data_dir}: log up to seq {result.log_seq}, in {result.seconds:.2f}s")
    if result.log_url is None:
        _say(f"start it with: tiermem up --data-dir {result.data_dir} --shards {result.shards}")
    else:
        _say(f"start a stack on {result.data_dir} with log_url {result.log_url} and {result.shards} shards")
    if args.json:
        print(msgspec.json.encode(result).decode(), flush=True)
    return 0


def run(argv: list[str]) -> int:
    """Parse and run `backup ...` or `restore ...` without configuring logging; return the exit status."""
    parser = argparse.ArgumentParser(prog="tiermem")
    commands = parser.add_subparsers(dest="command", required=True)
    add_backup_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TiermemError as error:
        print(f"tiermem {args.command}: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Configure logging, then run `backup ...` or `restore ...` from `argv` (default: sys.argv)."""
    from tiermem.logs import configure_logging

    configure_logging()
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
