"""Event, request and reply types: frozen msgspec Structs in tagged unions.

Every message on the wire is a JSON object or a MessagePack map whose `type`
field names one of the classes below. Events are the messages that change or
read memory; the router sequences them and appends them to the log. Admin
requests (`Status`, `Digest`) are answered by the router and never logged.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

__all__ = [
    "ADMIN_TYPES",
    "Ack",
    "Busy",
    "Conflict",
    "Digest",
    "DigestReply",
    "Error",
    "Event",
    "EVENT_TYPES",
    "Forget",
    "Get",
    "LogEvents",
    "Maintain",
    "NotFound",
    "ReadLog",
    "Rebuild",
    "Rebuilt",
    "Reply",
    "REPLY_TYPES",
    "Request",
    "REQUEST_TYPES",
    "Results",
    "Search",
    "SearchHit",
    "ShardRebuild",
    "ShardStatus",
    "Status",
    "StatusReply",
    "Store",
    "TierDigest",
    "Value",
]

# Sequence numbers and timestamps fit in a signed 64-bit integer, so every
# client language can hold them without loss.
Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Importance = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
# A key's version counts its Stores since it last did not exist; 0 means
# "the key must not exist" in an expected_version.
Version = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Message(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="type",
):
    """Base of every message: `type` is the tag, `id` the client's request id.

    Encoding writes every field, defaults included. A log entry must record
    its `v`, because a missing `v` decodes as the current version and would
    misread old entries once their type gets a new version. Clients in other
    languages can also rely on every reply field being present.
    """

    id: str | None = None


class Event(Message, frozen=True, kw_only=True):
    """The envelope every logged event carries.

    `seq` and `ts` are assigned by the router: the global sequence number and
    the ingest time in Unix milliseconds. Values a client puts there are
    replaced. `v` is the schema version of the event's own type.
    """

    v: int = 1
    namespace: str = "default"
    seq: Seq | None = None
    ts: Millis | None = None


class Store(Event, frozen=True, kw_only=True, tag="Store"):
    """Write a memory to STM and the cache, replacing any older value of the key.

    With `expected_version` set, the write happens only if the key's
    current version equals it (0: the key must not exist); otherwise nothing
    changes and the reply is `Conflict`. A conditional write is answered
    after its shard applies it, unconditional ones once they are durable.

    Version history: v1 carried `tags` as one comma-separated string; v2 (the
    current version) carries a list of strings.
    """

    v: int = 2
    key: str
    value: Any
    importance: Importance = 0.5
    tags: list[str] = []
    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=10 * 365 * 86400)] | None = None
    expected_version: Version | None = None


class Get(Event, frozen=True, kw_only=True, tag="Get"):
    """Read a key through cache, STM, IM and LTM, and record the access."""

    key: str


class Forget(Event, frozen=True, kw_only=True, tag="Forget"):
    """Remove a key, or with `key` unset every key of `namespace`, from every tier.

    A Forget also destroys the data keys that encrypt the forgotten values in
    the log, so no later replay or point-in-time read can recover them.
    `expected_version` works as for `Store` and needs a `key`.

    Version history: v1 required `key`; v2 (the current version) lets it be
    unset, to forget a whole namespace.
    """

    v: int = 2
    key: str | None = None
    expected_version: Version | None = None

    def __post_init__(self) -> None:
        if self.key is None and self.expected_version is not None:
            raise ValueError("a Forget of a whole namespace takes no expected_version")


class Maintain(Event, frozen=True, kw_only=True, tag="Maintain"):
    """Run one maintenance pass: expiry, consolidation downward and eviction.

    With `namespace` unset the pass covers every namespace.
    """

    namespace: str | None = None  # type: ignore[assignment]


class Search(Event, frozen=True, kw_only=True, tag="Search"):
    """Keyword search over the current memories of one namespace.

    Served by the search projection. With `min_seq` set, the router waits
    up to `wait_ms` for the index to reach that sequence number (a caller's
    own earlier write) and answers `Error` with code `unavailable` if it
    does not. Any text is a valid query; it is split into words, and a
    memory matches when it contains every word.
    """

    query: Annotated[str, msgspec.Meta(max_length=1024)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    min_seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 5000


class Status(Message, frozen=True, kw_only=True, tag="Status"):
    """Ask the router for its sequence position and the state of each shard."""


class Digest(Message, frozen=True, kw_only=True, tag="Digest"):
    """Ask for the canonical digest of every tier of every shard.

    The router answers once every event sequenced before this request is
    applied, so the digests describe one log prefix.
    """


class Rebuild(Message, frozen=True, kw_only=True, tag="Rebuild"):
    """Rebuild the live tiers of every shard (or one) from its newest snapshot and the log.

    The router keeps accepting and logging events meanwhile; each shard
    applies them after its rebuild. Answered with `Rebuilt`.
    """

    shard: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ShardRebuild(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one shard's rebuild."""

    shard: int
    snapshot_seq: int | None
    replayed: int
    watermark: int
    seconds: float


