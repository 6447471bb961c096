"""One shard: its state machine, the commit protocol over its tiers, and recovery.

Commit protocol. A batch whose writes touch only STM commits in one
MULTI/EXEC that also sets the watermark. A batch that touches IM or LTM first
writes a redo record (every tier's writes and the batch's last sequence
number) to STM's control hash, then commits IM and LTM, each with the new
watermark, and finally commits STM, which deletes the redo record in the same
transaction. A crash anywhere leaves either no redo record (the batch is
fully committed or not at all) or one that recovery finishes, skipping the
tiers whose watermark already covers it.

STM's control hash also records the watermark it expects IM and LTM to have.
If a tier comes back from a crash with another watermark (its Redis lost
writes, its file was replaced), the shard cannot trust the tiers to agree,
and it rebuilds them: from the newest valid snapshot in `snapshot_dir` when
there is one, and from the log after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from pathlib import Path

import hashlib
import threading
import time
import weakref

import msgspec
import structlog

from events.log import EventLog
from handlers.effects import EffectLog
from events.errors import ErrorCode
from events.types import Ack, Conflict, Error, Event, Forget, Get, Maintain, Message, NotFound, Store, TierDigest
from handlers.policy import Policy
from handlers.sharding import shard_of
from handlers.state import ShardState
from tiers.base import TIER_NAMES, Tier, TierWrites
from tiers.pools import PoolStats, TierPools
from tiers.snapshot import Snapshot, load_into_tiers, newest_valid

__all__ = ["RecoveryReport", "Shard", "answered_by_shard"]

log = structlog.get_logger("tiermem.shard")

_REDO = "redo"
_POLICY = "policy"


def _resume_loop(reference: weakref.ref[Shard], closed: threading.Event) -> None:
    """Retry a paused shard's recovery with backoff until it resumes, closes or is dropped."""
    shard = reference()
    delay = shard.resume_initial_s if shard is not None else 0.0
    del shard
    while not closed.wait(delay):
        shard = reference()
        if shard is None:
            return
        with shard._lock:
            if not shard._paused or shard._try_resume():
                return
        delay = min(delay * 2, shard.resume_max_s)
        del shard


def answered_by_shard(event: Event) -> bool:
    """Return whether the reply to `event` comes from the shard, after it is applied."""
    if isinstance(event, Get):
        return True
    return isinstance(event, (Store, Forget)) and event.expected_version is not None


