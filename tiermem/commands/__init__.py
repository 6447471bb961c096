"""Subcommands of the `tiermem` command line that live outside `tiermem.cli`.

Each module exposes `add_<name>_parser(subparsers)` functions, which add a
subcommand with its handler, for `tiermem.cli.build_parser` to call.
"""

from tiermem.commands.replay import add_replay_parser, add_snapshot_parser, print_view_get

__all__ = ["add_replay_parser", "add_snapshot_parser", "print_view_get"]
