"""kill -9 of each process in turn under 100,000 events: nothing acknowledged is lost.

One embedded stack (`Stack`, as `tiermem up` starts it: private Redis
servers, the router process with its Ray shard actors, a Celery worker and
beat) takes 100,000 planned events from a pipelined client in a thread of
this process. The events are mostly Stores over many namespaces and keys,
with Gets, Forgets of a key or of a whole namespace, Stores that expire
after a second, and Maintains. In five phases of 20,000 events, the test
kills one process in the middle of each of the first four, while the
client has requests in flight:

1. the router process, which the test starts again;
2. one shard actor's process (its pid from a `Status` reply), which Ray
   restarts;
3. the STM Redis, which the test starts again on the same port and data
   directory, and the shards' circuit breakers close by themselves;
4. the Celery worker, while it runs a verify task, which the test starts
   again and the broker delivers again.

The fifth phase runs `tiermem replay --apply`, which rebuilds every shard's
live tiers while events flow. After each phase every event of it is
acknowledged, `tiermem replay --verify --json` passes, the log contains
every acknowledged id once and at its seq, and a Get of every key ever
stored returns what the acknowledged events define.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bus.client import Client, RequestTimeout
from events.errors import ErrorCode
from events.log import RedisEventLog
from events.types import (
    Ack,
    Busy,
    Error,
    Event,
    Forget,
    Get,
    Maintain,
    Message,
    NotFound,
    Store,
    Value,
)
from handlers.policy import Policy
from handlers.sharding import shard_of
from tiermem.config import StackConfig
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL_EVENTS = 100_000
PHASES = 5
NAMESPACES = 80
KEYS_PER_NAMESPACE = 50
SEED = 20_261_203

# Capacities per namespace small enough that Maintain moves records to IM
# and on to LTM, so every tier contains records when a process is killed.
POLICY = Policy(stm_capacity=8, im_capacity=16)

# One namespace of each of the 2 shards, for probe reads.
PROBE_NAMESPACES = [
    next(
        f"probe-{index}"
        for index in range(100)
        if shard_of(f"probe-{index}", 2) == shard
    )
    for shard in range(2)
]

# Requests in flight from the traffic thread: below the router's
# `client_window` (4,096), which its send high-water mark is sized for.
WINDOW = 500
# Events per `Client.pipeline` call. A chunk whose call times out is sent
# again whole, under the same ids, and the router replies to the ids it
# already logged with their original seqs.
CHUNK = 2_000

# Seconds before the broker delivers an unacknowledged task again: short,
# so that the task of the killed worker runs again soon after the restart.
# A task that runs longer is delivered a second time while it runs, which
# is harmless for a verify. A verify from empty of about 75,000 events, the
# slowest task here, took 3.4 s in one run on the 2-core development
# machine while other jobs kept its load average near 6.
VISIBILITY_TIMEOUT_S = 12

# Seconds. Generous, because other jobs may share the machine's 2 cores.
RESTART_TIMEOUT_S = 90
CLI_TIMEOUT_S = 120


# ----------------------------------------------------------------- the plan


def plan_events(seed: int = SEED, total: int = TOTAL_EVENTS) -> list[Event]:
    """Return `total` events with fixed ids, drawn from `random.Random(seed)`."""
    rng = random.Random(seed)
    events: list[Event] = []
    for index in range(total):
        event_id = f"kt-{index}"
        namespace = f"agent-{rng.randrange(NAMESPACES)}"
        key = f"note-{rng.randrange(KEYS_PER_NAMESPACE)}"
        draw = rng.random()
        if index % 2_500 == 2_499:
            events.append(Maintain(id=event_id))
        elif draw < 0.80:
            # One Store in a hundred lives for one second, so that expiry
            # decides some final reads.
            ttl_s = 1 if rng.random() < 0.01 else None
            events.append(
                Store(
                    id=event_id,
                    namespace=namespace,
                    key=key,
                    value={"index": index, "text": f"note {index} of {namespace}"},
                    importance=rng.randrange(11) / 10,
                    tags=[f"t{index % 7}"],
                    ttl_s=ttl_s,
                )
            )
        elif draw < 0.93:
            events.append(Get(id=event_id, namespace=namespace, key=key))
        elif draw < 0.9995:
            events.append(Forget(id=event_id, namespace=namespace, key=key))
        else:
            events.append(Forget(id=event_id, namespace=namespace))
    return events


class Expected(msgspec.Struct, frozen=True):
    """What the acknowledged events leave in one key: its last Store."""

    seq: int
    store: Store


def expected_state(
    events: dict[str, Event], acked: dict[str, int]
) -> dict[tuple[str, str], Expected | None]:
    """Apply the acknowledged Stores and Forgets in seq order; return every key stored.

    A key whose last acknowledged event is a Forget maps to None.
    """
    state: dict[tuple[str, str], Expected | None] = {}
    for event_id, seq in sorted(acked.items(), key=lambda item: item[1]):
        event = events[event_id]
        if isinstance(event, Store):
            state[(event.namespace, event.key)] = Expected(seq, event)
        elif isinstance(event, Forget) and event.key is not None:
            if (event.namespace, event.key) in state:
                state[(event.namespace, event.key)] = None
        elif isinstance(event, Forget):
            for namespace, key in state:
                if namespace == event.namespace:
                    state[(namespace, key)] = None
    return state


# ----------------------------------------------------------------- traffic


class Traffic:
    """A thread that sends the planned events, up to a limit the test raises.

    Every event ends acknowledged: an Ack for a write, a Value or NotFound
    for a Get. `acked` maps each id to the seq in its reply. A reply that
    is not final (Busy or a retryable Error after every resend) and a chunk
    whose call timed out are sent again with the same ids.
    """

    def __init__(self, endpoints: dict[str, str], events: list[Event]) -> None:
        self.endpoints = endpoints
        self.events = events
        self.acked: dict[str, int] = {}
        # Get replies flagged degraded: a shard's breaker was open.
        self.degraded_reads = 0
        self.chunk_resends = 0
        self.failure: BaseException | None = None
        self._limit = 0
        self._changed = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def allow(self, count: int) -> None:
        """Let the thread send the first `count` events."""
        with self._changed:
            self._limit = min(count, len(self.events))
            self._changed.notify_all()

    def unacknowledged(self) -> int:
        """Return how many of the events allowed so far have no acknowledgement yet."""
        with self._changed:
            return self._limit - len(self.acked)

    def acked_count(self) -> int:
        with self._changed:
            return len(self.acked)

    def acked_ids(self) -> dict[str, int]:
        """Return a copy of `acked`."""
        with self._changed:
            return dict(self.acked)

    def check(self) -> None:
        if self.failure is not None:
            raise AssertionError("the traffic thread failed") from self.failure

    def wait_acked(self, count: int, timeout: float, what: str) -> None:
        """Wait until `count` events are acknowledged; fail at the deadline."""
        wait_for(lambda: self._progress(count), timeout=timeout, what=what)

    def _progress(self, count: int) -> bool:
        self.check()
        return self.acked_count() >= count

    def stop(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            with Client(self.endpoints, timeout=3.0, attempts=40) as client:
                sent = 0
                while True:
                    with self._changed:
                        while not self._stop and sent >= self._limit:
                            self._changed.wait()
                        if self._stop:
                            return
                        end = min(self._limit, sent + CHUNK)
                    self._send(client, self.events[sent:end])
                    sent = end
        except BaseException as error:  # noqa: BLE001 - check() raises it in the test
            self.failure = error

    def _send(self, client: Client, chunk: list[Event]) -> None:
        pending = chunk
        while pending and not self._stop:
            try:
                replies = client.pipeline(pending, window=WINDOW)
            except RequestTimeout:
                self.chunk_resends += 1
                continue
            again = []
            for event, reply in zip(pending, replies, strict=True):
                seq = _acknowledged_seq(event, reply)
                if seq is None:
                    if not _retryable(reply):
                        raise AssertionError(f"event {event.id} got {reply!r}")
                    again.append(event)
                    continue
                with self._changed:
                    self.acked[event.id or ""] = seq
                    self.degraded_reads += bool(getattr(reply, "degraded", False))
            pending = again


def _acknowledged_seq(event: Event, reply: Message) -> int | None:
    if isinstance(event, Get):
        return reply.seq if isinstance(reply, (Value, NotFound)) else None
    return reply.seq if isinstance(reply, Ack) else None


def _retryable(reply: Message) -> bool:
    return isinstance(reply, Busy) or (
        isinstance(reply, Error)
        and reply.code in (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL)
    )


# ----------------------------------------------------------------- helpers


def wait_for(
    condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns a true value; return that value.

    Raises AssertionError at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run_cli(data_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem.cli", *args, "--data-dir", data_dir],
        check=False,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=dict(os.environ, TIERMEM_LOG_LEVEL="WARNING"),
    )


def cli_json(data_dir: str, *args: str) -> dict[str, Any]:
    """Run a `tiermem` command with `--json`; return its summary.

    Fails the test when the command exits with a status other than 0.
    """
    result = run_cli(data_dir, *args, "--json")
    assert result.returncode == 0, (
        f"tiermem {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("tiermem_worker_replay_")
    }


def replay_gauges(url: str, operation: str, shard: int) -> dict[str, float | None]:
    samples = scrape(url)
    labels = frozenset({"operation": operation, "shard": str(shard)}.items())
    return {
        name: samples.get((f"tiermem_worker_replay_{name}", labels))
        for name in ("events_read", "until_seq", "running")
    }


def replay_in_progress(
    url: str, operation: str, shard: int, task: Any
) -> dict[str, float | None] | None:
    """Return the replay gauges once a run has started and read some events.

    Raises AssertionError when the Celery `task` finished first.
    """
    if task.ready():
        raise AssertionError(
            f"replay task {task.id} finished before a scrape saw it running"
        )
    gauges = replay_gauges(url, operation, shard)
    return (
        gauges if gauges["running"] == 1 and (gauges["events_read"] or 0) > 0 else None
    )


def shards_applying(client: Client) -> bool:
    """Return whether a Get on each shard is served without `degraded` set.

    A shard whose breaker is open flags its replies `degraded`.
    """
    replies = [
        client.get("probe", namespace=namespace) for namespace in PROBE_NAMESPACES
    ]
    return not any(reply.degraded for reply in replies)


def shard_pids(client: Client) -> dict[int, int]:
    return {item.shard: item.pid for item in client.status().shards}


def moved_pids(client: Client, shard: int, old_pid: int) -> dict[int, int] | None:
    """Return the shards' pids once `shard` runs in a process other than `old_pid`."""
    pids = shard_pids(client)
    return pids if pids[shard] != old_pid else None


