"""The hypothesis state machine that drives a target and the model side by side.

Each rule sends one step (one request, or several from clients on
different lanes at once) to the target, reads what the target logged, runs
the logged events through the model in sequence order, and records what
disagrees. The invariants then fail on any disagreement. A reply may not
be the model's, or a client's sequence numbers may go backwards. The log
may hold an event that no one sent, or miss an acknowledged one. A read
may miss its client's own earlier write. Live state may differ from the
model (on targets that expose it), or a rebuild from the log from the live
digests (every `rebuild_every` steps and at the end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from events.errors import ErrorCode
from events.types import (
    Ack,
    Conflict,
    Error,
    Event,
    Forget,
    Get,
    Maintain,
    Message,
    NotFound,
    Results,
    Search,
    SearchHit,
    Store,
    TierDigest,
    Value,
)
from replay.rebuild import compare_digests
from tiermem.check.model import Envelope, IdUse, Model, body_digest, envelope_reply
from tiermem.check.targets import (
    LiveShard,
    Outgoing,
    Schedule,
    StepResult,
    Target,
    describe,
)
from tiers.base import Record

__all__ = [
    "INVARIANTS",
    "CheckHooks",
    "CheckSettings",
    "live_state_problems",
    "machine_class",
    "reply_problem",
]

LANES = ("high", "normal", "low")
INVARIANTS = (
    "replies_match_model",
    "client_seqs_grow",
    "log_matches_acks",
    "reads_see_own_writes",
    "live_state_matches_model",
    "rebuild_equals_live",
)
_RETRYABLE = (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL)
_sorted_encoder = msgspec.msgpack.Encoder(order="sorted")
# The `index_seq` of an expected `Results` whose hits may be any subset of
# its hits: a search index that may lag behind the log.
_ANY_EARLIER = -1

WORDS = ("ada", "lovelace", "engine", "note", "poem", "tea")


@dataclass(frozen=True)
class CheckSettings:
    """Pools the generated requests draw from, and how often the costly checks run."""

    namespaces: tuple[str, ...] = ("ns-a", "ns-b", "ns-c", "ns-d")
    keys: tuple[str, ...] = ("k0", "k1", "k2", "k3", "k4")
    ttls: tuple[int | None, ...] = (None, None, None, 1, 2)
    clock_steps_ms: tuple[int, ...] = (1, 10, 100, 150, 200, 300, 1_000, 2_000, 5_000)
    rebuild_every: int = 8
    max_concurrent: int = 6
    faults: bool = True
    # Maintain(namespace=None) touches every namespace of the target, so a
    # shared deployment must not get it.
    global_maintain: bool = True


@dataclass
class CheckHooks:
    """Runner services for each example: id prefixes, extra checks, run capture."""

    prefix: Callable[[], str] = lambda: ""
    cross_process: (
        Callable[[list[Event]], list[tuple[str, list[TierDigest]]]] | None
    ) = None
    save_run: Callable[[list[Event], list[str]], None] | None = None
    examples: list[int] = field(default_factory=lambda: [0])
    # Steps and faults run over all examples, for the report.
    counts: dict[str, int] = field(default_factory=lambda: {"steps": 0, "faults": 0})


@dataclass(frozen=True)
class Op:
    """One generated request before it gets an id and its real namespace."""

    kind: str  # store, get, forget, maintain, search
    client: int = 1
    namespace: str | None = None
    key: str | None = None
    value: Any = None
    importance: float = 0.5
    tags: tuple[str, ...] = ()
    ttl_s: int | None = None
    query: str = ""
    expected_version: int | None = None

    def __repr__(self) -> str:
        shown = {"client": self.client, "namespace": self.namespace, "key": self.key}
        if self.kind == "store":
            shown.update(
                value=self.value,
                importance=self.importance,
                tags=self.tags,
                ttl_s=self.ttl_s,
            )
        if self.kind in ("store", "forget"):
            shown["expected_version"] = self.expected_version
        if self.kind == "search":
            shown["query"] = self.query
        text = ", ".join(
            f"{name}={value!r}"
            for name, value in shown.items()
            if name == "value" or value not in (None, ())
        )
        return f"{self.kind}({text})"


# ----------------------------------------------------------------- strategies


def _values() -> st.SearchStrategy[Any]:
    words = st.sampled_from(WORDS)
    scalars = st.one_of(
        st.integers(-3, 1_000),
        st.booleans(),
        st.none(),
        st.lists(words, min_size=1, max_size=3).map(" ".join),
        st.sampled_from([0.5, -1.25, 1e9]),
    )
    return st.one_of(
        scalars,
        st.lists(scalars, max_size=3),
        st.dictionaries(words, scalars, max_size=2),
    )


def _importance() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]),
        st.floats(0.0, 1.0, allow_nan=False),
    )


def _ops(settings: CheckSettings) -> dict[str, st.SearchStrategy[Op]]:
    """Return a strategy for each kind of request, drawing from `settings`' pools."""
    clients = st.integers(0, len(LANES) - 1)
    namespaces = st.sampled_from(settings.namespaces)
    keys = st.sampled_from(settings.keys)
    # Mostly unconditional writes; a conditional one names a small version.
    versions = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 3))
    store = st.builds(
        Op,
        kind=st.just("store"),
        client=clients,
        namespace=namespaces,
        key=keys,
        value=_values(),
        importance=_importance(),
        tags=st.lists(st.sampled_from(WORDS), max_size=2, unique=True).map(tuple),
        ttl_s=st.sampled_from(settings.ttls),
        expected_version=versions,
    )

    get = st.builds(
        Op, kind=st.just("get"), client=clients, namespace=namespaces, key=keys
    )
    forget = st.builds(
        Op,
        kind=st.just("forget"),
        client=clients,
        namespace=namespaces,
        key=keys,
        expected_version=versions,
    )
    # A Forget without a key: the whole namespace, never conditional.
    forget_all = st.builds(Op, kind=st.just("forget"), client=clients, namespace=namespaces)
    maintain_scope = (
        st.one_of(st.none(), namespaces) if settings.global_maintain else namespaces
    )
    maintain = st.builds(
        Op, kind=st.just("maintain"), client=clients, namespace=maintain_scope
    )
    search = st.builds(
        Op,
        kind=st.just("search"),
        client=clients,
        namespace=namespaces,
        query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=2).map(" ".join),
    )
    return {
        "store": store,
        "get": get,
        "forget": forget,
        "forget_all": forget_all,
        "maintain": maintain,
        "search": search,
    }


