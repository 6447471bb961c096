"""Targets reached over ZeroMQ: a stack the check owns, or a shared deployment.

`RemoteTarget` sends each client's requests with its own `bus.client.Client`
on its lane, all clients at once from a thread pool, and reads what the
router logged from the log's Redis when it has the URL. On an exclusive
stack every logged event must come from the check; on a shared deployment
the check keeps to namespaces under its own prefix, ignores other events
except a `Maintain` that reaches its namespaces, and forgets every key it
wrote when an example ends. `StackFaults` kills and restarts the processes
of a `tiermem.stack.Stack` that the check started itself.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from bus.client import Client
from events.log import EventLog, LoggedId
from events.types import Event, Forget, LogEvents, Message, ReadLog, Search, TierDigest
from handlers.policy import Policy
from replay.rebuild import rebuild
from tiermem.check.targets import LiveShard, Outgoing, Schedule, StepResult
from tiermem.servers import wait_until

__all__ = ["STACK_POLICY", "BusEventLog", "RemoteTarget", "StackFaults"]

log = structlog.get_logger("tiermem.check")

# Like the in-process policy, but the router stamps wall-clock time, so the
# idle times and the half-life are short enough that a run of a few seconds
# crosses them.
STACK_POLICY = Policy(
    cache_capacity=3,
    stm_capacity=2,
    stm_idle_ms=50,
    im_capacity=2,
    im_idle_ms=300,
    ltm_capacity=3,
    half_life_ms=100,
    access_weight=100,
)


# Client indices from this one on send each request once.
_ONCE = 100


def _now_ms() -> int:
    return int(time.time() * 1000)


class BusEventLog:
    """A read-only `EventLog` over the router's `ReadLog` and `Status` requests.

    It gives a target the log without the log Redis's URL, so the check of
    a deployment has every event's `seq` and `ts`.
    """

    def __init__(self, client: Client, page: int = 1000) -> None:
        self.client = client
        self.page = page

    def last_seq(self) -> int:
        return self.client.status().last_seq

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        raise TypeError("BusEventLog is read-only: the router looks ids up itself")

    def append(
        self, events: Sequence[Event], body_hashes: Sequence[int]
    ) -> list[bytes]:
        raise TypeError("BusEventLog is read-only: only the router appends")

    def read(self, after_seq: int, limit: int) -> list[Event]:
        reply = self.client.request(
            ReadLog(from_seq=after_seq + 1, limit=max(1, min(limit, 5000))), lane="high"
        )
        if not isinstance(reply, LogEvents):
            raise TypeError(f"ReadLog got {type(reply).__name__}, expected LogEvents")
        return list(reply.events)[:limit]

    def iter_from(
        self, after_seq: int, until_seq: int | None = None
    ) -> Iterator[list[Event]]:
        position = after_seq
        while until_seq is None or position < until_seq:
            limit = (
                self.page if until_seq is None else min(self.page, until_seq - position)
            )
            batch = self.read(position, limit)
            if not batch:
                return
            position = batch[-1].seq or position
            yield batch


class StackFaults:
    """Kill -9 and restart the parts of a stack this process started.

    `stack` is a running `tiermem.stack.Stack`. The Celery worker fault is
    offered only when the stack has `kill_worker`.
    """

    def __init__(self, stack, recovery_timeout: float = 120.0) -> None:
        self.stack = stack
        self.recovery_timeout = recovery_timeout

    def names(self) -> tuple[str, ...]:
        names = ["kill_router", "kill_shard"]
        names += [
            f"kill_redis_{role}"
            for role in ("stm", "im", "log")
            if role in self.stack.redis
        ]
        if hasattr(self.stack, "kill_worker"):
            names.append("kill_worker")
        return tuple(names)

    def inject(self, name: str, which: int, client: Client) -> str:
        if name == "kill_router":
            pid = self.stack.router_pid
            self.stack.kill_router()
            self.stack.start_router(self.recovery_timeout)
            return f"router pid {pid} killed with SIGKILL and restarted as pid {self.stack.router_pid}"
        if name == "kill_shard":
            shards = client.status().shards
            victim = shards[which % len(shards)]
            os.kill(victim.pid, signal.SIGKILL)
            wait_until(
                lambda: self._restarted(client, victim.shard, victim.pid),
                timeout=self.recovery_timeout,
                interval=0.05,
                what=f"shard {victim.shard} to restart after SIGKILL of pid {victim.pid}",
            )
            return f"shard {victim.shard} actor pid {victim.pid} killed with SIGKILL"
        if name.startswith("kill_redis_"):
            role = name.removeprefix("kill_redis_")
            server = self.stack.redis[role]
            pid = server.pid
            server.kill()
            server.start()
            return f"redis {role} pid {pid} killed with SIGKILL and restarted as pid {server.pid}"
        if name == "kill_worker":
            self.stack.kill_worker()
            if hasattr(self.stack, "start_worker"):
                self.stack.start_worker()
            return "Celery worker killed with SIGKILL"
        raise ValueError(f"fault {name!r} is not one of {self.names()}")

    @staticmethod
    def _restarted(client: Client, shard: int, old_pid: int) -> bool:
        return client.status().shards[shard].pid != old_pid


class RemoteTarget:
    """A router reached at `endpoints`; its log is read from `event_log` or over the bus.

    `exclusive` means no other client uses the router: then every logged
    event must be one the check sent, the digests must equal a rebuild from
    the log, and `Maintain` may cover every namespace. `namespace` is the
    prefix of every namespace and id the check uses. `shards` and `policy`
    must be the router's. `search` says a worker builds the search
    projection, so a `Search` must find what the model finds. `curve` is
    the client's CURVE keys, as `Client` takes them, for a router that
    requires CURVE.
    """

    controls_clock = False
    client_resends = True

    def __init__(
        self,
        endpoints: dict[str, str],
        *,
        shards: int,
        policy: Policy,
        event_log: EventLog | None = None,
        exclusive: bool = True,
        faults: StackFaults | None = None,
        timeout: float = 30.0,
        name: str = "stack",
        search: bool = False,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.supports_search = search
        self.shards = shards
        self.policy = policy
        self.log: EventLog = (
            event_log
            if event_log is not None
            else BusEventLog(Client(endpoints, timeout=timeout, curve=curve))
        )
        self.exclusive = exclusive
        self.fault_hooks = faults
        self.timeout = timeout
        self.name = name
        self.curve = curve
        self._pool = ThreadPoolExecutor(
            max_workers=3, thread_name_prefix="check-client"
        )
        self._clients: dict[int, Client] = {}
        self._first = 0
        self._position = 0
        self._last_ts = 0

    def _client(self, index: int) -> Client:
        if index not in self._clients:
            attempts = 1 if index >= _ONCE else 5
            self._clients[index] = Client(
                self.endpoints,
                timeout=self.timeout,
                attempts=attempts,
                curve=self.curve,
            )
        return self._clients[index]

    def _reset_clients(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}

    # ------------------------------------------------------------- lifecycle

    def begin(self) -> int:
        last = self.log.last_seq()
        self._first = self._position = last
        if last:
            self._last_ts = self.log.read(last - 1, 1)[0].ts or 0
        return last

    def end(self, written: set[tuple[str, str]]) -> None:
        """Forget every key the example wrote, so the next one starts from empty tiers."""
        forgets = [
            Forget(namespace=namespace, key=key) for namespace, key in sorted(written)
        ]
        if forgets:
            self._client(1).pipeline(forgets, lane="normal")

    def close(self) -> None:
        self._reset_clients()
        if isinstance(self.log, BusEventLog):
            self.log.client.close()
        self._pool.shutdown(wait=True)

    def advance_clock(self, ms: int) -> None:
        raise NotImplementedError("a remote target runs on the router's wall clock")

    # ------------------------------------------------------------- steps

    def send(self, step: Sequence[Outgoing], schedule: Schedule | None) -> StepResult:
        low = self._last_ts
        by_client: dict[int, list[int]] = {}
        for index, out in enumerate(step):
            by_client.setdefault(out.client, []).append(index)
        futures = {
            client: self._pool.submit(
                self._send_client,
                client,
                [step[index].request for index in indices],
                step[indices[0]].lane,
            )
            for client, indices in by_client.items()
        }
        replies: list[Message | None] = [None] * len(step)
        for client, future in futures.items():
            for index, reply in zip(by_client[client], future.result(), strict=True):
                replies[index] = reply
        high = _now_ms()
        logged, foreign = self._read_log({out.request.id or "" for out in step})
        return StepResult(
            replies=[reply for reply in replies if reply is not None],
            logged=logged,
            foreign=foreign,
            ts_window=(low, high),
        )

    def _send_client(
        self, index: int, requests: list[Event], lane: str
    ) -> list[Message]:
        """Send one client's requests in order and return their replies.

        A router without a search projection answers `Search` with
        `unavailable`, which `Client` retries with pauses; a `Search` goes
        alone through a client that sends once, after the requests before it.
        """
        replies: list[Message] = []
        run: list[Event] = []
        for request in [*requests, None]:
            if request is not None and not isinstance(request, Search):
                run.append(request)
                continue
            if run:
                replies += self._client(index).pipeline(run, lane=lane)
                run = []
            if request is not None:
                replies += self._client(index + _ONCE).pipeline([request], lane=lane)
        return replies

    def _read_log(self, ours: set[str]) -> tuple[dict[str, Event], list[Event]]:
        entries = [
            event for batch in self.log.iter_from(self._position) for event in batch
        ]
        if entries:
            self._position = entries[-1].seq or self._position
            self._last_ts = max(self._last_ts, entries[-1].ts or 0)
        logged = {event.id or "": event for event in entries if event.id in ours}
        foreign = [event for event in entries if event.id not in ours]
        return logged, foreign

    # ------------------------------------------------------------- inspection

    def digests(self) -> tuple[int, list[TierDigest]] | None:
        if not self.exclusive:
            return None
        reply = self._client(1).digest()
        return reply.seq, list(reply.tiers)

    def rebuilt_digests(self, until_seq: int) -> list[TierDigest] | None:
        if not self.exclusive:
            return None
        return rebuild(
            self.log, shards=self.shards, policy=self.policy, until_seq=until_seq
        ).digests

    def live_state(self) -> list[LiveShard] | None:
        return None

    def events(self) -> list[Event]:
        return [
            event
            for batch in self.log.iter_from(self._first, self._position)
            for event in batch
        ]

    # ------------------------------------------------------------- faults

    def faults(self) -> tuple[str, ...]:
        return self.fault_hooks.names() if self.fault_hooks is not None else ()

    def inject(self, fault: str, target: int) -> str:
        if self.fault_hooks is None:
            raise ValueError(
                "this target was not started by the check, so it takes no faults"
            )
        # Faults strike an idle stack: every acknowledged event is applied
        # first, so no batch is in flight when a process dies. Kills in the
        # middle of a batch are not generated.
        self._wait_caught_up()
        done = self.fault_hooks.inject(fault, target, self._client(0))
        self._reset_clients()
        self._wait_caught_up()
        log.info("check.fault.injected", fault=fault, done=done)
        return done

    def _wait_caught_up(self) -> None:
        """Wait until every shard has applied every event logged before the fault.

        The router answers `Digest` only after every event sequenced before
        it is applied, and the client resends it until the router is back.
        """
        self._client(0).digest()
