"""Dispatchers: how the router hands each shard its batches and gets replies back.

The router thread calls `submit` and `call` and never blocks on a shard.
Completions arrive on another thread, go into a thread-safe queue, and wake
the router through a pipe that its ZeroMQ poller watches. `RayDispatcher`
sends batches to Ray actors; `LocalDispatcher` applies them in this process
(one thread per shard) for tests and single-process use.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import structlog

from events.types import Event, Message
from handlers.actor import ShardSettings, ShardStatusInfo, decode_replies
from handlers.shard import Shard

__all__ = ["Completion", "Dispatcher", "LocalDispatcher", "RayDispatcher", "Waker", "placement_resources"]

log = structlog.get_logger("tiermem.dispatch")

_events_encoder = msgspec.msgpack.Encoder()


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A finished batch (`replies`) or call (`result`), or a failure (`error`)."""

    shard: int
    token: int
    replies: list[Message] = []
    result: Any = None
    error: str | None = None


class Waker:
    """A pipe that any thread may write to and a ZeroMQ poller may watch."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\x00")
        except BlockingIOError:
            pass  # The pipe is full, so the router is already due to wake.

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Dispatcher(Protocol):
    """The interface the router uses to reach the shards, wherever they run."""

    shards: int

    def submit(
        self,
        shard: int,
        token: int,
        events: Sequence[Event],
        encoded: Sequence[bytes] | None = None,
        *,
        prev_seq: int | None = None,
    ) -> None:
        """Send a shard its events in seq order; `encoded` are their log encodings.

        `prev_seq` is the last seq sent to this shard before these events,
        or None when unknown (the first batch after the router started).
        """
        ...

    def call(self, shard: int, token: int, method: str) -> None: ...

    def completions(self) -> list[Completion]: ...

    def inflight(self) -> int: ...

    def close(self) -> None: ...


class _Base:
    def __init__(self, shards: int, waker: Waker) -> None:
        self.shards = shards
        self.waker = waker
        self._done: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._inflight = 0
        self._lock = threading.Lock()

    def _finish(self, completion: Completion) -> None:
        with self._lock:
            self._inflight -= 1
        self._done.put(completion)
        self.waker.wake()

    def _started(self) -> None:
        with self._lock:
            self._inflight += 1

    def completions(self) -> list[Completion]:
        drained = []
        while True:
            try:
                drained.append(self._done.get_nowait())
            except queue.Empty:
                return drained

    def inflight(self) -> int:
        with self._lock:
            return self._inflight


def placement_resources(names: Sequence[str] | None, shards: int) -> list[str | None]:
    """Return the Ray custom resource that each shard's actor requires.

    `names` is None (every entry is None: any node), one name for every
    shard, or one name per shard. Raises ValueError for any other length or
    an empty name.
    """
    if names is None:
        return [None] * shards
    if len(names) not in (1, shards):
        raise ValueError(
            f"shard_resources has {len(names)} names for {shards} shards: "
            "give one name for every shard, or one name per shard"
        )
    for position, name in enumerate(names):
        if not name:
            raise ValueError(f"shard_resources has an empty name at position {position}: use a Ray resource name")
    return list(names) * shards if len(names) == 1 else list(names)


def _warn_unoffered(resources: Sequence[str | None]) -> None:
    """Log each placement resource that no live node of the Ray cluster offers."""
    names = sorted({resource for resource in resources if resource is not None})
    if not names:
        return
    import ray

    offered = ray.cluster_resources()
    for name in names:
        if name not in offered:
            log.warning(
                "dispatch.resource.unoffered",
                resource=name,
                shards=[shard for shard, resource in enumerate(resources) if resource == name],
                next="these shard actors wait until a node that offers the resource joins the cluster",
            )


class RayDispatcher(_Base):
    """Batches to `ShardHost` Ray actors, one call per shard per batch.

    Ray runs the calls one caller makes to one actor in submission order, so
    a shard sees its events in sequence order. A call that fails because the
    actor died is sent again to the restarted actor; what that actor already
    replayed from the log is skipped by its watermark.

    `shard_resources` (see `placement_resources`) makes each actor require a
    Ray custom resource and spreads the actors over the nodes that offer it.
    Ray applies the same requirement when it restarts an actor, so a shard
    whose node is lost moves to another node only if that node offers the
    shard's resource too. Without it, Ray places the actors by its default
    strategy.
    """

    def __init__(
        self,
        settings: Sequence[ShardSettings],
        waker: Waker,
        *,
        num_cpus: float = 0.0,
        shard_resources: Sequence[str] | None = None,
    ) -> None:
        from handlers.actor import spawn_shard_actor

        super().__init__(len(settings), waker)
        resources = placement_resources(shard_resources, len(settings))
        _warn_unoffered(resources)
        self.actors = [
            spawn_shard_actor(item, num_cpus=num_cpus, node_resource=resource, spread=resource is not None)
            for item, resource in zip(settings, resources, strict=True)
        ]
        self.max_attempts = 20

    def wait_ready(self, timeout: float) -> list[ShardStatusInfo]:
        """Block until every actor has recovered; return their status."""
        import ray

        payloads = ray.get([actor.status.remote() for actor in self.actors], timeout=timeout)
        return [msgspec.msgpack.decode(item, type=ShardStatusInfo) for item in payloads]

    def submit(
        self,
        shard: int,
        token: int,
        events: Sequence[Event],
        encoded: Sequence[bytes] | None = None,
        *,
        prev_seq: int | None = None,
    ) -> None:
        self._started()
        if encoded is not None:
            # The log's encoding of each event, reused: no second encode.
            body = [msgspec.Raw(item) for item in encoded]
        else:
            body = list(events)
        payload = _events_encoder.encode([prev_seq, body])
        self._send(shard, token, payload, "apply", 1)

    def call(self, shard: int, token: int, method: str) -> None:
        self._started()
        self._send(shard, token, b"", method, 1)

    def _send(self, shard: int, token: int, payload: bytes, method: str, attempt: int) -> None:
        actor = self.actors[shard]
        ref = actor.apply.remote(payload) if method == "apply" else getattr(actor, method).remote()
        future = ref.future()
        future.add_done_callback(
            lambda done: self._on_done(done, shard, token, payload, method, attempt)
        )

    def _on_done(self, future, shard: int, token: int, payload: bytes, method: str, attempt: int) -> None:
        import ray.exceptions

        try:
            result = future.result()
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            if attempt >= self.max_attempts:
                log.error("dispatch.gave_up", shard=shard, method=method, attempts=attempt, error=str(error))
                self._finish(Completion(shard=shard, token=token, error=str(error)))
                return
            log.warning("dispatch.retrying", shard=shard, method=method, attempt=attempt, error=type(error).__name__, next="resending to the restarted actor")
            self._send(shard, token, payload, method, attempt + 1)
            return
        except Exception as error:  # noqa: BLE001 - reported to the router, which logs it
            log.error("dispatch.failed", shard=shard, method=method, error=repr(error))
            self._finish(Completion(shard=shard, token=token, error=repr(error)))
            return
        if method == "apply":
            self._finish(Completion(shard=shard, token=token, replies=decode_replies(result)))
        else:
            self._finish(Completion(shard=shard, token=token, result=result))

    def actor_pids(self) -> list[int]:
        import ray

        payloads = ray.get([actor.status.remote() for actor in self.actors], timeout=60)
        return [msgspec.msgpack.decode(item, type=ShardStatusInfo).pid for item in payloads]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


class LocalDispatcher(_Base):
    """Applies batches in this process, one worker thread per shard."""

    def __init__(self, shards: Sequence[Shard], waker: Waker) -> None:
        super().__init__(len(shards), waker)
        self.hosts = list(shards)
        self._queues: list[queue.Queue[tuple[int, str, Sequence[Event]] | None]] = []
        self._threads: list[threading.Thread] = []
        for index in range(len(shards)):
            work: queue.Queue[tuple[int, str, Sequence[Event]] | None] = queue.Queue()
            thread = threading.Thread(target=self._work, args=(index, work), name=f"shard-{index}", daemon=True)
            self._queues.append(work)
            self._threads.append(thread)
            thread.start()

    def submit(
        self,
        shard: int,
        token: int,
        events: Sequence[Event],
        encoded: Sequence[bytes] | None = None,
        *,
        prev_seq: int | None = None,
    ) -> None:
        self._started()
        self._queues[shard].put((token, "apply", (prev_seq, list(events))))

    def call(self, shard: int, token: int, method: str) -> None:
        self._started()
        self._queues[shard].put((token, method, ()))

    def _work(self, index: int, work: queue.Queue) -> None:
        host = self.hosts[index]
        while True:
            item = work.get()
            if item is None:
                return
            token, method, events = item
            try:
                if method == "apply":
                    prev_seq, batch = events
                    completion = Completion(shard=index, token=token, replies=host.apply(batch, prev_seq=prev_seq))
                elif method == "digests":
                    result = msgspec.msgpack.encode([host.watermark, host.digests()])
                    completion = Completion(shard=index, token=token, result=result)
                elif method == "rebuild":
                    completion = Completion(shard=index, token=token, result=msgspec.msgpack.encode(host.rebuild()))
                elif method == "status":
                    info = ShardStatusInfo(shard=index, watermark=host.watermark, pid=os.getpid(), node="local", keys=host.state.entry_count(), pools=host.pool_stats())
                    completion = Completion(shard=index, token=token, result=msgspec.msgpack.encode(info))
                else:
                    raise ValueError(f"unknown shard method {method!r}")
            except Exception as error:  # noqa: BLE001 - reported to the router, which logs it
                log.error("dispatch.failed", shard=index, method=method, error=repr(error))
                completion = Completion(shard=index, token=token, error=repr(error))
            self._finish(completion)

    def close(self) -> None:
        for work in self._queues:
            work.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        for host in self.hosts:
            host.close()