# ----------------------------------------------------------------- expected replies


def _same_value(left: Any, right: Any) -> bool:
    # Compared as MessagePack, so True and 1, or 1 and 1.0, stay different.
    return _sorted_encoder.encode(left) == _sorted_encoder.encode(right)


def reply_problem(
    expected: Message,
    actual: Message,
    *,
    cache_may_miss: bool = False,
    resend_ok: bool = False,
) -> str | None:
    """Return why `actual` is not `expected`, or None when it matches.

    `cache_may_miss` accepts the record's tier where the model expects `cache`
    (a shard shared with other clients). `resend_ok` accepts a duplicate
    `Ack` with the right `seq` for a new event, which is what a client that
    resent after its own timeout gets.
    """
    if type(actual) is not type(expected):
        return f"expected {type(expected).__name__}, got {describe(actual)}"
    if actual.id != expected.id:
        return f"reply id {actual.id!r}, expected {expected.id!r}"
    if isinstance(expected, Ack):
        assert isinstance(actual, Ack)
        duplicate_ok = resend_ok and actual.duplicate and actual.seq == expected.seq
        if (actual.seq, actual.duplicate) != (
            expected.seq,
            expected.duplicate,
        ) and not duplicate_ok:
            return f"expected Ack seq={expected.seq} duplicate={expected.duplicate}, got seq={actual.seq} duplicate={actual.duplicate}"
    elif isinstance(expected, NotFound):
        assert isinstance(actual, NotFound)
        if (actual.seq, actual.key, actual.degraded) != (
            expected.seq,
            expected.key,
            expected.degraded,
        ):
            return f"expected {describe(expected)}, got {describe(actual)}"
    elif isinstance(expected, Value):
        assert isinstance(actual, Value)
        wrong = [
            name
            for name in ("seq", "key", "importance", "tags", "degraded")
            if getattr(actual, name) != getattr(expected, name)
        ]
        if not _same_value(actual.value, expected.value):
            wrong.append("value")
        tier_ok = actual.tier == expected.tier
        if cache_may_miss and expected.tier == "cache":
            # Other clients of a shared shard can only push our keys out of
            # its cache sooner, never keep them longer.
            tier_ok = actual.tier != "cache" or tier_ok
        if not tier_ok:
            wrong.append("tier")
        if wrong:
            return f"fields {wrong} differ: expected {describe(expected)}, got {describe(actual)}"
    elif isinstance(expected, Conflict):
        assert isinstance(actual, Conflict)
        fields = ("seq", "key", "expected_version", "actual_version")
        if any(getattr(actual, name) != getattr(expected, name) for name in fields):
            return f"expected {describe(expected)}, got {describe(actual)}"
    elif isinstance(expected, Results):
        assert isinstance(actual, Results)
        # Rank scores and snippets belong to the projection, and the model
        # computes only which keys match.
        if actual.seq != expected.seq:
            return f"expected Results seq={expected.seq}, got {describe(actual)}"
        if expected.index_seq == _ANY_EARLIER:
            extra = sorted(
                {hit.key for hit in actual.hits} - {hit.key for hit in expected.hits}
            )
            if extra:
                return f"search hits {extra} were never stored in the namespace"
            return None
        hits = sorted((hit.key, hit.tier) for hit in actual.hits)
        wanted = sorted((hit.key, hit.tier) for hit in expected.hits)
        if hits != wanted:
            return f"expected search hits (key, tier) {wanted}, got {hits}"
    elif isinstance(expected, Error):
        assert isinstance(actual, Error)
        if actual.code != expected.code:
            return f"expected Error code {expected.code!r}, got {describe(actual)}"
    return None


