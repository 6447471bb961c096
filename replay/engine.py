"""The replay engine: verify, point-in-time views and rebuilds, one shard at a time.

Every operation works on one shard, so the command line can run one Celery
task per shard in parallel, or all of them in one process with `--local`:

- `verify_shard` rebuilds a shard from the log (from its newest snapshot,
  or from empty) up to the position of a live `Digest` and compares the
  digests per tier. On a mismatch it reads the live tiers directly and
  lists the first keys that differ.
- `build_view_shard` builds a shard's state at a past log position into a
  named view (`DIR/views/<name>/`, snapshot files in the snapshot layout),
  which `view_get` and `view_search` read, returning what the live system
  returned then, without recording an access.
- `apply_local` rebuilds a live shard's tiers in place from its newest
  snapshot and the log, with the router stopped.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis
import structlog

from events.errors import TiermemError
from events.log import RedisEventLog
from events.types import NotFound, Results, SearchHit, TierDigest, Value
from handlers.actor import ShardSettings, build_shard
from handlers.policy import Policy
from handlers.shard import RecoveryReport
from handlers.sharding import shard_of
from replay.rebuild import Mismatch, compare_digests
from replay.snapshot import ReplayedShard, event_ts, replay_shard, snapshot_root
from tiers.base import TIER_NAMES, Record, Tier
from tiers.errors import TierError
from tiers.memory import MemoryTier
from tiers.pools import TierPoolSettings
from tiers.redis_tier import RedisTier, client_from_url
from tiers.snapshot import Snapshot, list_snapshots, read_snapshot, write_snapshot
from tiers.sqlite_tier import SqliteTier

__all__ = [
    "InvalidViewNameError",
    "KeyDifference",
    "ReplayError",
    "ReplayTarget",
    "ShardVerification",
    "ViewManifest",
    "ViewNotFoundError",
    "ViewShard",
    "apply_local",
    "build_view_shard",
    "check_router_stopped",
    "discard_view",
    "live_digest",
    "load_target",
    "open_live_tiers",
    "parse_time",
    "read_view_manifest",
    "seq_at_time",
    "target_from_config",
    "verify_shard",
    "view_get",
    "view_root",
    "view_search",
    "write_view_manifest",
]

log = structlog.get_logger("tiermem.replay")

_VIEW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WORD = re.compile(r"\w+")

# Keys listed per tier when a verification fails; the first ones are
# enough to start looking, and a diverged shard may differ in every key.
DEFAULT_MAX_KEYS = 10


class ReplayError(TiermemError):
    """A replay operation cannot run: missing stack settings, a running router."""


class ViewNotFoundError(ReplayError):
    """No view of that name exists under the data directory."""


class InvalidViewNameError(ReplayError, ValueError):
    """A view name that is not a plain folder name, such as `../x`."""


# ----------------------------------------------------------- the stack


class ReplayTarget(msgspec.Struct, frozen=True, kw_only=True):
    """The locations of a stack's log and tiers, read from its `DIR/stack.json`."""

    data_dir: str
    shards: int
    policy: Policy
    log_url: str
    stm_url: str
    im_url: str
    ltm_dir: str
    log_stream: str = "tiermem:log"
    pools: TierPoolSettings = TierPoolSettings()

    @property
    def snapshots(self) -> Path:
        return snapshot_root(self.data_dir)

    @property
    def fingerprint(self) -> str:
        return f"{self.policy.fingerprint()}:{self.shards}"

    def event_log(self) -> RedisEventLog:
        return RedisEventLog(redis.Redis.from_url(self.log_url), stream=self.log_stream)

    def shard_settings(self, shard: int) -> ShardSettings:
        return ShardSettings(
            shard=shard,
            shards=self.shards,
            log_url=self.log_url,
            stm_url=self.stm_url,
            im_url=self.im_url,
            ltm_dir=self.ltm_dir,
            policy=self.policy,
            log_stream=self.log_stream,
            snapshot_dir=str(self.snapshots),
            pools=self.pools,
        )

    def check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.shards:
            raise ReplayError(f"shard {shard} does not exist: the stack has shards 0 to {self.shards - 1}")