def read_log(
    event_log: RedisEventLog, after_seq: int = 0
) -> dict[int, tuple[str | None, int]]:
    """Return the id and ingest timestamp of every event after `after_seq`, by seq."""
    return {
        event.seq or 0: (event.id, event.ts or 0)
        for batch in event_log.iter_from(after_seq)
        for event in batch
    }


def read_problem(
    reply: Value | NotFound, expected: Expected | None, stamps: dict[int, int]
) -> str | None:
    """Return what is wrong with the reply to a Get of a key, None when it is right.

    `expected` is the key's last acknowledged Store (None after a Forget),
    and `stamps` the ingest time of each seq, which decides expiry.
    """
    if reply.degraded:
        return "degraded"
    if expected is not None and expected.store.ttl_s is not None:
        expires = stamps[expected.seq] + expected.store.ttl_s * 1000
        if stamps[reply.seq] >= expires:
            expected = None
    if expected is None:
        return None if isinstance(reply, NotFound) else "expected NotFound"
    store = expected.store
    if not isinstance(reply, Value):
        return f"expected the Store at seq {expected.seq}"
    if (reply.value, reply.importance, reply.tags) != (
        store.value,
        store.importance,
        store.tags,
    ):
        return f"expected the Store at seq {expected.seq}"
    return None


