"""Bounded thread pools that grow and shrink with their queue, one per tier.

`AdaptivePool` is a `concurrent.futures.Executor` built on `threading` and
`collections.deque`, not on `ThreadPoolExecutor`, whose worker count cannot
change through its public API. It runs between `min_workers` and
`max_workers` threads:

- `submit` starts a worker when more than `grow_threshold` tasks wait
  beyond the idle workers, or when the pool has no worker at all, as long
  as it has fewer than `max_workers`;
- a worker above `min_workers` that finds no task for `idle_timeout_s`
  seconds exits.

The queue is bounded. When it contains `queue_size` tasks, `submit` waits up
to `submit_timeout_s` seconds for room (0, the default, does not wait), and
then raises `PoolFullError`. Every accepted task runs exactly once, unless
it is cancelled: by `Future.cancel()` before it starts, or by
`shutdown(cancel_futures=True)`.

`TierPools` contains one pool per tier name (`stm`, `im`, `ltm`), sized by
`TierPoolSettings`. The pool threads are daemon threads, so a pool that is
never shut down does not keep the interpreter alive.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from typing import Any

import msgspec
import structlog

from events.errors import TiermemError
from tiers.base import TIER_NAMES

__all__ = [
    "AdaptivePool",
    "PoolClosedError",
    "PoolError",
    "PoolFullError",
    "PoolSettings",
    "PoolStats",
    "TierPoolSettings",
    "TierPools",
]

log = structlog.get_logger("tiermem.pools")


class PoolError(TiermemError):
    """Base class of the errors `AdaptivePool.submit` raises; `pool` is the pool's name."""

    def __init__(self, message: str, *, pool: str) -> None:
        super().__init__(message)
        self.pool = pool


class PoolFullError(PoolError):
    """The queue held `queue_size` tasks for the whole `submit_timeout_s`."""

    def __init__(self, message: str, *, pool: str, queue_size: int) -> None:
        super().__init__(message, pool=pool)
        self.queue_size = queue_size


class PoolClosedError(PoolError, RuntimeError):
    """`submit` was called after `shutdown`.

    It is also a `RuntimeError`, which `ThreadPoolExecutor` raises in the
    same case.
    """


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The size bounds of one pool: workers kept, workers at most, tasks waiting at most."""

    min_workers: int = 0
    max_workers: int = 1
    queue_size: int = 8

    def __post_init__(self) -> None:
        if self.min_workers < 0:
            raise ValueError(f"min_workers {self.min_workers} is invalid: use 0 or more")
        if self.max_workers < 1:
            raise ValueError(f"max_workers {self.max_workers} is invalid: use 1 or more")
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers {self.min_workers} exceeds max_workers {self.max_workers}: "
                "use a min_workers at most max_workers"
            )
        if self.queue_size < 1:
            raise ValueError(f"queue_size {self.queue_size} is invalid: use 1 or more")


class TierPoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The pool of each tier, and the idle time after which a worker above the minimum exits.

    A shard submits at most one task to each of its pools at a time,
    because it applies one batch at a time, so one worker per tier is all
    a shard uses.
    """

    stm: PoolSettings = PoolSettings()
    im: PoolSettings = PoolSettings()
    ltm: PoolSettings = PoolSettings()
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.idle_timeout_s > 0:
            raise ValueError(
                f"idle_timeout_s {self.idle_timeout_s} is invalid: use a number of seconds above 0"
            )

    def for_tier(self, name: str) -> PoolSettings:
        if name not in TIER_NAMES:
            raise ValueError(f"tier {name!r} is unknown: use one of {', '.join(TIER_NAMES)}")
        return getattr(self, name)


class PoolStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts of one pool at one moment.

    `workers`, `busy`, `idle` and `queued` are the state at that moment.
    `submitted` counts accepted tasks, `rejected` the submits that raised
    `PoolFullError`. Each accepted task ends as exactly one of `completed`
    (returned), `failed` (raised) or `cancelled`, or is still queued or
    running. `busy_seconds` is the time workers spent in tasks, the running
    ones included, since the pool started `uptime_seconds` ago (both on the
    monotonic clock). `started_unix_s` is the wall-clock time of the start,
    which distinguishes two pools of the same name.
    """

    name: str
    min_workers: int
    max_workers: int
    queue_size: int
    workers: int
    busy: int
    idle: int
    queued: int
    peak_workers: int
    submitted: int
    completed: int
    failed: int
    rejected: int
    cancelled: int
    busy_seconds: float
    uptime_seconds: float
    started_unix_s: float

    @property
    def utilization(self) -> float:
        """Return the mean fraction of `max_workers` that ran tasks since the pool started."""
        capacity = self.uptime_seconds * self.max_workers
        return min(1.0, self.busy_seconds / capacity) if capacity > 0 else 0.0


class _Task:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs


class AdaptivePool(Executor):
    """A bounded thread pool whose worker count follows its queue (see the module docstring).

    `context` is bound to every log line of the pool, next to `pool=name`.
    `min_workers` workers start in the constructor.
    """

    def __init__(
        self,
        name: str,
        *,
        min_workers: int = 0,
        max_workers: int = 1,
        queue_size: int = 8,
        idle_timeout_s: float = 60.0,
        grow_threshold: int = 0,
        submit_timeout_s: float = 0.0,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        PoolSettings(min_workers=min_workers, max_workers=max_workers, queue_size=queue_size)
        if not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s {idle_timeout_s} is invalid: use a number of seconds above 0")
        if grow_threshold < 0:
            raise ValueError(f"grow_threshold {grow_threshold} is invalid: use 0 or more")
        if submit_timeout_s < 0:
            raise ValueError(f"submit_timeout_s {submit_timeout_s} is invalid: use 0 or more seconds")

        self.name = name
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.queue_size = queue_size
        self.idle_timeout_s = idle_timeout_s
        self.grow_threshold = grow_threshold
        self.submit_timeout_s = submit_timeout_s
        self._log = log.bind(pool=name, **(context or {}))

        # One lock guards every field below. Workers wait on `_work`,
        # submitters blocked by a full queue on `_room`, and `wait_for_workers`
        # on `_resized`. The conditions are separate so that a notify reaches
        # a waiter of the right kind.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._resized = threading.Condition(self._lock)
        self._queue: collections.deque[_Task] = collections.deque()
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count(1)
        self._closed = False
        self._idle = 0
        self._busy = 0
        self._peak = 0
        self._running_since: dict[int, float] = {}
        self._counts = collections.Counter[str]()
        self._busy_seconds = 0.0
        self._started = time.monotonic()
        self._started_unix = time.time()

        with self._lock:
            for _ in range(min_workers):
                self._start_worker()
        self._log.info(
            "pool.started",
            min_workers=min_workers,
            max_workers=max_workers,
            queue_size=queue_size,
            idle_timeout_s=idle_timeout_s,
        )

    # ----------------------------------------------------------- submitting

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)` and return its future.

        Raises `PoolFullError` when the queue stays full for
        `submit_timeout_s` seconds, and `PoolClosedError` after `shutdown`.
        """
        future: Future = Future()
        with self._lock:
            self._raise_if_closed()
            if len(self._queue) >= self.queue_size:
                self._wait_for_room()
            self._queue.append(_Task(future, fn, args, kwargs))
            self._counts["submitted"] += 1
            # More tasks waiting than idle workers, beyond the threshold, need
            # a new worker, and so does any task when no worker is left.
            backlog = len(self._queue) - self._idle
            if (backlog > self.grow_threshold or not self._threads) and len(self._threads) < self.max_workers:
                self._start_worker()
                self._log.debug(
                    "pool.resized", workers=len(self._threads), reason="queue", queued=len(self._queue)
                )
            self._work.notify()
        return future

    def _wait_for_room(self) -> None:
        """Wait, holding the lock, until the queue has room; raise `PoolFullError` at the deadline."""
        deadline = time.monotonic() + self.submit_timeout_s
        while len(self._queue) >= self.queue_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._reject()
            self._room.wait(remaining)
            self._raise_if_closed()

    def _reject(self) -> None:
        self._counts["rejected"] += 1
        rejected = self._counts["rejected"]
        # Logs the 1st, 2nd, 4th, 8th, ... rejection, so a full pool does not log every submit.
        if rejected & (rejected - 1) == 0:
            self._log.warning(
                "pool.rejected",
                queue_size=self.queue_size,
                rejected=rejected,
                next="raising PoolFullError to the caller",
            )
        waited = f" for {self.submit_timeout_s:g} s" if self.submit_timeout_s else ""
        raise PoolFullError(
            f"pool {self.name!r} is full: {self.queue_size} tasks wait{waited}; "
            "retry later, or raise its queue_size or max_workers",
            pool=self.name,
            queue_size=self.queue_size,
        )

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise PoolClosedError(f"pool {self.name!r} is shut down and accepts no tasks", pool=self.name)

    # ----------------------------------------------------------- workers

    def _start_worker(self) -> None:
        """Start one worker thread; the caller holds the lock."""
        thread = threading.Thread(
            target=self._run_worker,
            name=f"pool-{self.name}-{next(self._numbers)}",
            daemon=True,
        )
        self._threads.add(thread)
        self._peak = max(self._peak, len(self._threads))
        thread.start()
        self._resized.notify_all()

    def _run_worker(self) -> None:
        me = threading.current_thread()
        while True:
            task = self._next_task(me)
            if task is None:
                return
            self._run_task(me, task)

    def _next_task(self, me: threading.Thread) -> _Task | None:
        """Return the next task, or None once this worker has left the pool."""
        with self._lock:
            deadline = time.monotonic() + self.idle_timeout_s
            while not self._queue:
                if self._closed:
                    self._leave(me, reason="shutdown")
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0 and len(self._threads) > self.min_workers:
                    self._leave(me, reason="idle")
                    return None
                if remaining <= 0:
                    # At the minimum: keep waiting, for another idle period.
                    deadline = time.monotonic() + self.idle_timeout_s
                    remaining = self.idle_timeout_s
                self._idle += 1
                try:
                    self._work.wait(remaining)
                finally:
                    self._idle -= 1
            task = self._queue.popleft()
            self._busy += 1
            self._running_since[me.ident or 0] = time.monotonic()
            self._room.notify()
            return task

    def _leave(self, me: threading.Thread, *, reason: str) -> None:
        """Remove this worker from the pool; the caller holds the lock."""
        self._threads.discard(me)
        self._resized.notify_all()
        if reason == "idle":
            self._log.debug("pool.resized", workers=len(self._threads), reason=reason)

    def _run_task(self, me: threading.Thread, task: _Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            outcome, result, error = "cancelled", None, None
        else:
            result, error = None, None
            try:
                result = task.fn(*task.args, **task.kwargs)
                outcome = "completed"
            except BaseException as raised:  # noqa: BLE001 - handed to the caller through the future
                error = raised
                outcome = "failed"
        # The counts change before the future is resolved, so a caller that
        # waited on the future reads counts that include its task.
        with self._lock:
            started = self._running_since.pop(me.ident or 0)
            self._busy_seconds += time.monotonic() - started
            self._busy -= 1
            self._counts[outcome] += 1
        if error is not None:
            task.future.set_exception(error)
            del error
        elif outcome == "completed":
            task.future.set_result(result)

    # ----------------------------------------------------------- stopping

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with `wait`, return once every worker has exited.

        Without `cancel_futures`, the workers run every queued task before
        they exit. With it, the queued tasks are cancelled, and only the
        running ones finish. Calling it again is harmless.
        """
        cancelled: list[_Task] = []
        with self._lock:
            first = not self._closed
            self._closed = True
            if cancel_futures:
                cancelled = list(self._queue)
                self._queue.clear()
            self._work.notify_all()
            self._room.notify_all()
            threads = list(self._threads)
        for task in cancelled:
            task.future.cancel()
        if cancelled:
            with self._lock:
                self._counts["cancelled"] += len(cancelled)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
        if first:
            stats = self.stats()
            self._log.info(
                "pool.stopped",
                completed=stats.completed,
                failed=stats.failed,
                cancelled=stats.cancelled,
                rejected=stats.rejected,
                workers=stats.workers,
                waited=wait,
            )

    # ----------------------------------------------------------- inspection

    def stats(self) -> PoolStats:
        now = time.monotonic()
        with self._lock:
            running = sum(now - started for started in self._running_since.values())
            return PoolStats(
                name=self.name,
                min_workers=self.min_workers,
                max_workers=self.max_workers,
                queue_size=self.queue_size,
                workers=len(self._threads),
                busy=self._busy,
                idle=self._idle,
                queued=len(self._queue),
                peak_workers=self._peak,
                submitted=self._counts["submitted"],
                completed=self._counts["completed"],
                failed=self._counts["failed"],
                rejected=self._counts["rejected"],
                cancelled=self._counts["cancelled"],
                busy_seconds=self._busy_seconds + running,
                uptime_seconds=now - self._started,
                started_unix_s=self._started_unix,
            )

    def wait_for_workers(self, count: int, timeout: float) -> bool:
        """Block until the pool has exactly `count` workers; return False at the timeout."""
        with self._lock:
            return self._resized.wait_for(lambda: len(self._threads) == count, timeout)


class TierPools:
    """One `AdaptivePool` per tier name, sized by `TierPoolSettings`.

    `context` is bound to the pools' log lines (a shard's number, for
    example).
    """

    def __init__(
        self, settings: TierPoolSettings = TierPoolSettings(), *, context: Mapping[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self._pools: dict[str, AdaptivePool] = {}
        for name in TIER_NAMES:
            sizes = settings.for_tier(name)
            self._pools[name] = AdaptivePool(
                name,
                min_workers=sizes.min_workers,
                max_workers=sizes.max_workers,
                queue_size=sizes.queue_size,
                idle_timeout_s=settings.idle_timeout_s,
                context=context,
            )

    def __getitem__(self, name: str) -> AdaptivePool:
        return self._pools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def stats(self) -> list[PoolStats]:
        """Return the stats of every pool, in tier order."""
        return [self._pools[name].stats() for name in TIER_NAMES]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait, cancel_futures=cancel_futures)