def load_target(data_dir: str | Path) -> ReplayTarget:
    """Read the log and tier locations of the stack that ran in `data_dir`."""
    # stack.json's schema belongs to the application package, which writes it.
    from tiermem.config import load_stack_config

    path = Path(data_dir) / "stack.json"
    if not path.exists():
        raise ReplayError(
            f"{path} does not exist: run `tiermem up --data-dir {data_dir}` once, "
            "which records there where the log and the tiers are"
        )
    return target_from_config(load_stack_config(path), source=str(path))


def target_from_config(config: Any, *, source: str = "the stack config") -> ReplayTarget:
    """Return the target of a `tiermem.config.StackConfig` whose Redis URLs are set."""
    if not (config.log_url and config.stm_url and config.im_url):
        raise ReplayError(f"{source} does not name the log, STM and IM Redis URLs: start the stack with `tiermem up` first")
    return ReplayTarget(
        data_dir=str(Path(config.data_dir)),
        shards=config.shards,
        policy=config.policy,
        log_url=config.log_url,
        stm_url=config.stm_url,
        im_url=config.im_url,
        ltm_dir=config.ltm_dir,
        log_stream=config.log_stream,
        pools=config.pools,
    )


def live_digest(data_dir: str | Path, *, timeout: float = 60.0) -> tuple[int, list[TierDigest]]:
    """Ask the running router for the digests of every tier; return (seq, digests)."""
    from bus.client import Client

    with Client.from_data_dir(data_dir, timeout=timeout) as client:
        reply = client.digest()
    return reply.seq, list(reply.tiers)


# ----------------------------------------------------------- verify


class KeyDifference(msgspec.Struct, frozen=True, kw_only=True):
    """One key whose record differs between the rebuild and the live tier.

    `problem` is `missing in live`, `only in live`, `differs` or
    `unreadable`, which means the live tier could not be decoded and `live`
    is the error. `rebuilt` and `live` show the value, and for `differs` the
    differing `Meta` fields, in at most 200 characters.
    """

    tier: str
    namespace: str
    key: str
    problem: str
    rebuilt: str | None = None
    live: str | None = None


class ShardVerification(msgspec.Struct, frozen=True, kw_only=True):
    """The result of verifying one shard at log position `seq`.

    `compared_seq` is the position at which the keys in `differences` were
    compared: the live STM watermark, when live had moved past `seq`.
    """

    shard: int
    seq: int
    verified: bool
    events: int
    base_seq: int
    seconds: float
    mismatches: list[Mismatch] = []
    differences: list[KeyDifference] = []
    compared_seq: int | None = None
    # Rebuilds repeated at a newer digest, because a Forget after `seq`
    # destroyed values the first rebuild needed.
    retries: int = 0


def _forgotten_since(event_log: RedisEventLog, shard: int, shards: int, seq: int) -> int:
    """Return how many Forgets of this shard's namespaces took effect after `seq`."""
    return sum(1 for record in event_log.forgets_after(seq) if shard_of(record.namespace, shards) == shard)


