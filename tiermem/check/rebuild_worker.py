"""Rebuild logs in a separate process, to show that tier state does not depend on it.

The runner starts this module with another `PYTHONHASHSEED` than its own,
sends one log per line on standard input and compares the digests that come
back with the live ones. Code that depends on the process (Python's salted
`hash()` for placement, the iteration order of a set of strings) gives other
digests here. A request line is `{"events": [...]}` (events as JSON, in seq
order, dense from 1); the reply line is `{"digests": [...]}` or
`{"error": "..."}`.

`--preload FILE` runs a Python file before the first rebuild, so a test that
patches the code under test in its own process can apply the same patch
here.
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys

import msgspec
import structlog

from events.types import AnyEvent, TierDigest
from handlers.policy import Policy
from replay.rebuild import rebuild
from tiermem.check.targets import MemoryEventLog, body_hash

__all__ = ["main"]


class _Request(msgspec.Struct):
    events: list[AnyEvent]


class _Reply(msgspec.Struct, omit_defaults=True):
    digests: list[TierDigest] | None = None
    error: str | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiermem.check.rebuild_worker")
    parser.add_argument(
        "--shards", type=int, required=True, help="number of shards to rebuild into"
    )
    parser.add_argument("--policy", required=True, help="the policy as a JSON object")
    parser.add_argument(
        "--preload", help="a Python file to run before the first rebuild"
    )
    args = parser.parse_args(argv)

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
    )
    policy = msgspec.json.decode(args.policy, type=Policy)
    if args.preload:
        runpy.run_path(args.preload)

    decoder = msgspec.json.Decoder(_Request)
    encoder = msgspec.json.Encoder()
    for line in sys.stdin.buffer:
        try:
            request = decoder.decode(line)
            event_log = MemoryEventLog()
            event_log.append(
                request.events, [body_hash(event) for event in request.events]
            )
            result = rebuild(
                event_log,
                shards=args.shards,
                policy=policy,
                until_seq=event_log.last_seq(),
            )
            reply = _Reply(digests=result.digests)
        except Exception as error:  # noqa: BLE001 - the runner reports it as a failed check
            reply = _Reply(error=f"{type(error).__name__}: {error}")
        sys.stdout.buffer.write(encoder.encode(reply) + b"\n")
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