_META_FIELDS = (
    "importance",
    "created_ts",
    "updated_ts",
    "accessed_ts",
    "access_count",
    "version",
    "tier_since_ts",
    "expires_ts",
    "cache_touch",
    "size",
)


def live_state_problems(model: Model, live: Sequence[LiveShard]) -> list[str]:
    """Compare every live record, its tier, its shard and each cache with the model."""
    problems: list[str] = []
    for shard, state in enumerate(live):
        for tier, records in state.records.items():
            for (namespace, key), record in sorted(records.items()):
                owner = model.shard_of(namespace)
                if owner != shard:
                    problems.append(
                        f"{namespace}/{key} is in {tier} of shard {shard}, but xxh64 places {namespace!r} on shard {owner}"
                    )
                    continue
                problem = _record_problem(model, tier, record)
                if problem:
                    problems.append(problem)
            expected = {
                key
                for key, item in model.records.items()
                if item.tier == tier and model.shard_of(key[0]) == shard
            }
            for namespace, key in sorted(expected - set(records)):
                problems.append(
                    f"{namespace}/{key} is missing from {tier} of shard {shard}"
                )
        if state.cache != model.cache_order(shard):
            problems.append(
                f"cache of shard {shard} is {state.cache}, expected {model.cache_order(shard)} (least recently used first)"
            )
    return problems


def _record_problem(model: Model, tier: str, record: Record) -> str | None:
    expected = model.records.get((record.namespace, record.key))
    where = f"{record.namespace}/{record.key} in {tier}"
    if expected is None:
        return f"{where} should not exist"
    if expected.tier != tier:
        return f"{where} should be in {expected.tier}"
    meta = record.meta
    wrong = {
        name: (getattr(meta, name), getattr(expected, name))
        for name in _META_FIELDS
        if getattr(meta, name) != getattr(expected, name)
    }
    if tuple(meta.tags) != expected.tags:
        wrong["tags"] = (meta.tags, expected.tags)
    if not _same_value(record.value, expected.value):
        wrong["value"] = (record.value, expected.value)
    if not wrong:
        return None
    shown = ", ".join(
        f"{name} is {actual!r}, expected {wanted!r}"
        for name, (actual, wanted) in wrong.items()
    )
    return f"{where}: {shown}"


@dataclass
class _Sent:
    """One request of the step being checked, and what the envelope makes of it."""

    out: Outgoing
    reply: Message
    use: IdUse
    logged: Event | None = None
    expected: list[Message] = field(default_factory=list)


# ----------------------------------------------------------------- the machine