def verify_shard(
    target: ReplayTarget,
    shard: int,
    seq: int,
    expected: Sequence[TierDigest],
    *,
    from_empty: bool = False,
    max_keys: int = DEFAULT_MAX_KEYS,
    progress: Callable[[int], None] | None = None,
    redigest: Callable[[], tuple[int, Sequence[TierDigest]]] | None = None,
    attempts: int = 3,
) -> ShardVerification:
    """Rebuild `shard` at `seq` and compare it with the live digests `expected`.

    `expected` are the digests of a `DigestReply` taken at `seq` (entries of
    other shards are ignored). With `from_empty` the rebuild ignores the
    snapshots and replays the whole log.

    A Forget that took effect after `seq` destroyed the data keys of values
    live still had at `seq`, so a rebuild at `seq` reads them as erased and
    cannot match. When that happens and `redigest` is given, the check runs
    again at a fresh digest from `redigest`, up to `attempts` times in all.
    Each new attempt applies only the events after the previous attempt's
    seq to the same scratch shard. The Forgets among them remove the erased
    values from it as they removed them from live. The tail is short, so
    another Forget has little time to land in it.
    """
    target.check_shard(shard)
    started = time.monotonic()
    event_log = target.event_log()
    retries = 0
    replayed = replay_shard(
        event_log,
        shard=shard,
        shards=target.shards,
        policy=target.policy,
        until_seq=seq,
        snapshots=None if from_empty else target.snapshots,
        progress=progress,
    )
    while True:
        mine = [item for item in expected if item.shard == shard]
        if not mine:
            raise ReplayError(f"the live digests have no entry for shard {shard}")
        mismatches = compare_digests(mine, replayed.host.digests())
        if not mismatches or redigest is None or retries + 1 >= attempts:
            break
        forgotten = _forgotten_since(event_log, shard, target.shards, seq)
        if not forgotten:
            break
        fresh_seq, fresh = redigest()
        if fresh_seq <= seq:
            break
        retries += 1
        log.info(
            "replay.verify.retrying",
            shard=shard,
            seq=seq,
            fresh_seq=fresh_seq,
            forgets=forgotten,
            next="applying the events up to a fresh digest and comparing again",
        )
        replayed.advance(event_log, fresh_seq, progress=progress)
        seq, expected = fresh_seq, fresh
    differences: list[KeyDifference] = []
    compared_seq = None
    if mismatches:
        compared_seq, differences = _live_differences(target, replayed, {item.tier for item in mismatches}, max_keys)
    result = ShardVerification(
        shard=shard,
        seq=seq,
        verified=not mismatches,
        events=replayed.events,
        base_seq=replayed.base_seq,
        seconds=round(time.monotonic() - started, 3),
        mismatches=mismatches,
        differences=differences,
        compared_seq=compared_seq,
        retries=retries,
    )
    if mismatches:
        log.error(
            "replay.verify.mismatch",
            shard=shard,
            seq=seq,
            tiers=[item.tier for item in mismatches],
            keys=[f"{item.tier}:{item.namespace}/{item.key}" for item in differences],
        )
    else:
        log.info("replay.verify.passed", shard=shard, seq=seq, events=replayed.events, base_seq=replayed.base_seq)
    return result


def open_live_tiers(target: ReplayTarget, shard: int) -> dict[str, Tier]:
    """Open the live STM, IM and LTM of `shard` for reading; the caller closes them.

    An LTM file that does not exist stands for an empty LTM and is not
    created: a memory tier takes its place.
    """
    tiers: dict[str, Tier] = {
        "stm": RedisTier("stm", client_from_url(target.stm_url), shard, owns_client=True),
        "im": RedisTier("im", client_from_url(target.im_url), shard, owns_client=True),
    }
    ltm_path = Path(target.ltm_dir) / f"ltm-{shard}.sqlite3"
    tiers["ltm"] = SqliteTier("ltm", ltm_path, shard) if ltm_path.exists() else MemoryTier("ltm", shard)
    return tiers


def _live_differences(
    target: ReplayTarget, replayed: ReplayedShard, tiers: set[str], max_keys: int
) -> tuple[int, list[KeyDifference]]:
    """Compare the rebuilt records with the live tiers; return (position, first differences).

    Live may have applied events after the digest. When its STM watermark
    is ahead, the rebuild applies the log up to it first, so only real
    differences are listed. A commit that lands during the comparison can
    still show up as a difference, so a second verify rules that out.
    """
    live = open_live_tiers(target, replayed.host.shard)
    try:
        position = replayed.seq
        try:
            live_watermark = live["stm"].watermark()
        except TierError as error:
            log.warning(
                "replay.verify.watermark_unreadable",
                shard=replayed.host.shard,
                error=str(error),
                next=f"comparing the keys at seq {position}",
            )
            live_watermark = 0
        if live_watermark > position:
            event_log = target.event_log()
            for batch in event_log.iter_from(position, live_watermark):
                mine = [event for event in batch if replayed.host.owns(event)]
                if mine:
                    replayed.host.apply(mine)
            position = live_watermark
        differences: list[KeyDifference] = []
        for name in TIER_NAMES:
            if name in tiers:
                differences += _tier_differences(name, replayed.host.tiers[name], live[name], max_keys)
        if "cache" in tiers:
            differences += _cache_differences(replayed, live, max_keys)
        return position, differences
    finally:
        for tier in live.values():
            tier.close()


def _tier_differences(name: str, rebuilt: Tier, live: Tier, max_keys: int) -> list[KeyDifference]:
    found: list[KeyDifference] = []
    try:
        for namespace, key, left, right in _merge(rebuilt.records(), live.records()):
            if left is None:
                found.append(KeyDifference(tier=name, namespace=namespace, key=key, problem="only in live", live=_show_value(right.value)))
            elif right is None:
                found.append(KeyDifference(tier=name, namespace=namespace, key=key, problem="missing in live", rebuilt=_show_value(left.value)))
            elif _encoded(left) != _encoded(right):
                rebuilt, live = _show_difference(left, right)
                found.append(KeyDifference(tier=name, namespace=namespace, key=key, problem="differs", rebuilt=rebuilt, live=live))
            if len(found) >= max_keys:
                break
    except TierError as error:
        found.append(KeyDifference(tier=name, namespace="", key="", problem="unreadable", live=str(error)))
    return found


