"""`tiermem config show`: the effective settings and where each came from."""

from __future__ import annotations

import argparse
import json

import msgspec

__all__ = ["add_config_parser", "cmd_config_show"]


def add_config_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `tiermem config` and its subcommand `show`."""
    parser = subparsers.add_parser(
        "config", help="show the settings that `tiermem up` would run with"
    )
    actions = parser.add_subparsers(dest="config_command", required=True)
    show = actions.add_parser(
        "show",
        help="print each setting's effective value and its source (default, file, environment); passwords in URLs are masked",
    )
    show.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of settings (default: none, so defaults and TIERMEM_* variables only)",
    )
    show.add_argument(
        "--data-dir",
        help="as `tiermem up --data-dir`: show the settings with data_dir set to this folder",
    )
    show.add_argument(
        "--shards",
        type=int,
        help="as `tiermem up --shards`: show the settings with this number of shards",
    )
    show.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"settings": [{name, value, source, origin}]}',
    )
    show.set_defaults(handler=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the settings; an invalid one raises `SettingsError`, which `tiermem.cli.main` prints."""
    from tiermem.cli import command_line_settings
    from tiermem.settings import load_settings, masked

    loaded = load_settings(args.config, overrides=command_line_settings(args))
    settings = masked(loaded.settings)
    if args.json:
        print(json.dumps({"settings": msgspec.to_builtins(settings)}))
        return 0
    rows = [
        (item.name, json.dumps(item.value), _source(item.source, item.origin))
        for item in settings
    ]
    name_width = max(len(row[0]) for row in rows)
    value_width = min(40, max(len(row[1]) for row in rows))
    for name, value, source in rows:
        print(f"{name:<{name_width}}  {value:<{value_width}}  {source}")
    return 0


def _source(source: str, origin: str | None) -> str:
    return f"{source} {origin}" if origin else source