def machine_class(settings: CheckSettings) -> type[RuleBasedStateMachine]:
    """Return a state machine class whose rules draw from `settings`.

    Instances take `(target, hooks)`; the runner builds them in its factory.
    """
    ops = _ops(settings)
    # Searches change no state, and an index that lags the log can be
    # compared only after the steps before it, so they have their own rule
    # and stay out of the mixed steps.
    any_op = st.one_of(
        ops["store"],
        ops["store"],
        ops["get"],
        ops["get"],
        ops["forget"],
        ops["maintain"],
    )

    class CheckMachine(RuleBasedStateMachine):
        written = Bundle("written")
        unanswered = Bundle("unanswered")

        def __init__(self, target: Target, hooks: CheckHooks) -> None:
            super().__init__()
            self.target = target
            self.hooks = hooks
            hooks.examples[0] += 1
            self.prefix = hooks.prefix()
            self.envelope = Envelope(target.begin())
            self.model = Model(target.shards, target.policy)
            self.next_id = 0
            self.steps = 0
            self.trace: list[str] = []
            self.written_keys: set[tuple[str, str]] = set()
            self.client_seq: dict[int, int] = {}
            self.client_writes: dict[tuple[int, str, str], int] = {}
            self.last_ts = 0
            # The first reply of each conditional write, which a resend gets again.
            self.outcomes: dict[str, Message] = {}
            self.stored_keys: dict[str, set[str]] = {}
            self.problems: dict[str, list[str]] = {}
            # False while a rule or check runs, so teardown can tell a
            # failed example and skip the final checks that would mask it.
            self.healthy = True

        # --------------------------------------------------------- helpers

        def _request(self, op: Op) -> Event:
            self.next_id += 1
            request_id = f"{self.prefix}r{self.next_id}"
            namespace = self.prefix + op.namespace if op.namespace is not None else None
            if op.kind == "store":
                assert namespace is not None and op.key is not None
                self.written_keys.add((namespace, op.key))
                return Store(
                    id=request_id,
                    namespace=namespace,
                    key=op.key,
                    value=op.value,
                    importance=op.importance,
                    tags=list(op.tags),
                    ttl_s=op.ttl_s,
                    expected_version=op.expected_version,
                )
            if op.kind == "get":
                return Get(id=request_id, namespace=namespace or "", key=op.key or "")
            if op.kind == "forget":
                return Forget(
                    id=request_id,
                    namespace=namespace or "",
                    key=op.key,
                    expected_version=op.expected_version if op.key is not None else None,
                )
            if op.kind == "maintain":
                return Maintain(id=request_id, namespace=namespace)
            if self.target.supports_search:
                # Wait until the index covers every event sent so far.
                return Search(
                    id=request_id,
                    namespace=namespace or "",
                    query=op.query,
                    min_seq=self.envelope.last_seq or None,
                    wait_ms=10_000,
                )
            return Search(id=request_id, namespace=namespace or "", query=op.query)

        def _problem(self, invariant_name: str, text: str) -> None:
            self.problems.setdefault(invariant_name, []).append(
                f"step {self.steps}: {text}"
            )

        def _send(
            self, step: list[Outgoing], schedule: Schedule | None = None
        ) -> list[_Sent]:
            self.healthy = False
            self.steps += 1
            self.hooks.counts["steps"] += 1
            self.trace.append(
                f"step {self.steps}: "
                + "; ".join(
                    f"client {out.client} ({out.lane}): {describe(out.request)}"
                    for out in step
                )
            )
            uses = [self.envelope.classify(out.request) for out in step]
            result = self.target.send(step, schedule)
            sent = [
                _Sent(out, reply, use)
                for out, reply, use in zip(step, result.replies, uses, strict=True)
            ]
            self._check_log(sent, result)
            self._run_model(sent, result)
            self._check_replies(sent, result)
            self._check_clients(sent)
            self._check_live()
            if self.steps % settings.rebuild_every == 0:
                self._check_rebuild()
            self.healthy = True
            return sent

        # --------------------------------------------------------- checks

        def _check_log(self, sent: list[_Sent], result: StepResult) -> None:
            logged = result.logged
            for item in sent:
                entry = logged.get(item.out.request.id or "")
                if item.use.kind != "new":
                    if entry is not None:
                        self._problem(
                            "log_matches_acks",
                            f"{item.use.kind} request {item.out.request.id!r} was logged again as seq {entry.seq}",
                        )
                    continue
                if entry is None:
                    if not (
                        isinstance(item.reply, Error) and item.reply.code in _RETRYABLE
                    ):
                        self._problem(
                            "log_matches_acks",
                            f"request {describe(item.out.request)} got {describe(item.reply)} but is not in the log",
                        )
                    continue
                if body_digest(entry) != body_digest(item.out.request) and not _erased_later(
                    entry, item.out.request, logged.values()
                ):
                    self._problem(
                        "log_matches_acks",
                        f"the log holds {describe(entry)} for request {describe(item.out.request)}",
                    )
                item.logged = entry
            if not self.target.exclusive:
                return
            for event in result.foreign:
                if not (isinstance(event, Maintain) and event.namespace is None):
                    self._problem(
                        "log_matches_acks",
                        f"the log holds {describe(event)}, which no client sent",
                    )
            seqs = sorted(
                event.seq or 0 for event in [*logged.values(), *result.foreign]
            )
            dense = list(
                range(
                    self.envelope.last_seq + 1, self.envelope.last_seq + 1 + len(seqs)
                )
            )
            if seqs != dense:
                self._problem(
                    "log_matches_acks",
                    f"logged sequence numbers {seqs}, expected the dense run {dense}",
                )

        def _run_model(self, sent: list[_Sent], result: StepResult) -> None:
            foreign = [event for event in result.foreign if self._touches_ours(event)]
            new = [
                item
                for item in sent
                if item.use.kind == "new" and item.logged is not None
            ]
            order = sorted(
                [(item.logged.seq or 0, item.logged, item) for item in new]
                + [(event.seq or 0, event, None) for event in foreign],
                key=lambda entry: entry[0],
            )
            recovered = [
                item for item in new if item.out.request.id in result.recovered
            ]
            for seq, event, item in order:
                if item is not None or event.id not in self.envelope.logged:
                    self.envelope.record(event)
                self.last_ts = max(self.last_ts, event.ts or 0)
                reply = self.model.apply(event)
                if isinstance(event, Store):
                    self.stored_keys.setdefault(event.namespace, set()).add(event.key)
                if reply is not None and not isinstance(event, Get):
                    self.outcomes[event.id or ""] = reply
                if item is not None:
                    item.expected += (
                        [reply]
                        if reply is not None
                        else self._router_replies(item, event)
                    )
                # A restarted shard answers the reads of the batch it got
                # again from its recovered state, which may include events
                # sequenced after the read.
                for waiting in recovered:
                    request = waiting.logged
                    if request is None or (request.seq or 0) > seq:
                        continue
                    if isinstance(request, Get):
                        peeked = self.model.peek(
                            request.namespace,
                            request.key,
                            request.seq or 0,
                            request.ts or 0,
                        )
                        waiting.expected.append(
                            msgspec.structs.replace(peeked, id=request.id)
                        )
                    elif request.seq == seq and isinstance(reply, Ack):
                        # A conditional write that a restarted shard had already
                        # applied is answered as a resend.
                        waiting.expected.append(
                            msgspec.structs.replace(reply, duplicate=True)
                        )
            low, high = result.ts_window
            for item in sent:
                request = item.out.request
                if item.use.kind == "conflict":
                    item.expected.append(envelope_reply(request, item.use, None))  # type: ignore[arg-type]
                elif item.use.kind == "duplicate":
                    if isinstance(request, Get):
                        # A repeated read is not logged, so its timestamp is known only
                        # to lie in the window; an expiry inside it may go either way.
                        for ts in {max(low, self.last_ts), max(high, self.last_ts)}:
                            peeked = self.model.peek(
                                request.namespace, request.key, item.use.seq or 0, ts
                            )
                            item.expected.append(
                                msgspec.structs.replace(peeked, id=request.id)
                            )
                    elif isinstance(self.outcomes.get(request.id or ""), Conflict):
                        item.expected.append(self.outcomes[request.id or ""])
                    else:
                        # Only writes are resent: the lost-reply rule never draws a Search.
                        item.expected.append(
                            Ack(id=request.id, seq=item.use.seq or 0, duplicate=True)
                        )

        def _router_replies(self, item: _Sent, event: Event) -> list[Message]:
            """Return the replies the router itself may give to a logged event."""
            seq = event.seq or 0
            if isinstance(event, Search):
                if self.target.supports_search:
                    keys = sorted(
                        self.model.search_keys(
                            event.namespace, event.query, event.ts or 0
                        )
                    )[: event.limit]
                    hits = [
                        SearchHit(
                            key=key,
                            tier=self.model.records[(event.namespace, key)].tier,
                            score=0.0,
                            snippet="",
                        )
                        for key in keys
                    ]
                    return [Results(id=event.id, seq=seq, index_seq=seq, hits=hits)]
                # Without a projection the router answers `unavailable`. With
                # one that may lag (no min_seq), the hits can come from any
                # earlier state, so they must be keys stored before.
                stored = sorted(self.stored_keys.get(event.namespace, set()))
                return [
                    Error(id=event.id, code=ErrorCode.UNAVAILABLE, message=""),
                    Results(
                        id=event.id,
                        seq=seq,
                        index_seq=_ANY_EARLIER,
                        hits=[
                            SearchHit(key=key, tier="", score=0.0, snippet="")
                            for key in stored
                        ],
                    ),
                ]
            reply = envelope_reply(item.out.request, item.use, seq)
            return [reply] if reply is not None else []

        def _touches_ours(self, event: Event) -> bool:
            if not self.prefix or (
                isinstance(event, Maintain) and event.namespace is None
            ):
                return True
            return (event.namespace or "").startswith(self.prefix)

        def _check_replies(self, sent: list[_Sent], result: StepResult) -> None:
            for item in sent:
                request, reply = item.out.request, item.reply
                if result.faulted and (
                    getattr(reply, "degraded", False)
                    or isinstance(reply, Error)
                    and reply.code in _RETRYABLE
                ):
                    # While a tier is down a shard answers reads from what it
                    # can reach, flagged degraded, and conditional writes
                    # with `unavailable`.
                    continue
                if not item.expected:
                    if not (
                        isinstance(reply, Error)
                        and reply.code in _RETRYABLE
                        and item.logged is None
                    ):
                        self._problem(
                            "replies_match_model",
                            f"no model reply for {describe(request)}; target replied {describe(reply)}",
                        )
                    continue
                reasons = [
                    reply_problem(
                        expected,
                        reply,
                        cache_may_miss=not self.target.exclusive,
                        resend_ok=self.target.client_resends,
                    )
                    for expected in item.expected
                ]
                if all(reasons):
                    shown = (
                        reasons[0]
                        if len(reasons) == 1
                        else "; ".join(f"or {reason}" for reason in reasons)
                    )
                    self._problem(
                        "replies_match_model", f"{describe(request)}: {shown}"
                    )

        def _check_clients(self, sent: list[_Sent]) -> None:
            for item in sent:
                client, request = item.out.client, item.out.request
                if item.use.kind != "new" or item.logged is None:
                    continue
                seq = item.logged.seq or 0
                last = self.client_seq.get(client, 0)
                if seq <= last:
                    self._problem(
                        "client_seqs_grow",
                        f"client {client} got seq {seq} for {describe(request)} after seq {last}",
                    )
                self.client_seq[client] = max(last, seq)
                if isinstance(request, (Store, Forget)) and isinstance(item.reply, Ack):
                    self.client_writes[(client, request.namespace, request.key)] = seq
                if isinstance(request, Get) and isinstance(
                    item.reply, (Value, NotFound)
                ):
                    write = self.client_writes.get(
                        (client, request.namespace, request.key), 0
                    )
                    if item.reply.seq <= write:
                        self._problem(
                            "reads_see_own_writes",
                            f"client {client}'s Get of {request.key!r} has seq {item.reply.seq}, not after its write at seq {write}",
                        )

        def _check_live(self) -> None:
            live = self.target.live_state()
            if live is not None:
                for text in live_state_problems(self.model, live):
                    self._problem("live_state_matches_model", text)

        def _check_rebuild(self) -> None:
            live = self.target.digests()
            if live is None:
                return
            seq, digests = live
            if self.target.exclusive:
                counts = self.model.counts()
                actual = {(item.shard, item.tier): item.records for item in digests}
                for place, count in counts.items():
                    if actual.get(place, 0) != count:
                        self._problem(
                            "live_state_matches_model",
                            f"shard {place[0]} {place[1]} holds {actual.get(place, 0)} records, the model {count}",
                        )
            rebuilt = self.target.rebuilt_digests(seq)
            if rebuilt is not None:
                for mismatch in compare_digests(digests, rebuilt):
                    self._problem(
                        "rebuild_equals_live",
                        f"shard {mismatch.shard} {mismatch.tier}: live digest {mismatch.expected}, rebuilt from the log {mismatch.actual}",
                    )

        def _check_cross_process(self) -> None:
            if self.hooks.cross_process is None:
                return
            live = self.target.digests()
            if live is None:
                return
            for label, digests in self.hooks.cross_process(self.target.events()):
                for mismatch in compare_digests(live[1], digests):
                    self._problem(
                        "rebuild_equals_live",
                        f"shard {mismatch.shard} {mismatch.tier}: live digest {mismatch.expected}, rebuilt in a process with {label}: {mismatch.actual}",
                    )

        # --------------------------------------------------------- rules

        def _one(self, op: Op) -> _Sent:
            request = self._request(op)
            (item,) = self._send([Outgoing(op.client, LANES[op.client], request)])
            return item

        @rule(target=written, op=ops["store"])
        def store(self, op: Op) -> tuple[str, str]:
            self._one(op)
            return (op.namespace or "", op.key or "")

        @rule(
            target=written,
            ref=written,
            value=_values(),
            importance=_importance(),
            client=st.integers(0, 2),
        )
        def overwrite(
            self, ref: tuple[str, str], value: Any, importance: float, client: int
        ) -> tuple[str, str]:
            self._one(
                Op("store", client, ref[0], ref[1], value=value, importance=importance)
            )
            return ref

        @rule(
            target=written,
            ref=written,
            delta=st.sampled_from([0, 0, 1, -1]),
            forget=st.booleans(),
            client=st.integers(0, 2),
            value=_values(),
        )
        def conditional(
            self,
            ref: tuple[str, str],
            delta: int,
            forget: bool,
            client: int,
            value: Any,
        ) -> tuple[str, str]:
            """Store or forget with `expected_version` near the key's version in the model."""
            record = self.model.records.get((self.prefix + ref[0], ref[1]))
            version = max(0, (record.version if record else 0) + delta)
            kind = "forget" if forget else "store"
            self._one(
                Op(kind, client, ref[0], ref[1], value=value, expected_version=version)
            )
            return ref

        @rule(op=st.one_of(ops["get"], ops["get"], ops["get"], ops["search"]))
        def read(self, op: Op) -> None:
            """Get a key, or now and then search a namespace."""
            self._one(op)

        @rule(ref=written, client=st.integers(0, 2))
        def get_written(self, ref: tuple[str, str], client: int) -> None:
            self._one(Op("get", client, ref[0], ref[1]))

        @rule(ref=written, client=st.integers(0, 2))
        def forget(self, ref: tuple[str, str], client: int) -> None:
            self._one(Op("forget", client, ref[0], ref[1]))

        @rule(op=ops["forget_all"])
        def forget_namespace(self, op: Op) -> None:
            """Forget every key of one namespace."""
            self._one(op)

        @rule(
            index=st.integers(0, 63),
            action=st.sampled_from(["get", "get", "forget", "store"]),
            client=st.integers(0, 2),
        )
        def deep(self, index: int, action: str, client: int) -> None:
            """Read, forget or overwrite a record that the model has in IM or LTM.

            With none there, it takes any record, or the first key. No
            precondition: on a wall-clock target, which records have moved
            depends on timing, and hypothesis needs the same rules enabled
            when it replays an example.
            """
            records = self.model.records
            candidates = sorted(
                key for key, record in records.items() if record.tier != "stm"
            ) or sorted(records)
            if candidates:
                namespace, key = candidates[index % len(candidates)]
                logical = namespace.removeprefix(self.prefix)
            else:
                logical, key = settings.namespaces[0], settings.keys[0]
            self._one(Op(action, client, logical, key, value=index))

        @rule(op=ops["maintain"])
        def maintain(self, op: Op) -> None:
            self._one(op)

        @precondition(lambda self: self.target.controls_clock)
        @rule(ms=st.sampled_from(settings.clock_steps_ms))
        def advance_clock(self, ms: int) -> None:
            self.target.advance_clock(ms)
            self.trace.append(f"clock advanced by {ms} ms")

        @rule(
            step=st.lists(any_op, min_size=2, max_size=settings.max_concurrent),
            data=st.data(),
        )
        def concurrent(self, step: list[Op], data: st.DataObject) -> None:
            """Send several requests at once from clients on different lanes."""
            outgoing = [
                Outgoing(op.client, LANES[op.client], self._request(op)) for op in step
            ]
            schedule = None
            if self.target.controls_clock:
                schedule = data.draw(_schedules(outgoing), label="schedule")
            self._send(outgoing, schedule)

        @rule(target=unanswered, op=any_op)
        def lost_ack(self, op: Op) -> Event:
            """Send a request and drop its reply, as a lost acknowledgement would."""
            item = self._one(op)
            self.trace[-1] += " (reply dropped)"
            return item.out.request

        @rule(request=consumes(unanswered), client=st.integers(0, 2))
        def retry(self, request: Event, client: int) -> None:
            """Resend an event whose reply was lost, with the same id."""
            self._send([Outgoing(client, LANES[client], request)])

        @rule(request=unanswered, value=_values())
        def reuse_id(self, request: Event, value: Any) -> None:
            """Send a different event under an id already used: a conflict."""
            namespace = request.namespace or self.prefix + settings.namespaces[0]
            other = Store(
                id=request.id, namespace=namespace, key="reused-id", value=value
            )
            if body_digest(other) == body_digest(request):
                return
            # Stored only if the target misses the conflict; forgotten at the end either way.
            self.written_keys.add((namespace, "reused-id"))
            self._send([Outgoing(1, "normal", other)])

        @precondition(lambda self: settings.faults and bool(self.target.faults()))
        @rule(choice=st.integers(0, 63), which=st.integers(0, 11))
        def fault(self, choice: int, which: int) -> None:
            names = self.target.faults()
            done = self.target.inject(names[choice % len(names)], which)
            self.hooks.counts["faults"] += 1
            self.trace.append(f"fault: {done}")

        # --------------------------------------------------------- invariants

        def _assert_none(self, name: str) -> None:
            found = self.problems.pop(name, [])
            if found:
                self.healthy = False
                raise AssertionError(f"{name}: " + "\n  ".join(found))

        @invariant()
        def replies_match_model(self) -> None:
            self._assert_none("replies_match_model")

        @invariant()
        def client_seqs_grow(self) -> None:
            self._assert_none("client_seqs_grow")

        @invariant()
        def log_matches_acks(self) -> None:
            self._assert_none("log_matches_acks")

        @invariant()
        def reads_see_own_writes(self) -> None:
            self._assert_none("reads_see_own_writes")

        @invariant()
        def live_state_matches_model(self) -> None:
            self._assert_none("live_state_matches_model")

        @invariant()
        def rebuild_equals_live(self) -> None:
            self._assert_none("rebuild_equals_live")

        def teardown(self) -> None:
            try:
                if self.healthy and not self.problems:
                    self.healthy = False
                    self._check_rebuild()
                    self._check_cross_process()
                    for name in list(self.problems):
                        self._assert_none(name)
                    self.healthy = True
            finally:
                if self.hooks.save_run is not None:
                    self.hooks.save_run(self.target.events(), self.trace)
                self.target.end(self.written_keys)

    return CheckMachine


