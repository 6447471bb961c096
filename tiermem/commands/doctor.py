"""`tiermem doctor`: check a running stack and print how to fix each problem.

The stack is found either by its data directory, whose `stack.json` is the
configuration `tiermem up` started it with, or by a TOML settings file.
With a file, every URL, address and port 0 it leaves unset is taken from
`DIR/stack.json` of its `data_dir`, if a stack runs there. The router's
endpoints come from `DIR/endpoints.json`, or else from `router.ports`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec

from events.errors import TiermemError
from tiermem.commands.arguments import non_negative_int, positive_float
from tiermem.commands.curve import add_curve_arguments, curve_from_args

__all__ = ["add_doctor_parser", "cmd_doctor", "load_target", "print_report"]

DEFAULT_DATA_DIR = ".tiermem"

# Settings that the embedded stack fills in at start when they are unset.
_FILLED_AT_START = ("ray_address", "log_url", "stm_url", "im_url", "broker_url")


def add_doctor_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `tiermem doctor`."""
    from tiermem.doctor import DoctorOptions

    defaults = DoctorOptions()
    parser = subparsers.add_parser(
        "doctor",
        help="check Redis settings, Ray, the bus lanes, shard actors, lag, the Celery workers and beat; exit 1 if anything is wrong",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--data-dir",
        help=f"data directory of a stack that `tiermem up` runs (default: {DEFAULT_DATA_DIR})",
    )
    target.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings of the stack, with TIERMEM_* variables; unset URLs come from DIR/stack.json of its data_dir",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: {ok, checks: [{name, ok, detail, fix}]}",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=defaults.timeout_s,
        help="seconds each request to Redis, the router or the Celery workers may take (default: %(default)s)",
    )
    parser.add_argument(
        "--min-free-mb",
        type=non_negative_int,
        default=defaults.min_free_bytes // 1024**2,
        help="free MiB below which the data directory's file system fails the check (default: %(default)s)",
    )
    parser.add_argument(
        "--max-apply-lag",
        type=non_negative_int,
        default=defaults.max_apply_lag,
        help="unapplied events per shard above which the apply lag check fails (default: %(default)s)",
    )
    parser.add_argument(
        "--max-projection-lag",
        type=non_negative_int,
        default=defaults.max_projection_lag,
        help="events the search projection may be behind the log (default: %(default)s)",
    )
    add_curve_arguments(parser, "the public key in router.auth.server_secret_file")
    parser.set_defaults(handler=cmd_doctor)


def _running_config(data_dir: Path):
    from tiermem.config import load_stack_config

    path = data_dir / "stack.json"
    try:
        return load_stack_config(path)
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise TiermemError(
            f"{path} is not a valid stack configuration: {error}"
        ) from None


def load_target(data_dir: str | None, config_file: str | None):
    """Return the `StackConfig` to check and the router's endpoints (None when unknown)."""
    from tiermem.settings import load_config

    if config_file is not None:
        config = load_config(config_file)
        running = _running_config(Path(config.data_dir))
        if running is not None:
            for name in _FILLED_AT_START:
                if getattr(config, name) is None:
                    setattr(config, name, getattr(running, name))
            ports = {
                lane: port or running.router.ports.get(lane, 0)
                for lane, port in config.router.ports.items()
            }
            config.router = msgspec.structs.replace(config.router, ports=ports)
    else:
        from tiermem.stack import stack_lock_held

        directory = Path(data_dir or DEFAULT_DATA_DIR)
        config = _running_config(directory)
        if config is None:
            raise TiermemError(
                f"{directory / 'stack.json'} does not exist, so no stack runs there: start one with "
                f"`tiermem up --data-dir {directory}`, or pass --config FILE for a stack started elsewhere"
            )
        if (directory / "stack.lock").exists() and not stack_lock_held(directory):
            raise TiermemError(
                f"no stack runs in {directory}: its stack.lock is not held, so the `tiermem up` that "
                f"used it has stopped; start it again with `tiermem up --data-dir {directory}`"
            )
    return config, _endpoints(config)


def _endpoints(config) -> dict[str, str] | None:
    path = Path(config.data_dir) / "endpoints.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        record = None
    except json.JSONDecodeError as error:
        raise TiermemError(
            f"{path} is not valid JSON: {error}; restart the router to rewrite it"
        ) from None
    if record is not None:
        return {name: url for name, url in record.items() if isinstance(url, str)}
    if all(config.router.ports.values()):
        return {name: config.router.endpoint(name) for name in config.router.ports}
    return None


def print_report(report, as_json: bool) -> None:
    """Print the report: one JSON object, or one line per check with the fix below a failure."""
    if as_json:
        print(json.dumps(msgspec.to_builtins(report)))
        return
    width = max(len(check.name) for check in report.checks)
    for check in report.checks:
        print(
            f"{'ok' if check.ok else 'FAIL':<4}  {check.name:<{width}}  {check.detail}"
        )
        if check.fix:
            print(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    failed = sum(not check.ok for check in report.checks)
    total = len(report.checks)
    print(
        f"all {total} checks passed"
        if not failed
        else f"{failed} of {total} checks failed"
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    from tiermem.doctor import DoctorOptions, run_doctor, settings_failed

    try:
        config, endpoints = load_target(args.data_dir, args.config)
        curve = curve_from_args(args, config.router.auth.server_secret_file)
    except (TiermemError, OSError, ValueError) as error:
        report = settings_failed(error)
        print_report(report, args.json)
        return 1
    options = DoctorOptions(
        timeout_s=args.timeout,
        min_free_bytes=args.min_free_mb * 1024**2,
        max_apply_lag=args.max_apply_lag,
        max_projection_lag=args.max_projection_lag,
        curve=curve,
    )
    report = run_doctor(config, endpoints, options)
    print_report(report, args.json)
    return 0 if report.ok else 1