def _cache_differences(replayed: ReplayedShard, live: dict[str, Tier], max_keys: int) -> list[KeyDifference]:
    """Compare cache membership, as the live tiers' `cache_touch` values record it.

    The live cache itself is in the shard actor's memory and cannot be
    read from outside. When these match but the cache digest does not, the
    actor's memory has drifted from its own tiers: `--apply` reloads it.
    """
    rebuilt = {(ns, key): touch for ns, key, touch in replayed.host.state.cache_digest_records()}
    stored: dict[tuple[str, str], int] = {}
    try:
        for name in TIER_NAMES:
            for namespace, key, meta in live[name].scan_meta():
                if meta.cache_touch:
                    stored[(namespace, key)] = meta.cache_touch
    except TierError as error:
        return [KeyDifference(tier="cache", namespace="", key="", problem="unreadable", live=str(error))]
    found = []
    for namespace, key in sorted(rebuilt.keys() | stored.keys()):
        left, right = rebuilt.get((namespace, key)), stored.get((namespace, key))
        if left == right:
            continue
        if right is None:
            problem = "missing in live"
        elif left is None:
            problem = "only in live"
        else:
            problem = "differs"
        found.append(
            KeyDifference(
                tier="cache",
                namespace=namespace,
                key=key,
                problem=problem,
                rebuilt=None if left is None else f"cache_touch={left}",
                live=None if right is None else f"cache_touch={right}",
            )
        )
        if len(found) >= max_keys:
            break
    return found


def _merge(left: Iterator[Record], right: Iterator[Record]) -> Iterator[tuple[str, str, Record | None, Record | None]]:
    """Walk two record streams sorted by (namespace, key) side by side."""
    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        key_a = (a.namespace, a.key) if a is not None else None
        key_b = (b.namespace, b.key) if b is not None else None
        if key_b is None or (key_a is not None and key_a < key_b):
            yield a.namespace, a.key, a, None
            a = next(left, None)
        elif key_a is None or key_b < key_a:
            yield b.namespace, b.key, None, b
            b = next(right, None)
        else:
            yield a.namespace, a.key, a, b
            a, b = next(left, None), next(right, None)


_canonical = msgspec.msgpack.Encoder(order="sorted")


def _encoded(record: Record) -> bytes:
    # The digest's own encoding: a tuple and a list of the same items are equal.
    return _canonical.encode((record.value, record.meta))


