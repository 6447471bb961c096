"""The `tiermem` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import msgspec

from tiermem.commands.arguments import positive_float, positive_int

__all__ = ["main"]

DEFAULT_DATA_DIR = ".tiermem"


def _endpoints(args: argparse.Namespace) -> dict[str, str]:
    from bus.client import load_endpoints
    from tiermem.commands.check import endpoints_from_url

    if getattr(args, "endpoint", None):
        return endpoints_from_url(args.endpoint)
    return load_endpoints(args.data_dir)


def _add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="data directory of a running `tiermem up` (default: %(default)s)")
    group.add_argument("--endpoint", help="tcp://HOST:PORT of the router's high lane; normal, low and pub are the next ports")


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum: int, frame: object) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def command_line_settings(args: argparse.Namespace) -> dict[str, object]:
    """Return the settings given as options; an option left out leaves the setting to the file and environment."""
    given = {"data_dir": args.data_dir, "shards": args.shards}
    return {name: value for name, value in given.items() if value is not None}


def cmd_up(args: argparse.Namespace) -> int:
    from tiermem.settings import load_config
    from tiermem.stack import Stack

    import structlog

    log = structlog.get_logger("tiermem.up")
    config = load_config(args.config, overrides=command_line_settings(args))
    stack = Stack(config, dashboard=args.dashboard, supervised=True)
    # SIGHUP is what a closed terminal or a dropped SSH session sends.
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for number in stop_signals:
        signal.signal(number, _raise_shutdown)
    try:
        endpoints = stack.start()
        log.info("stack.ready", data_dir=str(stack.data_dir), **endpoints)
        print(json.dumps(endpoints), flush=True)
        return stack.supervise()
    except _Shutdown as stop:
        log.info("stack.stopping", signal=str(stop))
        return 0
    finally:
        for number in stop_signals:
            signal.signal(number, signal.SIG_IGN)
        stack.stop()
        log.info("stack.stopped", data_dir=str(stack.data_dir))


def cmd_demo(args: argparse.Namespace) -> int:
    from tiermem.demo import print_result, run_demo
    from tiermem.settings import load_config

    settings = load_config(args.config, overrides=command_line_settings(args))
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    result = run_demo(
        limit=args.limit,
        data_dir=Path(settings.data_dir),
        shards=settings.shards,
        settings=settings,
        show_progress=not args.no_progress,
        say=say,
    )
    print_result(result, args.json, say=say)
    return 0 if result.verified else 1


def cmd_publish(args: argparse.Namespace) -> int:
    from bus.client import Client
    from events.errors import TiermemError
    from tiermem.commands.publish import print_reply, publish_lines

    try:
        source = sys.stdin.buffer if args.file in (None, "-") else open(args.file, "rb")
    except OSError as error:
        raise TiermemError(f"cannot read {args.file}: {error.strerror}") from None
    with source, Client(_endpoints(args), timeout=args.timeout) as client:
        rejected, failed = publish_lines(client, source, lane=args.priority, emit=print_reply)
    # Every reply but Error counts as success: Ack, Value, NotFound, Results, Conflict.
    return 0 if rejected == 0 and failed == 0 else 1


def cmd_get(args: argparse.Namespace) -> int:
    from bus.client import Client
    from events.types import Get, Value

    if args.view:
        from tiermem.commands.replay import print_view_get

        return print_view_get(args.data_dir, args.view, args.namespace, args.key)

    with Client(_endpoints(args), timeout=args.timeout) as client:
        reply = client.request(Get(key=args.key, namespace=args.namespace), lane=args.priority)
    print(msgspec.json.encode(reply).decode())
    return 0 if isinstance(reply, Value) else 1


def cmd_schema(args: argparse.Namespace) -> int:
    from events.schema import schema_document

    print(json.dumps(schema_document(), indent=2, sort_keys=True))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from bus.auth import generate_keypair, load_keys

    public, secret = generate_keypair(args.directory, args.name)
    print(json.dumps({"name": args.name, "public_key": load_keys(public).public.decode(), "public_file": str(public), "secret_file": str(secret)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermem", description="Event-sourced four-tier memory for AI agents.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the embedded stack in the foreground until Ctrl-C")
    up.add_argument("--config", metavar="FILE", help="TOML file of settings; TIERMEM_* variables and the options below override it (see docs/configuration.md)")
    up.add_argument("--data-dir", help=f"where Redis, LTM and logs live (default: the data_dir setting, {DEFAULT_DATA_DIR})")
    up.add_argument("--shards", type=int, help="number of shard actors (default: the shards setting, 2)")
    up.add_argument("--dashboard", action="store_true", help="start the Ray dashboard on 127.0.0.1")
    up.set_defaults(handler=cmd_up)

    demo = commands.add_parser("demo", help="stream the chitchat corpus through the stack, crash it, recover, verify")
    demo.add_argument("--limit", type=positive_int, default=None, help="number of utterances to store (default: all 258,145)")
    demo.add_argument("--config", metavar="FILE", help="TOML file of settings for the demo's stack (see docs/configuration.md); the demo still uses its own data directory, random ports and maintenance interval")
    demo.add_argument("--data-dir", default=os.path.join(DEFAULT_DATA_DIR, "demo"), help="an empty or earlier demo directory (default: %(default)s)")
    demo.add_argument("--shards", type=int, help="number of shard actors (default: the shards setting, 2)")
    demo.add_argument("--json", action="store_true", help="end standard output with one JSON object of the results")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(handler=cmd_demo)

    publish = commands.add_parser(
        "publish",
        help="send events read as JSON lines; print each reply as a JSON line",
        description=(
            "Print one reply per non-blank input line, in input order, as soon as it arrives. "
            "Exit status 0 when every line got a reply that is not Error, 1 otherwise."
        ),
    )
    publish.add_argument("file", nargs="?", help="file of JSON lines, or - for standard input (default)")
    publish.add_argument("--priority", choices=("high", "normal", "low"), default="normal", help="lane to send on (default: %(default)s)")
    publish.add_argument("--timeout", type=positive_float, default=10.0, help="seconds to wait for each reply before resending (default: %(default)s)")
    _add_target(publish)
    publish.set_defaults(handler=cmd_publish)

    get = commands.add_parser("get", help="read one key; exit 1 if it is not found")
    get.add_argument("key")
    get.add_argument("--namespace", default="default", help="namespace of the key (default: %(default)s)")
    get.add_argument("--priority", choices=("high", "normal", "low"), default="high", help="lane to send on (default: %(default)s)")
    get.add_argument("--timeout", type=positive_float, default=10.0, help="seconds to wait before resending (default: %(default)s)")
    get.add_argument("--view", help="read from a view built by `tiermem replay --to-seq/--as-of --view NAME` instead of live")
    _add_target(get)
    get.set_defaults(handler=cmd_get)

    keygen = commands.add_parser("keygen", help="write a CurveZMQ key pair: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("directory", help="folder to write the two files into")
    keygen.add_argument("--name", default="server", help="file name stem (default: %(default)s)")
    keygen.set_defaults(handler=cmd_keygen)

    from tiermem.commands.config import add_config_parser
    from tiermem.commands.doctor import add_doctor_parser
    from tiermem.commands.projections import add_projection_parsers
    from tiermem.commands.replay import add_replay_parser, add_snapshot_parser

    add_projection_parsers(commands)
    add_replay_parser(commands)
    add_snapshot_parser(commands)

    from tiermem.commands.backup import add_backup_parser
    from tiermem.commands.erase import add_erase_parser

    add_backup_parser(commands)
    add_erase_parser(commands)

    from tiermem.commands.check import add_check_parser
    from tiermem.commands.console import add_console_parser

    add_check_parser(commands)
    add_console_parser(commands)

    from tiermem.commands.bench import add_bench_parser

    add_bench_parser(commands)
    add_config_parser(commands)
    add_doctor_parser(commands)

    schema = commands.add_parser("schema", help="print the JSON Schema of every request and reply")
    schema.set_defaults(handler=cmd_schema)
    return parser


def parse_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Parse `argv`; report an unknown option with the usage of the subcommand it was given to.

    `parse_args` reports it with the top-level usage, which does not show
    the options the subcommand has.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _innermost_parser(parser, args).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    return args


def _innermost_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """Return the parser of the last subcommand chosen under `parser`."""
    while True:
        subcommands = next(
            (
                action
                for action in parser._actions
                if isinstance(action, argparse._SubParsersAction)
            ),
            None,
        )
        chosen = getattr(args, subcommands.dest, None) if subcommands else None
        if chosen not in getattr(subcommands, "choices", {}):
            return parser
        parser = subcommands.choices[chosen]


def main(argv: list[str] | None = None) -> int:
    from events.errors import TiermemError
    from tiermem.logs import configure_logging

    args = parse_arguments(build_parser(), argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    configure_logging()
    try:
        return args.handler(args)
    except TiermemError as error:
        print(f"tiermem {args.command}: {error}", file=sys.stderr)
        return 1
    except (NotADirectoryError, FileNotFoundError, PermissionError) as error:
        print(f"tiermem {args.command}: {error.filename or ''}: {error.strerror}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of standard output went away (`tiermem ... | head`).
        # Point the descriptor at /dev/null so the flush at exit does not
        # raise again, and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
