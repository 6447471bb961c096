"""Resources shared by the scenarios of one run, started on first use.

Two embedded stacks run, one after the other. The bus stack serves every
scenario that sends requests. Its policy has a small cache and small STM
and IM capacities, so that maintenance pushes keys down to IM and LTM for
the read scenario. The history stack, with the default policy, contains
the long log that replay and recovery start from. Both run without Celery,
because nothing here needs beat's maintenance and the worker would only
compete for the CPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from bench.drivers import Workers
from bench.echo import EchoServer
from bench.plan import Plan
from bench.profile import Profiler
from handlers.policy import Policy
from tiermem.config import StackConfig
from tiermem.stack import Stack

__all__ = ["BenchContext"]

log = structlog.get_logger("tiermem.bench")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BenchContext:
    """The plan, a scratch directory, and the processes every scenario may need."""

    def __init__(
        self,
        plan: Plan,
        scratch: Path,
        *,
        say: Callable[[str], None] = _stderr,
        profiler: Profiler | None = None,
    ) -> None:
        self.plan = plan
        self.scratch = scratch
        self.say = say
        self.profiler = profiler
        self._workers: Workers | None = None
        self._echo: EchoServer | None = None
        self._bus: Stack | None = None
        self._history: Stack | None = None
        # Set by the scenario that first stores the read keys on the bus
        # stack (bench.latency.ReadKeys), and by the first one that builds
        # the history stack's log (bench.history.History).
        self.read_keys: Any = None
        self.history: Any = None

    # ----------------------------------------------------------- processes

    @property
    def workers(self) -> Workers:
        if self._workers is None:
            self.say(f"starting {self.plan.workers} client worker processes")
            self._workers = Workers(self.plan.workers).start()
        return self._workers

    @property
    def echo(self) -> EchoServer:
        if self._echo is None:
            self._echo = EchoServer().start()
            self.say(
                f"bare pyzmq echo server on {self._echo.endpoint} (pid {self._echo.pid})"
            )
        return self._echo

    def _start_stack(self, name: str, policy: Policy) -> Stack:
        config = StackConfig(
            data_dir=str(self.scratch / name), shards=self.plan.shards, policy=policy
        )
        config.router = msgspec.structs.replace(
            config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0}
        )
        stack = Stack(config, celery=False)
        self.say(
            f"starting the {name} stack in {stack.data_dir} (Redis x3, Ray, router, {self.plan.shards} shards)"
        )
        stack.start()
        return stack

    @property
    def bus(self) -> Stack:
        if self._bus is None:
            self.close_history()
            policy = Policy(
                cache_capacity=self.plan.read_cache_capacity,
                stm_capacity=self.plan.read_keys_per_tier,
                im_capacity=self.plan.read_keys_per_tier,
            )
            self._bus = self._start_stack("bus", policy)
        return self._bus

    @property
    def history_stack(self) -> Stack:
        if self._history is None:
            self.close_bus()
            self._history = self._start_stack("history", Policy())
        return self._history

    def profiled(
        self, label: str, pids: Callable[[], dict[str, int]]
    ) -> contextlib.AbstractContextManager[None]:
        """Profile the processes `pids()` names while the block runs, if profiling is on."""
        if self.profiler is None:
            return contextlib.nullcontext()
        return self.profiler.record(label, pids())

    def bus_pids(self) -> dict[str, int]:
        """Return the pids of the bus stack's router and shard actors, by name."""
        return {"router": self.bus.router_pid or 0, **self.shard_pids()}

    def shard_pids(self) -> dict[str, int]:
        """Return the pid of each shard actor of the bus stack, named `shard-N`."""
        from bus.client import Client

        with Client(self.bus.endpoints, timeout=30) as client:
            status = client.status()
        return {f"shard-{shard.shard}": shard.pid for shard in status.shards}

    def close_bus(self) -> None:
        if self._bus is not None:
            self.say("stopping the bus stack")
            self._bus.stop()
            self._bus = None
            if self.read_keys is not None:
                self.read_keys.redis.stop()
                self.read_keys = None

    def close_history(self) -> None:
        if self._history is not None:
            self.say("stopping the history stack")
            self._history.stop()
            self._history = None
            self.history = None

    def close(self) -> None:
        """Stop everything this context started, newest first; log and go on past failures."""
        for action in (
            self.close_history,
            self.close_bus,
            self._stop_echo,
            self._stop_workers,
        ):
            try:
                action()
            except Exception as error:  # noqa: BLE001 - the remaining processes must still stop
                log.error(
                    "bench.cleanup.failed",
                    step=action.__name__,
                    error=repr(error),
                    next="stopping the rest",
                )

    def _stop_echo(self) -> None:
        if self._echo is not None:
            self._echo.stop()
            self._echo = None

    def _stop_workers(self) -> None:
        if self._workers is not None:
            self._workers.stop()
            self._workers = None