def _shorten(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _show_value(value: Any) -> str:
    return _shorten("value=" + json.dumps(msgspec.to_builtins(value), default=repr))


def _show_difference(left: Record, right: Record) -> tuple[str, str]:
    """Describe what differs between two records of one key: the value, and each differing `Meta` field."""
    rebuilt: list[str] = []
    live: list[str] = []
    if _canonical.encode(left.value) != _canonical.encode(right.value):
        rebuilt.append(_show_value(left.value))
        live.append(_show_value(right.value))
    for field in left.meta.__struct_fields__:
        ours, theirs = getattr(left.meta, field), getattr(right.meta, field)
        if _canonical.encode(ours) != _canonical.encode(theirs):
            rebuilt.append(f"{field}={json.dumps(msgspec.to_builtins(ours))}")
            live.append(f"{field}={json.dumps(msgspec.to_builtins(theirs))}")
    return _shorten(", ".join(rebuilt)), _shorten(", ".join(live))


# ----------------------------------------------------------- points in time


def parse_time(text: str) -> int:
    """Return Unix milliseconds for an ISO 8601 time or a number of Unix milliseconds.

    An ISO time without a UTC offset is taken as UTC, because the log's
    timestamps are UTC. Raises ValueError on anything else.
    """
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(
            f"time {text!r} is invalid: use ISO 8601 (2024-05-01T12:00:00Z) or Unix milliseconds (1714564800000)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def seq_at_time(event_log: RedisEventLog, time_ms: int) -> int:
    """Return the seq of the last event with `ts <= time_ms`, 0 when there is none.

    A binary search over the log, one read per step, which is valid because
    the router makes `ts` non-decreasing along the log.
    """
    low, high = 0, event_log.last_seq()
    while low < high:
        middle = (low + high + 1) // 2
        (event,) = event_log.read(middle - 1, 1)
        if (event.ts or 0) <= time_ms:
            low = middle
        else:
            high = middle - 1
    return low


class ViewManifest(msgspec.Struct, frozen=True, kw_only=True):
    """The log position, time and stack shape of a view.

    `as_of` is the requested time (Unix ms) of an `--as-of` view, None for
    `--to-seq`. `now_ms` is the time at which reads of the view check
    expiry: `as_of`, or the timestamp of the event at `seq`.
    """

    name: str
    seq: int
    now_ms: int
    shards: int
    fingerprint: str
    as_of: int | None = None


class ViewShard(msgspec.Struct, frozen=True, kw_only=True):
    """One shard of a view, as built."""

    shard: int
    seq: int
    path: str
    events: int
    base_seq: int
    seconds: float


def view_root(data_dir: str | Path, name: str) -> Path:
    """Return the directory of view `name`; raise `InvalidViewNameError` (a ValueError) for an invalid name."""
    if not _VIEW_NAME.match(name):
        raise InvalidViewNameError(
            f"view name {name!r} is invalid: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return Path(data_dir) / "views" / name


def build_view_shard(
    target: ReplayTarget, name: str, shard: int, seq: int, *, progress: Callable[[int], None] | None = None
) -> ViewShard:
    """Write shard `shard`'s state at `seq` into view `name`.

    Files of the view at another seq stay until `write_view_manifest`
    switches the view to `seq`, so readers of the old view are not broken.
    """
    target.check_shard(shard)
    root = view_root(target.data_dir, name)
    replayed = replay_shard(
        target.event_log(),
        shard=shard,
        shards=target.shards,
        policy=target.policy,
        until_seq=seq,
        snapshots=target.snapshots,
        progress=progress,
    )
    path = write_snapshot(root, replayed.snapshot())
    return ViewShard(
        shard=shard,
        seq=seq,
        path=str(path),
        events=replayed.events,
        base_seq=replayed.base_seq,
        seconds=round(replayed.seconds, 3),
    )


def write_view_manifest(target: ReplayTarget, name: str, seq: int, *, as_of: int | None = None) -> ViewManifest:
    """Write `view.json` for a view whose shards are built at `seq`, then delete its files of other seqs.

    From then on the view can be read at `seq`.
    """
    root = view_root(target.data_dir, name)
    now_ms = as_of if as_of is not None else event_ts(target.event_log(), seq)
    manifest = ViewManifest(name=name, seq=seq, now_ms=now_ms, shards=target.shards, fingerprint=target.fingerprint, as_of=as_of)
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / ".view.json.tmp"
    temporary.write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    temporary.replace(root / "view.json")
    for shard in range(target.shards):
        for watermark, path in list_snapshots(root, shard):
            if watermark != seq:
                path.unlink(missing_ok=True)
    log.info("replay.view.ready", view=name, seq=seq, now_ms=now_ms, path=str(root))
    return manifest


def read_view_manifest(data_dir: str | Path, name: str) -> ViewManifest:
    path = view_root(data_dir, name) / "view.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=ViewManifest)
    except FileNotFoundError:
        raise ViewNotFoundError(
            f"view {name!r} does not exist in {data_dir}: build it with `tiermem replay --to-seq N --view {name}`"
        ) from None


class _ViewShardIndex:
    """The records of one view shard by namespace, each with the tier it is in."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.namespaces: dict[str, dict[str, tuple[str, Record]]] = {}
        for tier in TIER_NAMES:
            for record in snapshot.tiers[tier]:
                self.namespaces.setdefault(record.namespace, {})[record.key] = (tier, record)


@functools.lru_cache(maxsize=8)
def _cached_index(path: str, mtime_ns: int, size: int) -> _ViewShardIndex:
    # Keyed on mtime and size too, so a view built again is read again.
    return _ViewShardIndex(read_snapshot(path))


def _view_records(data_dir: str | Path, name: str, namespace: str) -> tuple[ViewManifest, dict[str, tuple[str, Record]]]:
    """Return the view's manifest and the records of `namespace` by key."""
    manifest = read_view_manifest(data_dir, name)
    shard = shard_of(namespace, manifest.shards)
    path = view_root(data_dir, name) / f"shard-{shard}" / f"{manifest.seq:020d}.snap"
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ViewNotFoundError(f"view {name!r} has no file for shard {shard} ({path}): build the view again") from None
    index = _cached_index(str(path), stat.st_mtime_ns, stat.st_size)
    return manifest, index.namespaces.get(namespace, {})


def _served(tier: str, record: Record) -> str:
    # A record whose cache_touch is set was in the cache, which serves it first.
    return "cache" if record.meta.cache_touch else tier


def view_get(data_dir: str | Path, view: str, namespace: str, key: str) -> Value | NotFound:
    """Return what a `Get` of the key would have returned at the view's point.

    The reply's `seq` is the view's position. Nothing is recorded, so the
    view does not change. A record expired at the view's time is NotFound.
    """
    manifest, records = _view_records(data_dir, view, namespace)
    found = records.get(key)
    if found is None or _expired(found[1], manifest.now_ms):
        return NotFound(seq=manifest.seq, key=key)
    tier, record = found
    return Value(
        seq=manifest.seq,
        key=key,
        value=record.value,
        tier=_served(tier, record),
        importance=record.meta.importance,
        tags=list(record.meta.tags),
    )


def _expired(record: Record, now_ms: int) -> bool:
    return record.meta.expires_ts is not None and now_ms >= record.meta.expires_ts


def _words(value: Any) -> Iterator[str]:
    """Yield the case-folded words of every string inside a value (dict values, list items)."""
    if isinstance(value, str):
        yield from _WORD.findall(value.casefold())
    elif isinstance(value, dict):
        for item in value.values():
            yield from _words(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _words(item)


def _first_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return ""
    for item in items:
        text = _first_text(item)
        if text:
            return text
    return ""


def view_search(data_dir: str | Path, view: str, namespace: str, query: str, limit: int = 10) -> Results:
    """Search the memories of `namespace` as they were at the view's point.

    A plain word match, not the search projection's ranking. The query and
    every string inside a value are split into case-folded words (`\\w+`).
    A memory matches when it contains every query word, and its score is
    the number of its words that are query words. Hits are sorted by score,
    then key; expired memories are left out.
    """
    wanted = set(_WORD.findall(query.casefold()))
    manifest, records = _view_records(data_dir, view, namespace)
    hits: list[SearchHit] = []
    for tier, record in records.values() if wanted else ():
        if _expired(record, manifest.now_ms):
            continue
        words = list(_words(record.value))
        if not wanted.issubset(words):
            continue
        score = float(sum(1 for word in words if word in wanted))
        snippet = _first_text(record.value)[:160]
        hits.append(SearchHit(key=record.key, tier=_served(tier, record), score=score, snippet=snippet))
    hits.sort(key=lambda hit: (-hit.score, hit.key))
    return Results(seq=manifest.seq, index_seq=manifest.seq, hits=hits[:limit])


def discard_view(data_dir: str | Path, view: str) -> bool:
    """Delete view `view`; return False when it did not exist."""
    root = view_root(data_dir, view)
    if not root.exists():
        return False
    shutil.rmtree(root)
    _cached_index.cache_clear()
    log.info("replay.view.discarded", view=view, path=str(root))
    return True


# ----------------------------------------------------------- apply


def check_router_stopped(data_dir: str | Path) -> None:
    """Raise ReplayError when the router of `data_dir` is running.

    A local rebuild writes the tiers directly, so the live shards must not
    apply anything at the same time. The check reads the router's PID from
    `DIR/endpoints.json`, which `tiermem up` removes when it stops.
    """
    path = Path(data_dir) / "endpoints.json"
    try:
        pid = json.loads(path.read_text()).get("router_pid")
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if not isinstance(pid, int):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # The process exists but belongs to another user.
    raise ReplayError(
        f"the router (pid {pid}, from {path}) is running: stop it before a local rebuild, "
        "or run `tiermem replay --apply` without --local to rebuild through the router"
    )


def apply_local(target: ReplayTarget, shard: int) -> RecoveryReport:
    """Rebuild the live tiers of `shard` from its newest snapshot and the log, in this process.

    The router must be stopped (see `check_router_stopped`).
    """
    target.check_shard(shard)
    host = build_shard(target.shard_settings(shard))
    try:
        return host.rebuild()
    finally:
        host.close()