class _Redo(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    writes: dict[str, TierWrites]
    expected: dict[str, int]


class RecoveryReport(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a shard's recovery: redo, rebuild, and events replayed.

    `snapshot_seq` is the watermark of the snapshot a rebuild started from,
    None when it started from empty tiers.
    """

    shard: int
    redo_finished: bool
    rebuilt: bool
    reason: str | None
    loaded_watermark: int
    replayed: int
    watermark: int
    seconds: float
    snapshot_seq: int | None = None


_redo_encoder = msgspec.msgpack.Encoder()
_cache_encoder = msgspec.msgpack.Encoder()
_redo_decoder = msgspec.msgpack.Decoder(_Redo)


class Shard:
    """A shard's tiers plus its state machine; hosted by a Ray actor or in process."""

    def __init__(
        self,
        shard: int,
        shards: int,
        tiers: Mapping[str, Tier],
        policy: Policy,
        event_log: EventLog | None = None,
        effect_log: EffectLog | None = None,
        *,
        snapshot_dir: str | Path | None = None,
        pools: TierPools | None = None,
    ) -> None:
        missing = [name for name in TIER_NAMES if name not in tiers]
        if missing:
            raise ValueError(f"shard {shard} is missing tiers {missing}")
        self.shard = shard
        self.shards = shards
        self.tiers = tiers
        self.policy = policy
        self.log = event_log
        self.effect_log = effect_log
        # Root of this shard's snapshots (`ROOT/shard-<n>/*.snap`), read by rebuilds.
        self.snapshot_dir = snapshot_dir
        # Pools that run a batch's IM and LTM commits in parallel, shut down by
        # close(). With None, the commits run one after the other in the caller.
        self.pools = pools
        self.state = ShardState(shard, policy, tiers)
        self.fingerprint = f"{policy.fingerprint()}:{shards}"
        self._expected = {"im": 0, "ltm": 0}
        self._reset_effects = False
        self._lock = threading.RLock()
        self._paused = False
        self._pause_reason: str | None = None
        self._failed_resumes = 0
        self._resumer: threading.Thread | None = None
        self._closed = threading.Event()
        self.resume_initial_s = 0.25
        self.resume_max_s = 5.0
        # Set while the in-memory state may disagree with the tiers after a
        # failed apply. `apply` reloads before it applies anything else.
        self._reload_pending = False
        # The watermark the tiers hold while `_reload_pending` is set.
        self._committed_watermark = 0
        self.log_tag = structlog.get_logger("tiermem.shard").bind(shard=shard)

    # ----------------------------------------------------------- recovery

    def recover(self) -> RecoveryReport:
        """Finish a pending redo, check the tiers agree, load state, catch up.

        When the tiers disagree, or are empty while the log is not, they are
        cleared and rebuilt from the newest valid snapshot (if any) and the
        log after it.
        """
        with self._lock:
            return self._recover(None)

    def rebuild(self) -> RecoveryReport:
        """Clear the tiers and rebuild them from the newest valid snapshot and the log.

        For tiers that lost data in a way the consistency check of `recover`
        cannot see. Not safe to run while another thread applies to this shard.
        """
        with self._lock:
            report = self._recover("rebuild requested")
            self._paused = False
            return report

    def _recover(self, forced_reason: str | None) -> RecoveryReport:
        started = time.monotonic()
        stm = self.tiers["stm"]

        if forced_reason is None:
            redo_finished = self._finish_redo()
            reason = self._inconsistency()
        else:
            # The tiers are cleared anyway, so a pending redo is not finished.
            redo_finished, reason = False, forced_reason

        rebuilt = reason is not None
        snapshot = self._newest_snapshot() if rebuilt else None
        if rebuilt:
            # A requested rebuild is an operator's decision, not a fault found here.
            emit = self.log_tag.warning if forced_reason is not None else self.log_tag.error
            emit(
                "shard.rebuild.started",
                reason=reason,
                snapshot_seq=snapshot.watermark if snapshot else None,
                next="loading the snapshot and replaying the log after it" if snapshot else "replaying the whole log",
            )
            if self._reset_effects and self.effect_log is not None:
                self.effect_log.reset(self.shard)
                self.log_tag.warning("shard.effects.reset", next="rebuild the projections: delete the projection database and run `tiermem projections run`")
                self._reset_effects = False
            if snapshot is not None:
                self.load_snapshot(snapshot)
            else:
                for tier in self.tiers.values():
                    tier.clear()
                self._expected = {"im": 0, "ltm": 0}
                stm.commit(TierWrites(), 0, {_POLICY: self.fingerprint.encode(), "im_wm": b"0", "ltm_wm": b"0"})

        loaded = stm.watermark()
        self.state.load(loaded)
        self._reload_pending = False
        replayed = self.catch_up()
        report = RecoveryReport(
            shard=self.shard,
            redo_finished=redo_finished,
            rebuilt=rebuilt,
            reason=reason,
            loaded_watermark=loaded,
            replayed=replayed,
            watermark=self.state.watermark,
            seconds=round(time.monotonic() - started, 3),
            snapshot_seq=snapshot.watermark if snapshot else None,
        )
        self.log_tag.info("shard.recovered", **msgspec.structs.asdict(report))
        return report

    def _newest_snapshot(self) -> Snapshot | None:
        if self.snapshot_dir is None:
            return None
        # A snapshot past the log's end reflects events this log does not contain
        # (another log's, or ones a log lost with its tail), so it is passed over.
        last = self.log.last_seq() if self.log is not None else None
        forgets = getattr(self.log, "forgets_after", None)
        return newest_valid(self.snapshot_dir, self.shard, self.fingerprint, max_seq=last, forgets=forgets)

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the tiers' contents with `snapshot` and load the state from it.

        STM gets its control values (policy fingerprint and the IM and LTM
        watermarks it expects) in the last commit of the load, so a crash
        during the load leaves tiers that the next `recover` rebuilds.
        """
        if snapshot.shard != self.shard or snapshot.fingerprint != self.fingerprint:
            raise ValueError(
                f"snapshot of shard {snapshot.shard} with fingerprint {snapshot.fingerprint} "
                f"does not fit shard {self.shard} with fingerprint {self.fingerprint}"
            )
        for tier in self.tiers.values():
            tier.clear()
        watermark = str(snapshot.watermark).encode()
        control = {_POLICY: self.fingerprint.encode(), _REDO: None, "im_wm": watermark, "ltm_wm": watermark}
        load_into_tiers(snapshot, self.tiers, control)
        self._expected = {"im": snapshot.watermark, "ltm": snapshot.watermark}
        self.state.load(snapshot.watermark)
        self._reload_pending = False

    def _finish_redo(self) -> bool:
        stm = self.tiers["stm"]
        raw = stm.control(_REDO)
        if raw is None:
            return False
        redo = _redo_decoder.decode(raw)
        for name in ("im", "ltm"):
            writes = redo.writes.get(name)
            if writes and self.tiers[name].watermark() < redo.seq:
                self.tiers[name].commit(writes, redo.seq)
        stm.commit(redo.writes.get("stm", TierWrites()), redo.seq, self._control(redo.expected))
        self._expected = dict(redo.expected)
        self.log_tag.warning("shard.redo.finished", seq=redo.seq)
        return True

    def _inconsistency(self) -> str | None:
        stm = self.tiers["stm"]
        stored = stm.control(_POLICY)
        has_data = stm.watermark() > 0 or any(self.tiers[name].watermark() > 0 for name in ("im", "ltm"))
        if stored is None:
            if has_data:
                return "STM has no policy fingerprint but tiers hold data"
            last = self.log.last_seq() if self.log is not None else 0
            if last > 0:
                return f"the tiers are empty but the log holds events up to seq {last}"
            stm.commit(TierWrites(), 0, {_POLICY: self.fingerprint.encode(), "im_wm": b"0", "ltm_wm": b"0"})
            return None
        if stored.decode() != self.fingerprint:
            # Effects written under the old policy no longer describe what
            # this shard does, and the writer would skip the new ones.
            self._reset_effects = True
            return f"policy or shard count changed ({stored.decode()} -> {self.fingerprint})"
        for name in ("im", "ltm"):
            expected = int(stm.control(f"{name}_wm") or b"0")
            actual = self.tiers[name].watermark()
            if expected != actual:
                return f"{name} watermark is {actual}, STM expects {expected}"
            self._expected[name] = expected
        return None

    def catch_up(self) -> int:
        """Apply the log's events for this shard after the watermark; return the count."""
        if self.log is None:
            return 0
        applied = 0
        for batch in self.log.iter_from(self.state.watermark):
            mine = [event for event in batch if self.owns(event)]
            if mine:
                self._apply(mine)
                applied += len(mine)
        return applied

    # ----------------------------------------------------------- applying

    def owns(self, event: Event) -> bool:
        if isinstance(event, Maintain):
            return True
        return shard_of(event.namespace, self.shards) == self.shard

    def apply(self, events: Sequence[Event], *, prev_seq: int | None = None) -> list[Message]:
        """Apply a batch in order and commit it; return the replies of its `Get`s.

        A `Get` at or below the watermark was applied before (this is a
        resend after a restart): it is answered from current state without
        recording the access again.

        If a tier (or the log) fails, the shard opens its circuit breaker:
        it stops applying, answers reads from what it can still reach with
        `degraded` set, and retries in the background. The batch's events
        stay in the log, and the shard applies them, in order, when it
        resumes, so nothing is skipped.
        """
        with self._lock:
            if self._paused and not self._try_resume():
                return self._degraded_replies(events)
            try:
                if prev_seq is not None and prev_seq > self.state.watermark and self.log is not None:
                    # A batch before this one never arrived (a call lost while
                    # the actor restarted): apply the log up to here first.
                    self.log_tag.warning("shard.gap.filling", watermark=self.state.watermark, prev_seq=prev_seq, next="applying the log before this batch")
                    self.catch_up()
                return self._apply(events)
            except Exception as error:  # noqa: BLE001 - the breaker retries, the log keeps the events
                self._pause(error)
                return self._degraded_replies(events)

    def _apply(self, events: Sequence[Event]) -> list[Message]:
        if self._reload_pending:
            self._reload()
        replayed = [
            self._replayed_reply(event)
            for event in events
            if answered_by_shard(event) and (event.seq or 0) <= self.state.watermark
        ]
        before = self.state.watermark
        try:
            writes, replies = self.state.apply_batch(events)
            if self.state.watermark > before:
                self._shred(events, before, replies)
                if self.effect_log is not None:
                    # Before the STM commit: readers take effects only up to
                    # the STM watermark, so these stay unseen until then.
                    self.effect_log.append(self.shard, self.state.effects)
                self._commit(writes, self.state.watermark)
        except BaseException:
            # The in-memory state may be ahead of the tiers now, and IM or LTM
            # may contain the batch while STM does not. Loading the tiers as
            # they are would find a moved record in two tiers, so the redo is
            # finished first and a retry starts from what is committed.
            self._reload_pending = True
            self._committed_watermark = before
            self.log_tag.error("shard.apply.failed", watermark=before, next="finishing any redo and reloading state from tiers")
            try:
                self._reload()
            except Exception as error:  # noqa: BLE001 - the next apply retries the reload
                self.log_tag.error("shard.reload.failed", error=repr(error), next="retrying before the next batch")
            raise
        return replayed + replies

    def _shred(self, events: Sequence[Event], before: int, replies: Sequence[Message]) -> None:
        """Destroy the data keys of each conditional Forget of the batch that took effect.

        This runs before the commit, so by the time the Forget's reply is
        sent its values are unreadable in the log. A crash in between applies
        the Forget again, which shreds the same keys again and nothing else. Unconditional
        Forgets were shredded by the router when they were logged.
        """
        data_keys = getattr(self.log, "data_keys", None)
        if data_keys is None:
            return
        conflicts = {reply.seq for reply in replies if isinstance(reply, Conflict)}
        for event in events:
            if (
                isinstance(event, Forget)
                and event.expected_version is not None
                and event.key is not None
                and (event.seq or 0) > before
                and event.seq not in conflicts
            ):
                data_keys.shred(event.namespace, event.key, event.seq or 0)

    # ----------------------------------------------------------- breaker

    @property
    def paused(self) -> bool:
        return self._paused

    def _pause(self, error: BaseException) -> None:
        tier = getattr(error, "tier", None)
        if not self._paused:
            self.log_tag.error(
                "shard.breaker.opened",
                tier=tier,
                error=repr(error),
                watermark=self.state.watermark,
                next="serving degraded reads; applying from the log once the tier answers",
            )
        self._paused = True
        self._pause_reason = f"{tier or 'a tier or the log'} failed: {error}"
        if self._resumer is None or not self._resumer.is_alive():
            # The thread holds only a weak reference, so a shard that is
            # dropped without close() does not keep retrying forever.
            self._resumer = threading.Thread(
                target=_resume_loop, args=(weakref.ref(self), self._closed), name=f"shard-{self.shard}-resume", daemon=True
            )
            self._resumer.start()

    def _try_resume(self) -> bool:
        """Recover from the tiers and the log; return whether the breaker closed."""
        try:
            report = self._recover(None)
        except Exception as error:  # noqa: BLE001 - still down; the loop retries with backoff
            self._failed_resumes += 1
            # Logged on the first failure and then every tenth, so a long
            # outage leaves a line a minute or so rather than one per retry.
            if self._failed_resumes % 10 == 1:
                self.log_tag.info("shard.breaker.still_open", error=repr(error), attempts=self._failed_resumes, next="retrying later")
            return False
        self._failed_resumes = 0
        self._paused = False
        self._pause_reason = None
        self.log_tag.warning("shard.breaker.closed", replayed=report.replayed, rebuilt=report.rebuilt, watermark=report.watermark)
        return True

    def _degraded_replies(self, events: Sequence[Event]) -> list[Message]:
        """Build the replies a paused shard can give: reads from reachable state, flagged degraded."""
        replies: list[Message] = []
        for event in events:
            if isinstance(event, Get):
                try:
                    reply = self.state.peek(event.namespace, event.key, event.seq or 0, event.ts)
                except Exception:  # noqa: BLE001 - the record's tier is the one that is down
                    reply = NotFound(seq=event.seq or 0, key=event.key)
                replies.append(msgspec.structs.replace(reply, id=event.id, degraded=True))
            elif answered_by_shard(event):
                replies.append(
                    Error(
                        id=event.id,
                        code=ErrorCode.UNAVAILABLE,
                        message=f"shard {self.shard} is paused ({self._pause_reason}); the write is logged and will be decided when it resumes: resend with the same id",
                    )
                )
        return replies

    def _reload(self) -> None:
        """Finish a pending redo, then load the state from the committed tiers."""
        self._finish_redo()
        self.state.load(self.tiers["stm"].watermark())
        self._reload_pending = False

    def _replayed_reply(self, event: Event) -> Message:
        """Build the reply to a resent event that this shard has already applied."""
        seq = event.seq or 0
        if isinstance(event, Get):
            reply = self.state.peek(event.namespace, event.key, seq, event.ts)
            return msgspec.structs.replace(reply, id=event.id)
        # A conditional write: its outcome is in the effect stream.
        if self.effect_log is not None:
            for effect in self.effect_log.read(self.shard, seq - 1, seq):
                if effect.kind == "conflict" and effect.key == event.key:
                    expected, actual = (int(part) for part in (effect.reason or "0:0").split(":"))
                    return Conflict(id=event.id, seq=seq, key=event.key, expected_version=expected, actual_version=actual)
        # TODO: without an effect log (in-memory shards) a resent conditional write that conflicted the first time is answered as a duplicate Ack.
        return Ack(id=event.id, seq=seq, duplicate=True)

    def _control(self, expected: Mapping[str, int]) -> dict[str, bytes | None]:
        return {
            _REDO: None,
            "im_wm": str(expected["im"]).encode(),
            "ltm_wm": str(expected["ltm"]).encode(),
        }

    def _commit(self, writes: dict[str, TierWrites], watermark: int) -> None:
        deep = [name for name in ("im", "ltm") if writes[name]]
        expected = dict(self._expected)
        for name in deep:
            expected[name] = watermark
        stm = self.tiers["stm"]
        if deep:
            redo = _Redo(seq=watermark, writes=writes, expected=expected)
            stm.put_control(_REDO, _redo_encoder.encode(redo))
            self._commit_deep(deep, writes, watermark)
        stm.commit(writes["stm"], watermark, self._control(expected))
        self._expected = expected

    def _commit_deep(self, deep: list[str], writes: dict[str, TierWrites], watermark: int) -> None:
        """Commit the IM and LTM writes of a batch whose redo record is durable.

        The commits are independent: the redo record covers each of them, and
        recovery finishes whichever tier's watermark is behind. So they run in
        parallel on their tiers' pools. Every one of them has finished when
        this returns or raises, so no commit runs on while the caller reloads
        or retries. The first failure in tier order is raised.
        """
        if self.pools is None:
            for name in deep:
                self.tiers[name].commit(writes[name], watermark)
            return
        futures: list[Future] = []
        try:
            for name in deep:
                futures.append(self.pools[name].submit(self.tiers[name].commit, writes[name], watermark))
        finally:
            wait(futures)
        for future in futures:
            future.result()

    # ----------------------------------------------------------- inspection

    def digests(self) -> list[TierDigest]:
        """Return the canonical digest of every tier, the cache included."""
        with self._lock:
            return self._digests()

    def _digests(self) -> list[TierDigest]:
        result = []
        # The cache's order is part of its state (it decides evictions), so
        # its digest covers the keys in LRU order with their touch numbers.
        cache = self.state.cache_digest_records()
        digest = hashlib.sha256(_cache_encoder.encode(cache)).hexdigest()
        result.append(TierDigest(shard=self.shard, tier="cache", digest=digest, records=len(cache)))
        for name in TIER_NAMES:
            digest, count = self.tiers[name].digest()
            result.append(TierDigest(shard=self.shard, tier=name, digest=digest, records=count))
        return result

    @property
    def watermark(self) -> int:
        """Return the last seq whose events the tiers hold.

        While a failed batch waits for its reload, the in-memory state may
        be ahead of the tiers, so the watermark is the one before that batch.
        """
        if self._reload_pending:
            return self._committed_watermark
        return self.state.watermark

    def pool_stats(self) -> list[PoolStats]:
        """Return the stats of the tier pools, an empty list without pools."""
        return self.pools.stats() if self.pools is not None else []

    def close(self) -> None:
        """Stop the breaker's retries and the tier pools; close every tier's connections and files."""
        self._closed.set()
        if self.pools is not None:
            # Waits for a commit still running, so no tier is closed under it.
            self.pools.shutdown(wait=True)
        for tier in self.tiers.values():
            try:
                tier.close()
            except Exception as error:  # noqa: BLE001 - closing a tier that is down must not stop the others
                self.log_tag.warning("shard.close.failed", tier=tier.name, error=repr(error), next="closing the other tiers")