class Checks:
    """The checks after each phase, of the stack against what the client recorded."""

    def __init__(self, stack: Stack, traffic: Traffic, events: list[Event]) -> None:
        self.stack = stack
        self.traffic = traffic
        self.by_id = {event.id or "": event for event in events}
        self.data_dir = stack.config.data_dir
        self.event_log = RedisEventLog(
            redis.Redis.from_url(stack.config.log_url or ""),
            stream=stack.config.log_stream,
        )
        self.timings: list[tuple[str, float]] = []
        # The log as read so far: (id, ts) by seq. The log's Redis is never
        # killed here, so each check reads only what was appended since.
        self.logged: dict[int, tuple[str | None, int]] = {}

    def timed(self, name: str, started: float) -> None:
        self.timings.append((name, round(time.monotonic() - started, 1)))

    def verify(self, step: str) -> dict[str, Any]:
        """Take snapshots, then verify, which replays only the log after them."""
        started = time.monotonic()
        cli_json(self.data_dir, "snapshot")
        summary = cli_json(self.data_dir, "replay", "--verify")
        self.timed(f"{step}: snapshot and verify", started)
        return summary

    def read_new_log(self, *, from_start: bool = False) -> None:
        if from_start:
            self.logged = {}
        self.logged.update(read_log(self.event_log, max(self.logged, default=0)))

    def log_contains_acked(self, step: str, *, from_start: bool = False) -> None:
        started = time.monotonic()
        acked = self.traffic.acked_ids()
        self.read_new_log(from_start=from_start)
        logged = {seq: event_id for seq, (event_id, _) in self.logged.items()}
        misplaced = {
            event_id: seq
            for event_id, seq in acked.items()
            if logged.get(seq) != event_id
        }
        counts = Counter(
            event_id for event_id in logged.values() if event_id in self.by_id
        )
        repeated = sorted(event_id for event_id, count in counts.items() if count > 1)
        self.timed(f"{step}: log check", started)
        assert misplaced == {}, (
            f"after {step}: acknowledged ids not at their seq in the log "
            f"(first 5): {sorted(misplaced.items())[:5]}"
        )
        assert repeated == [], (
            f"after {step}: ids logged more than once (first 5): {repeated[:5]}"
        )
        assert set(counts) == set(acked), (
            f"after {step}: {len(set(counts) - set(acked))} logged ids "
            "were never acknowledged"
        )

    def reads_match(self, step: str, client: Client) -> None:
        """Get every key stored so far and compare with the acknowledged events."""
        started = time.monotonic()
        state = expected_state(self.by_id, self.traffic.acked_ids())
        keys = sorted(state)
        replies = client.pipeline(
            [Get(namespace=namespace, key=key) for namespace, key in keys],
            window=WINDOW,
        )
        errors = [
            reply for reply in replies if not isinstance(reply, (Value, NotFound))
        ]
        assert errors == [], (
            f"after {step}: {len(errors)} Gets got no Value or NotFound "
            f"(first 5): {errors[:5]}"
        )
        self.read_new_log()
        stamps = {seq: ts for seq, (_, ts) in self.logged.items()}
        wrong = []
        for (namespace, key), reply in zip(keys, replies, strict=True):
            problem = read_problem(reply, state[(namespace, key)], stamps)
            if problem is not None:
                wrong.append((namespace, key, problem, reply))
        self.timed(f"{step}: reads of {len(keys)} keys", started)
        assert wrong == [], (
            f"after {step}: {len(wrong)} keys read wrong (first 5): {wrong[:5]}"
        )

    def after_restart(
        self, step: str, client: Client, *, from_start: bool = False
    ) -> None:
        """Run every check, with the verify in its own thread beside the others.

        The reads are logged Gets, which the verify's digest may or may not
        include: either way live and rebuild agree at the digest's seq.
        """
        self.traffic.check()
        outcome: dict[str, Any] = {}

        def verify() -> None:
            try:
                outcome["summary"] = self.verify(step)
            except BaseException as error:  # noqa: BLE001 - raised again below
                outcome["error"] = error

        thread = threading.Thread(target=verify, name="verify")
        thread.start()
        try:
            self.log_contains_acked(step, from_start=from_start)
            self.reads_match(step, client)
        finally:
            thread.join(timeout=2 * CLI_TIMEOUT_S + 10)
        if "error" in outcome:
            raise outcome["error"]
        summary = outcome["summary"]
        assert summary["verified"] is True, f"after {step}: {summary}"
        every_shard = [True] * self.stack.config.shards
        assert [item["verified"] for item in summary["shards"]] == every_shard


