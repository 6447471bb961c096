"""The same events rebuilt with the `eventsourcing` library, as the replay baseline.

Each namespace is one aggregate whose state is a dict of key to value and
a dict of reads per key: the projection that tiermem's shards keep, minus
tiers, capacities and the cache. The events go into the library's SQLite
recorder, a file on disk. A rebuild is what the library does to load
aggregates: `repository.get` of every namespace's aggregate, which selects
its stored events, decodes them and applies them in order.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from events.types import Event, Get, Store

__all__ = ["fill", "rebuild_all"]

# Events saved per `Application.save` call while filling the recorder.
_SAVE_EVERY = 10_000
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:tiermem:bench")


class AgentMemory(Aggregate):
    """The memories of one namespace."""

    @event("Opened")
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.values: dict[str, Any] = {}
        self.reads: dict[str, int] = {}

    @staticmethod
    def create_id(namespace: str) -> uuid.UUID:
        return uuid.uuid5(_ID_NAMESPACE, namespace)

    @event("Stored")
    def store(self, key: str, value: Any, importance: float, tags: list[str]) -> None:
        self.values[key] = value

    @event("Read")
    def read(self, key: str) -> None:
        if key in self.values:
            self.reads[key] = self.reads.get(key, 0) + 1


class MemoryApplication(Application):
    """An application with default settings: no snapshots, no aggregate cache."""


def _environment(database: Path) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(database),
    }


def fill(database: Path, batches: Iterable[list[Event]]) -> dict[str, Any]:
    """Record every Store and Get of the log as aggregate events; return counts."""
    application = MemoryApplication(env=_environment(database))
    aggregates: dict[str, AgentMemory] = {}
    touched: dict[str, AgentMemory] = {}
    pending = 0
    recorded = 0
    started = time.monotonic()
    for batch in batches:
        for item in batch:
            if not isinstance(item, (Store, Get)):
                continue
            aggregate = aggregates.get(item.namespace)
            if aggregate is None:
                aggregate = aggregates[item.namespace] = AgentMemory(item.namespace)
            if isinstance(item, Store):
                aggregate.store(item.key, item.value, item.importance, list(item.tags))
            else:
                aggregate.read(item.key)
            touched[item.namespace] = aggregate
            pending += 1
            recorded += 1
            if pending >= _SAVE_EVERY:
                application.save(*touched.values())
                touched, pending = {}, 0
    if touched:
        application.save(*touched.values())
    application.close()
    return {
        "events": recorded,
        "namespaces": sorted(aggregates),
        "keys": sum(len(aggregate.values) for aggregate in aggregates.values()),
        "seconds": time.monotonic() - started,
    }


def rebuild_all(database: Path, namespaces: Iterable[str]) -> dict[str, Any]:
    """Load every namespace's aggregate from the recorder; return the projection's size."""
    application = MemoryApplication(env=_environment(database))
    try:
        started = time.monotonic()
        keys = 0
        reads = 0
        for namespace in namespaces:
            aggregate = application.repository.get(AgentMemory.create_id(namespace))
            keys += len(aggregate.values)
            reads += sum(aggregate.reads.values())
        seconds = time.monotonic() - started
    finally:
        application.close()
    return {"keys": keys, "reads": reads, "seconds": seconds}
