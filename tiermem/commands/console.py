"""`tiermem console`: serve a read-only web page over a running stack.

The page shows the stack's counters as live plots, the committed event
stream, each namespace's keys with search, a key's history, and any
namespace as it was at a past log position. See docs/console.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from events.errors import TiermemError

__all__ = ["add_console_parser", "cmd_console", "main", "run"]

DEFAULT_DATA_DIR = ".tiermem"
DEFAULT_PORT = 7460


def add_console_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tiermem console` to an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "console",
        help="serve a read-only web page over a running stack: live plots, events, keys, history, time travel",
        description=(
            "Serve the tiermem console on HOST:PORT until Ctrl-C. It reads the stack through its data "
            "directory: the router named in endpoints.json, the log named in stack.json, and "
            "projections.sqlite3. It sends Status, Digest and Search requests, and Get only with "
            "--allow-get. Binding to an address other than loopback requires --token."
        ),
    )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="data directory of a running `tiermem up` (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s); any other than loopback requires --token",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="TCP port to listen on, 0 for any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        help="secret of at least 16 characters that every request must carry (as ?token=, a cookie or a Bearer header)",
    )
    parser.add_argument(
        "--allow-get",
        action="store_true",
        help="let the key page send Get through the bus; each Get is logged and counts as an access",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=1.0,
        help="seconds between two samples of the overview plots (default: %(default)s)",
    )
    parser.set_defaults(handler=cmd_console)
    return parser


def cmd_console(args: argparse.Namespace) -> int:
    """Run `tiermem console`; return the exit status."""
    from tiermem.console.server import serve
    from tiermem.console.settings import ConsoleSettings, is_loopback

    settings = ConsoleSettings(
        data_dir=Path(args.data_dir),
        host=args.host,
        port=args.port,
        token=args.token,
        allow_get=args.allow_get,
        sample_interval_s=args.sample_interval,
    )

    def ready(url: str) -> None:
        if settings.token is not None:
            print(f"{url}?token={settings.token}", flush=True)
            print(
                "every request must carry the token: open the address above, which sets a cookie, "
                "or send an Authorization: Bearer header",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(url, flush=True)
        if not is_loopback(settings.host):
            print(
                f"listening on {settings.host}, which other machines can reach; the console speaks "
                "plain HTTP, so the token and the memories cross the network unencrypted unless "
                "a TLS proxy is in front of it",
                file=sys.stderr,
                flush=True,
            )

    serve(settings, ready=ready)
    return 0


def run(argv: list[str]) -> int:
    """Parse and run `console ...` without configuring logging; return the exit status."""
    parser = argparse.ArgumentParser(prog="tiermem")
    commands = parser.add_subparsers(dest="command", required=True)
    add_console_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TiermemError as error:
        print(f"tiermem {args.command}: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Configure logging, then run `console ...` from `argv` (default: sys.argv)."""
    from tiermem.logs import configure_logging

    configure_logging()
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