# ----------------------------------------------------------------- the test


@pytest.fixture
def stack(ray_cluster, tmp_path: Path) -> Iterator[Stack]:
    config = StackConfig(
        data_dir=str(tmp_path / "data"),
        shards=2,
        ray_address=ray_cluster,
        policy=POLICY,
        broker_visibility_timeout_s=VISIBILITY_TIMEOUT_S,
    )
    config.router = msgspec.structs.replace(
        config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0}
    )
    running = Stack(config)
    running.start()
    yield running
    running.stop()


def test_kill_each_process_in_turn(stack: Stack):
    events = plan_events()
    per_phase = TOTAL_EVENTS // PHASES
    traffic = Traffic(stack.endpoints, events)
    checks = Checks(stack, traffic, events)
    traffic.start()
    started = time.monotonic()
    try:
        with Client(stack.endpoints, timeout=5.0, attempts=30) as client:
            # 1. The router: kill -9 in the middle of the first phase.
            traffic.allow(per_phase)
            traffic.wait_acked(
                per_phase // 2,
                timeout=RESTART_TIMEOUT_S,
                what="half of phase 1 acknowledged",
            )
            step = time.monotonic()
            unacknowledged = traffic.unacknowledged()
            stack.kill_router()
            stack.start_router(timeout=RESTART_TIMEOUT_S)
            traffic.wait_acked(
                per_phase,
                timeout=RESTART_TIMEOUT_S,
                what="phase 1 acknowledged after the router restart",
            )
            checks.timed("router: restart and rest of phase", step)
            assert unacknowledged > 0
            checks.after_restart("router kill", client)

            # 2. One shard actor: Ray restarts it, and the router resends the
            # calls it lost.
            traffic.allow(2 * per_phase)
            traffic.wait_acked(
                per_phase + per_phase // 2,
                timeout=RESTART_TIMEOUT_S,
                what="half of phase 2 acknowledged",
            )
            step = time.monotonic()
            before = shard_pids(client)
            unacknowledged = traffic.unacknowledged()
            os.kill(before[1], signal.SIGKILL)
            after = wait_for(
                lambda: moved_pids(client, 1, before[1]),
                timeout=RESTART_TIMEOUT_S,
                what="shard 1's actor to run in a new process",
            )
            traffic.wait_acked(
                2 * per_phase,
                timeout=RESTART_TIMEOUT_S,
                what="phase 2 acknowledged after the actor restart",
            )
            checks.timed("shard actor: restart and rest of phase", step)
            assert after[0] == before[0]
            assert unacknowledged > 0
            checks.after_restart("shard actor kill", client)

            # 3. The STM Redis, on the same port and data directory. The shards'
            # applies fail while it is down, so their breakers open. Each shard
            # recovers from its tiers and the log once STM accepts connections.
            traffic.allow(3 * per_phase)
            traffic.wait_acked(
                2 * per_phase + per_phase // 2,
                timeout=RESTART_TIMEOUT_S,
                what="half of phase 3 acknowledged",
            )
            step = time.monotonic()
            stm = stack.redis["stm"]
            unacknowledged = traffic.unacknowledged()
            stm.kill()
            stm.start()
            traffic.wait_acked(
                3 * per_phase,
                timeout=RESTART_TIMEOUT_S,
                what="phase 3 acknowledged after the STM restart",
            )
            wait_for(
                lambda: shards_applying(client),
                timeout=RESTART_TIMEOUT_S,
                what="both shards to serve Gets without degraded set",
            )
            checks.timed("STM: restart, rest of phase and breakers closed", step)
            assert unacknowledged > 0
            checks.after_restart("STM Redis kill", client)

            # 4. The Celery worker, while it runs a verify from empty. Without
            # `expected` the task requests its digest itself, so the run that
            # the broker delivers again after the restart verifies where the
            # log is then. The phase starts once the first run has begun,
            # because 20,000 events take less time than the run.
            step = time.monotonic()
            seq_before_verify = checks.event_log.last_seq()
            verify = stack.control_app().send_task(
                "tiermem.replay.verify_shard",
                kwargs={"shard": 0, "from_empty": True},
                queue="replay",
            )
            url = stack.worker_metrics_url or ""
            wait_for(
                lambda: replay_in_progress(url, "verify", 0, verify),
                timeout=RESTART_TIMEOUT_S,
                what="the worker to report a verify in progress",
                interval=0.02,
            )
            traffic.allow(4 * per_phase)
            traffic.wait_acked(
                3 * per_phase + 1_000,
                timeout=RESTART_TIMEOUT_S,
                what="phase 4 under way",
            )
            midway = replay_in_progress(url, "verify", 0, verify)
            unacknowledged = traffic.unacknowledged()
            stack.kill_worker()
            # The phase ends before the worker starts again, because a Forget
            # logged after the second run's digest would make the values it
            # removes unreadable to that run's rebuild.
            traffic.wait_acked(
                4 * per_phase,
                timeout=RESTART_TIMEOUT_S,
                what="phase 4 acknowledged with the worker down",
            )
            stack.start_worker(timeout=RESTART_TIMEOUT_S)
            checks.timed("worker: rest of phase and restart", step)
            assert midway is not None, (
                "the verify was not running when the worker was killed"
            )
            assert (midway["until_seq"] or 0) >= seq_before_verify
            assert 0 < (midway["events_read"] or 0) < (midway["until_seq"] or 0)
            assert unacknowledged > 0
            checks.after_restart("Celery worker kill", client)
            step = time.monotonic()
            redelivered = verify.get(timeout=RESTART_TIMEOUT_S)
            checks.timed("worker: the killed task's second run", step)
            checks.timings.append(
                ("worker: that run's own seconds", redelivered["seconds"])
            )
            assert redelivered["verified"] is True, redelivered
            assert redelivered["base_seq"] == 0
            assert redelivered["seq"] >= seq_before_verify

            # 5. The last phase, with a rebuild of every shard's live tiers
            # (`tiermem replay --apply`) while events flow, then every check
            # again, with the whole log read from its start.
            traffic.allow(TOTAL_EVENTS)
            traffic.wait_acked(
                4 * per_phase + per_phase // 2,
                timeout=RESTART_TIMEOUT_S,
                what="half of phase 5 acknowledged",
            )
            step = time.monotonic()
            unacknowledged = traffic.unacknowledged()
            rebuilt = cli_json(stack.config.data_dir, "replay", "--apply")
            traffic.wait_acked(
                TOTAL_EVENTS, timeout=RESTART_TIMEOUT_S, what="every event acknowledged"
            )
            checks.timed("rebuild and rest of phase", step)
            assert [item["shard"] for item in rebuilt["shards"]] == [0, 1]
            assert unacknowledged > 0
            checks.after_restart("the end", client, from_start=True)
    finally:
        traffic.stop()
        sys.stderr.write(
            f"kill-in-turn timings (s): {checks.timings}, "
            f"total {time.monotonic() - started:.1f}, "
            f"chunk resends {traffic.chunk_resends}, "
            f"degraded reads {traffic.degraded_reads}\n"
        )

    traffic.check()
    assert len(traffic.acked) == TOTAL_EVENTS
