"""Effects: what applying an event did that the event itself does not say.

The log says what was asked; an effect says what happened: which tier
served a `Get`, and every tier move, expiry and eviction made by
maintenance, with its reason. Shards write them to one Redis stream each,
entry `SEQ-N` for the N-th effect of event SEQ, so projections (search,
stats, history) can follow state without rerunning the policy.

Effects are deterministic, like the state: a shard that applies the same
batch again produces the same entries, and the writer skips the ones the
stream already holds. A shard writes a batch's effects before it commits
the batch's STM writes, and readers take only effects at or below the
shard's STM watermark, so they never see the effects of an uncommitted
batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec
import redis

__all__ = ["Effect", "EffectLog", "RedisEffectLog", "effects_stream"]


class Effect(msgspec.Struct, frozen=True, array_like=True):
    """One consequence of one event on one key.

    kind `read`: `tier` served the `Get` (`cache`, `stm`, `im`, `ltm`), or
    None when nothing was found; `client` is the request id.
    kind `move`: the record went from `tier` to `target` for `reason`
    (`idle` or `capacity`).
    kind `delete`: maintenance removed the record from `tier` for `reason`
    (`expired` or `evicted`).
    kind `conflict`: a conditional `Store` or `Forget` changed nothing;
    `reason` is `EXPECTED:ACTUAL` (the two versions) and `client` the request id.
    """

    seq: int
    kind: str
    namespace: str
    key: str
    tier: str | None = None
    target: str | None = None
    reason: str | None = None
    client: str | None = None


class EffectLog(Protocol):
    """The store that shards write their effects to."""

    def append(self, shard: int, effects: Sequence[Effect]) -> None:
        """Write effects in (seq, position) order, skipping those already written."""
        ...

    def read(self, shard: int, after_seq: int, until_seq: int) -> list[Effect]:
        """Return the effects of events in (after_seq, until_seq], in order."""
        ...

    def reset(self, shard: int) -> None:
        """Delete a shard's effects, before it rebuilds under another policy."""
        ...


def effects_stream(shard: int) -> str:
    return f"tiermem:effects:{shard}"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Effect)


class RedisEffectLog:
    """Effects in one Redis stream per shard, in the log's Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._last: dict[int, tuple[int, int]] = {}

    def _last_id(self, shard: int) -> tuple[int, int]:
        if shard not in self._last:
            entries = self.client.xrevrange(effects_stream(shard), count=1)
            if entries:
                seq, position = entries[0][0].split(b"-")
                self._last[shard] = (int(seq), int(position))
            else:
                self._last[shard] = (0, -1)
        return self._last[shard]

    def append(self, shard: int, effects: Sequence[Effect]) -> None:
        if not effects:
            return
        last = self._last_id(shard)
        pipe = self.client.pipeline(transaction=True)
        position = -1
        previous_seq = -1
        newest = last
        for effect in effects:
            position = position + 1 if effect.seq == previous_seq else 0
            previous_seq = effect.seq
            entry = (effect.seq, position)
            if entry <= last:
                continue
            pipe.xadd(effects_stream(shard), {b"f": _encoder.encode(effect)}, id=f"{effect.seq}-{position}")
            newest = entry
        if newest == last:
            return
        pipe.execute()
        self._last[shard] = newest

    def reset(self, shard: int) -> None:
        self.client.delete(effects_stream(shard))
        self._last.pop(shard, None)

    def read(self, shard: int, after_seq: int, until_seq: int) -> list[Effect]:
        if until_seq <= after_seq:
            return []
        entries = self.client.xrange(effects_stream(shard), min=f"{after_seq + 1}-0", max=f"{until_seq}-{2**63 - 1}")
        return [_decoder.decode(fields[b"f"]) for _, fields in entries]