class Rebuilt(Message, frozen=True, kw_only=True, tag="Rebuilt"):
    """Every requested shard has rebuilt; `seq` is the log position when asked."""

    seq: int
    shards: list[ShardRebuild]


class ReadLog(Message, frozen=True, kw_only=True, tag="ReadLog"):
    """Ask for logged events from `from_seq` on, to fill a subscription gap."""

    from_seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 1000


class Ack(Message, frozen=True, kw_only=True, tag="Ack"):
    """The event is durable in the log under `seq`."""

    seq: int
    duplicate: bool = False


class Value(Message, frozen=True, kw_only=True, tag="Value"):
    """The value of a key, and the tier that served it."""

    seq: int
    key: str
    value: Any
    tier: str
    importance: float = 0.5
    tags: list[str] = []
    degraded: bool = False


class NotFound(Message, frozen=True, kw_only=True, tag="NotFound"):
    """The key is in no tier."""

    seq: int
    key: str
    degraded: bool = False


class SearchHit(msgspec.Struct, frozen=True, kw_only=True):
    """One search result: the key, its tier when indexed, and its rank score."""

    key: str
    tier: str
    score: float
    snippet: str


class Results(Message, frozen=True, kw_only=True, tag="Results"):
    """Search hits, best first; `index_seq` is how far the index had read the log."""

    seq: int
    index_seq: int
    hits: list[SearchHit]


class Conflict(Message, frozen=True, kw_only=True, tag="Conflict"):
    """A conditional `Store` or `Forget` found another version; nothing changed."""

    seq: int
    key: str
    expected_version: int
    actual_version: int


class LogEvents(Message, frozen=True, kw_only=True, tag="LogEvents"):
    """Logged events in sequence order, and the log's last sequence number."""

    events: list[AnyEvent]
    last_seq: int


class Busy(Message, frozen=True, kw_only=True, tag="Busy"):
    """The lane is full; retry the same message, with the same id, later."""

    lane: str
    retry_after_ms: int


class Error(Message, frozen=True, kw_only=True, tag="Error"):
    """The message was rejected; `code` is stable, `message` is for people."""

    code: str
    message: str
    field: str | None = None


class ShardStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One shard as reported to the router."""

    shard: int
    watermark: int
    pid: int
    node: str
    keys: int


class StatusReply(Message, frozen=True, kw_only=True, tag="StatusReply"):
    """The router's last sequence number and its shards."""

    last_seq: int
    shards: list[ShardStatus]
    lanes: dict[str, int] = {}


class TierDigest(msgspec.Struct, frozen=True, kw_only=True):
    """The canonical digest of one tier of one shard, and its record count."""

    shard: int
    tier: str
    digest: str
    records: int


class DigestReply(Message, frozen=True, kw_only=True, tag="DigestReply"):
    """Digests of every tier, all taken at log position `seq`."""

    seq: int
    tiers: list[TierDigest]


EVENT_TYPES: tuple[type[Event], ...] = (Store, Get, Forget, Maintain, Search)
ADMIN_TYPES: tuple[type[Message], ...] = (Status, Digest, ReadLog, Rebuild)
REQUEST_TYPES: tuple[type[Message], ...] = EVENT_TYPES + ADMIN_TYPES
REPLY_TYPES: tuple[type[Message], ...] = (
    Ack,
    Value,
    NotFound,
    Results,
    Conflict,
    LogEvents,
    Rebuilt,
    Busy,
    Error,
    StatusReply,
    DigestReply,
)

Request = Union[Store, Get, Forget, Maintain, Search, Status, Digest, ReadLog, Rebuild]
Reply = Union[
    Ack,
    Value,
    NotFound,
    Results,
    Conflict,
    LogEvents,
    Rebuilt,
    Busy,
    Error,
    StatusReply,
    DigestReply,
]
AnyEvent = Union[Store, Get, Forget, Maintain, Search]
