"""`tiermem check`: the model-based check against one of three targets.

`inprocess` (the default) runs the real shard code over in-memory tiers with
a fake clock. `stack` starts an embedded stack in a fresh data directory
(or uses `--endpoint` as a stack given to the check alone) and stops it at
the end. `endpoint` checks a running deployment that others may use, in
namespaces under `--namespace` only, and forgets every key it wrote. With
`--json` the last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from events.errors import TiermemError
from tiermem.commands.arguments import positive_int
from tiermem.commands.curve import add_curve_arguments, curve_from_args

__all__ = ["add_check_parser", "cmd_check", "endpoints_from_url"]

LANE_ORDER = ("high", "normal", "low", "pub")


def endpoints_from_url(url: str) -> dict[str, str]:
    """Return the lane endpoints of `tcp://HOST:PORT` (the high lane; the others follow)."""
    prefix, _, port = url.rpartition(":")
    if not prefix.startswith("tcp://") or not port.isdigit():
        raise SystemExit(
            f"--endpoint {url!r} is invalid: expected tcp://HOST:PORT of the high lane"
        )
    return {
        lane: f"{prefix}:{int(port) + offset}" for offset, lane in enumerate(LANE_ORDER)
    }


def add_check_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tiermem check` to an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "check",
        help="run the model-based check: random event sequences compared with a reference model",
        description=(
            "Generate random sequences of stores, reads, forgets, maintenance passes, retries and "
            "faults; compare every reply, the log and the rebuilt state with a reference model of "
            "docs/semantics.md. On failure, print the shrunk sequence and the seed, and write the "
            "failing run's events as JSON lines."
        ),
    )
    parser.add_argument(
        "--target",
        choices=("inprocess", "stack", "endpoint"),
        default="inprocess",
        help="what to check (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        choices=("ci", "long"),
        default="ci",
        help="examples and steps per example, before --examples and --steps (default: %(default)s)",
    )
    parser.add_argument(
        "--examples",
        type=positive_int,
        default=None,
        help="number of generated examples (default: 600 for ci, 2000 for long)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="maximum steps per example (default: 40 for ci, 60 for long)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the run, printed on failure; the same seed repeats an in-process run (default: random)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=2,
        help="shards of the in-process target or of the stack the check starts (default: %(default)s)",
    )
    parser.add_argument(
        "--endpoint",
        help="tcp://HOST:PORT of the router's high lane; normal, low and pub are the next ports",
    )
    parser.add_argument(
        "--namespace",
        default="tiermem-check",
        help="prefix of every namespace and id the check uses (default: %(default)s)",
    )
    add_curve_arguments(parser, "the public key in the running stack's router.auth.server_secret_file")
    parser.add_argument(
        "--faults",
        action="store_true",
        help="inprocess: also take tiers down for a step; stack: kill -9 and restart the router, shard actors, Redis and the Celery worker",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="stack: data directory for the stack the check starts (default: a new temporary one); endpoint: directory of a running `tiermem up`; failing runs go to DIR/check (default: .tiermem/check)",
    )
    parser.add_argument(
        "--log-url",
        default=None,
        help="redis:// URL of the log, read directly instead of over the bus",
    )
    parser.add_argument(
        "--no-shrink",
        action="store_true",
        help="report the first failing example without shrinking it",
    )
    parser.add_argument(
        "--replay",
        metavar="FILE",
        default=None,
        help="replay a failing run written by an earlier check into in-process shards and the model, and report",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="end standard output with one JSON object of the results",
    )
    parser.set_defaults(handler=cmd_check)
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    from tiermem.logs import configure_logging

    # Injected faults make the system log errors on purpose; show them only on request.
    configure_logging(os.environ.get("TIERMEM_LOG_LEVEL", "CRITICAL"))
    if args.replay:
        return _replay(args)
    if args.faults and args.target == "endpoint":
        raise SystemExit(
            "--faults needs a stack the check starts itself: use --target stack without --endpoint"
        )
    if args.target == "inprocess" and args.endpoint:
        raise SystemExit("--endpoint needs --target stack or --target endpoint")
    if args.client_key is not None and args.target != "endpoint":
        raise SystemExit(
            "--client-key is for --target endpoint: the stack the check starts has no CURVE keys"
        )
    run_dir = Path(args.data_dir or ".tiermem") / "check"
    if args.target == "inprocess":
        return _check_inprocess(args, run_dir)
    return _check_remote(args, run_dir)


def _check_inprocess(args: argparse.Namespace, run_dir: Path) -> int:
    from tiermem.check.runner import run_check
    from tiermem.check.targets import InProcessTarget

    target = InProcessTarget(shards=args.shards, outages=args.faults)
    result = run_check(
        target,
        profile=args.profile,
        examples=args.examples,
        steps=args.steps,
        seed=args.seed,
        shrink=not args.no_shrink,
        cross_process=True,
        failing_run_dir=run_dir,
    )
    return _report(result, args)


def _check_remote(args: argparse.Namespace, run_dir: Path) -> int:
    from tiermem.check.machine import CheckSettings
    from tiermem.check.remote import STACK_POLICY, RemoteTarget, StackFaults
    from tiermem.check.runner import run_check

    stack = None
    owned_dir: str | None = None
    token = uuid.uuid4().hex[:8]
    try:
        if args.target == "stack" and not args.endpoint:
            stack, owned_dir = _start_stack(args)
            endpoints, shards, policy, log_url = (
                stack.endpoints,
                args.shards,
                STACK_POLICY,
                stack.config.log_url,
            )
            faults = StackFaults(stack) if args.faults else None
            curve = None
        else:
            endpoints, shards, policy, log_url, curve = _deployment(args)
            faults = None
            if args.target == "stack":
                _require_empty(endpoints)
        exclusive = args.target == "stack"
        # The stack the check starts runs Celery, whose beat keeps the
        # search index within a second of the log.
        search = stack is not None
        event_log = None
        if args.log_url or (log_url and exclusive):
            import redis

            from events.log import RedisEventLog

            event_log = RedisEventLog(redis.Redis.from_url(args.log_url or log_url))
        target = RemoteTarget(
            endpoints,
            shards=shards,
            policy=policy,
            event_log=event_log,
            exclusive=exclusive,
            faults=faults,
            name=args.target,
            search=search,
            curve=curve,
        )
        if exclusive:
            settings = CheckSettings()
        else:
            # A shared deployment: no maintenance of other namespaces, and
            # TTLs far longer than a run, because other clients' traffic
            # decides when its maintenance runs.
            settings = CheckSettings(
                ttls=(None, None, 86_400), global_maintain=False, faults=False
            )
        try:
            result = run_check(
                target,
                settings=settings,
                profile=args.profile,
                examples=args.examples if args.examples is not None else 25,
                steps=args.steps if args.steps is not None else 30,
                seed=args.seed,
                shrink=not args.no_shrink,
                failing_run_dir=run_dir,
                prefix=lambda number: f"{args.namespace}/{token}/x{number}/",
            )
        finally:
            target.close()
    finally:
        if stack is not None:
            stack.stop()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
    return _report(result, args)


def _start_stack(args: argparse.Namespace):
    import msgspec

    from tiermem.check.remote import STACK_POLICY
    from tiermem.config import StackConfig
    from tiermem.stack import Stack

    owned_dir = None
    if args.data_dir:
        data_dir = Path(args.data_dir)
        if (data_dir / "endpoints.json").exists():
            raise SystemExit(
                f"{data_dir} contains a running stack (endpoints.json exists); give --data-dir an unused directory, or check it with --target endpoint"
            )
    else:
        owned_dir = tempfile.mkdtemp(prefix="tiermem-check-")
        data_dir = Path(owned_dir)
    # Beat sends a Maintain over every namespace once per interval; the
    # check accepts those, but an hour keeps them out of most runs.
    config = StackConfig(
        data_dir=str(data_dir),
        shards=args.shards,
        policy=STACK_POLICY,
        maintain_interval_s=3600.0,
    )
    config.router = msgspec.structs.replace(
        config.router, ports={lane: 0 for lane in LANE_ORDER}
    )
    stack = Stack(config, celery=True, supervised=True)
    print(f"tiermem check: starting a stack in {data_dir}", file=sys.stderr)
    stack.start()
    return stack, owned_dir


def _require_empty(endpoints: dict[str, str]) -> None:
    """Exit when the router's tiers hold records, which the stack target would count as the check's."""
    from bus.client import Client, ClientError

    try:
        with Client(endpoints, timeout=10) as client:
            reply = client.digest()
    except ClientError as error:
        raise SystemExit(
            f"tiermem check: the router at {endpoints['high']} sent no digest ({error}); "
            "run the check again once every shard has caught up"
        ) from None
    holding = [digest for digest in reply.tiers if digest.records]
    if holding:
        where = ", ".join(
            f"shard {digest.shard} {digest.tier}: {digest.records}" for digest in holding
        )
        raise SystemExit(
            f"tiermem check: the router at {endpoints['high']} already contains records ({where}); "
            "--target stack compares every tier with the model, so it needs a router given to the "
            "check alone. Check a deployment in use with --target endpoint."
        )


def _deployment(args: argparse.Namespace):
    """Return the endpoints, shard count, policy, log URL and CURVE keys of a running deployment."""
    from bus.client import Client, load_endpoints
    from handlers.policy import Policy

    policy, log_url, server_file = Policy(), None, None
    if args.endpoint:
        endpoints = endpoints_from_url(args.endpoint)
    else:
        data_dir = Path(args.data_dir or ".tiermem")
        endpoints = {
            lane: url
            for lane, url in load_endpoints(data_dir).items()
            if lane in LANE_ORDER
        }
        config_path = data_dir / "stack.json"
        if config_path.exists():
            from tiermem.config import load_stack_config

            config = load_stack_config(config_path)
            policy, log_url = config.policy, config.log_url
            server_file = config.router.auth.server_secret_file
    if policy == Policy() and not args.data_dir:
        print(
            "tiermem check: assuming the default policy; give --data-dir of the deployment to read its own",
            file=sys.stderr,
        )
    try:
        curve = curve_from_args(args, server_file)
    except TiermemError as error:
        raise SystemExit(f"tiermem check: {error}") from None
    with Client(endpoints, timeout=10, curve=curve) as client:
        shards = len(client.status().shards)
    return endpoints, shards, policy, log_url, curve


def _report(result, args: argparse.Namespace) -> int:
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    if result.passed:
        say(
            f"tiermem check: passed {result.examples} examples ({result.steps_run} steps, "
            f"{result.faults} faults) on {result.target} in {result.seconds}s (seed {result.seed})"
        )
    else:
        say(
            f"tiermem check: FAILED on {result.target} after {result.examples} examples in {result.seconds}s (seed {result.seed})"
        )
        say(result.failure or "")
        say("shrunk sequence of steps:")
        for line in result.steps:
            say(f"  {line}")
        say(f"events of the failing run ({len(result.events)}):")
        for line in result.events:
            say(f"  {line}")
        if result.failing_run:
            say(f"failing run written to {result.failing_run}")
            say(f"replay it: tiermem check --replay {result.failing_run}")
        say(f"rerun it: tiermem check --target {result.target} --seed {result.seed}")
    if args.json:
        summary = result.to_json()
        summary.pop("traceback", None)
        print(json.dumps(summary))
    return 0 if result.passed else 1


def _replay(args: argparse.Namespace) -> int:
    import msgspec

    from tiermem.check.runner import load_failing_run

    try:
        report = load_failing_run(args.replay)
    except (msgspec.DecodeError, msgspec.ValidationError, json.JSONDecodeError, KeyError) as error:
        raise SystemExit(
            f"tiermem check: {args.replay} is not a failing run written by `tiermem check` "
            f"(one JSON event per line, with its .json description beside it): {error}"
        ) from None
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    if report.passed:
        say(
            f"tiermem check: replayed {report.events} events from {args.replay}: shards and model agree"
        )
    else:
        say(
            f"tiermem check: replayed {report.events} events from {args.replay}: {len(report.problems)} disagreements"
        )
        for problem in report.problems:
            say(f"  {problem}")
    if args.json:
        print(
            json.dumps(
                {
                    "passed": report.passed,
                    "events": report.events,
                    "problems": report.problems,
                }
            )
        )
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Run `tiermem check` alone, until the lead wires it into `tiermem.cli`."""
    parser = argparse.ArgumentParser(prog="tiermem")
    add_check_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