def _erased_later(entry: Event, request: Event, logged: Iterable[Event]) -> bool:
    """Return whether `entry` is `request` with its value erased by a later Forget in `logged`.

    The log keeps a Store's value only until a Forget of its key or
    namespace destroys the data key; from then on reading the log gives the
    Store with value None and no tags.
    """
    if not (isinstance(entry, Store) and isinstance(request, Store)):
        return False
    erased = msgspec.structs.replace(request, value=None, tags=[])
    if body_digest(entry) != body_digest(erased):
        return False
    return any(
        isinstance(event, Forget)
        and event.namespace == entry.namespace
        and event.key in (None, entry.key)
        and (event.seq or 0) > (entry.seq or 0)
        for event in logged
    )


@st.composite
def _schedules(draw: st.DrawFn, outgoing: Sequence[Outgoing]) -> Schedule:
    """Draw an arrival order that keeps each client's order, and batch cuts."""
    count = len(outgoing)
    slots = draw(st.permutations(range(count)))
    queues: dict[int, list[int]] = {}
    for index, out in enumerate(outgoing):
        queues.setdefault(out.client, []).append(index)
    order = tuple(queues[outgoing[slot].client].pop(0) for slot in slots)
    cuts = draw(st.sets(st.integers(0, max(0, count - 2)), max_size=count))
    return Schedule(order=order, cuts=frozenset(cuts))
