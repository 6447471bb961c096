"""The durable event log: the `EventLog` protocol and its Redis Streams backend.

Each stream entry holds one appended batch and is keyed by the batch's last
sequence number, so the stream's own ordering rejects a batch that does not
grow the log, and the last entry's id is the last sequence number. A hash maps each event id to
its sequence number and body hash. It is written in the same Lua script call
as the entries, so every id in the index is in the log. `trim_ids` removes
the entries of old events, so the ids of the oldest part of the log may be
missing from the index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, Union, runtime_checkable

import msgspec
import redis
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from events.codec import decode_event, encode_event
from events.errors import LogConfigError, LogError
from events.seal import APPLY_OPS_LUA, DataKeys, ForgetRecord, SealedStore, open_sealed
from events.types import AnyEvent, Event
from events.upcast import CURRENT_VERSIONS, needs_upcast

__all__ = ["EventLog", "LoggedId", "RedisEventLog", "check_log_config"]

log = structlog.get_logger("tiermem.log")


class LoggedId(msgspec.Struct, frozen=True, array_like=True):
    """The log position of an event id, and a hash of the body logged under it."""

    seq: int
    body_hash: int


@runtime_checkable
class EventLog(Protocol):
    """An append-only sequence of events numbered 1, 2, 3, …"""

    def last_seq(self) -> int:
        """Return the sequence number of the last event, 0 for an empty log."""
        ...

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        """Return, for each id, where it was logged, or None."""
        ...

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> list[bytes]:
        """Append events that carry consecutive `seq` values, durably, at once.

        Returns each event's MessagePack encoding, for callers that send the
        same bytes on (the PUB socket, the shards).
        """
        ...

    def read(self, after_seq: int, limit: int) -> list[Event]:
        """Return up to `limit` events with `seq > after_seq`, in order."""
        ...

    def iter_from(self, after_seq: int, until_seq: int | None = None) -> Iterator[list[Event]]:
        """Yield the events after `after_seq` (up to `until_seq`) in batches."""
        ...


def check_log_config(client: redis.Redis, *, allow_everysec: bool = False) -> None:
    """Raise `LogConfigError` unless the server keeps every acknowledged event.

    The log needs `appendonly yes` (otherwise a restart loses the log),
    `appendfsync always` (otherwise a crash loses up to a second of
    acknowledged events; `everysec` is accepted only when the operator opts
    in) and `maxmemory-policy noeviction` (otherwise Redis may evict the log).
    """
    try:
        settings = client.config_get("appendonly", "appendfsync", "maxmemory-policy")
    except redis.ResponseError as error:
        raise LogError(
            f"cannot read the log Redis configuration ({error}); tiermem must "
            "check appendonly, appendfsync and maxmemory-policy before it "
            "acknowledges anything, so CONFIG GET must be allowed"
        ) from error

    def setting(name: str) -> str:
        value = settings.get(name, settings.get(name.encode(), b""))
        return value.decode() if isinstance(value, bytes) else str(value)

    if setting("appendonly") != "yes":
        raise LogConfigError(
            "appendonly", setting("appendonly"), "yes",
            "start redis-server with --appendonly yes (or CONFIG SET appendonly yes)",
        )  # fmt: skip
    fsync = setting("appendfsync")
    allowed = ("always", "everysec") if allow_everysec else ("always",)
    if fsync not in allowed:
        raise LogConfigError(
            "appendfsync", fsync, " or ".join(allowed),
            "start redis-server with --appendfsync always; everysec is accepted "
            "only with allow_everysec = true in the stack settings, and can lose one second of "
            "acknowledged events on a crash of the host",
        )  # fmt: skip
    if setting("maxmemory-policy") != "noeviction":
        raise LogConfigError(
            "maxmemory-policy", setting("maxmemory-policy"), "noeviction",
            "start redis-server with --maxmemory-policy noeviction",
        )  # fmt: skip


def _parse_logged(text: bytes) -> LoggedId:
    """Parse an id index value, `SEQ:BODYHASH` in decimal."""
    seq, body_hash = text.split(b":")
    return LoggedId(int(seq), int(body_hash))


def _logged_seq(text: bytes) -> int | None:
    """Return the seq of an id index value, or None if it is not `SEQ:BODYHASH`."""
    seq, separator, _ = text.partition(b":")
    return int(seq) if separator and seq.isdigit() else None


class RedisEventLog:
    """The event log in a Redis Stream, one entry per appended batch.

    Entry `L-0` holds the events `F..L` of one batch (field `f` is F, field
    `e` a MessagePack array of the encoded events), so an append is one
    XADD however many events it carries, and the stream's ordering rejects
    a batch whose last sequence number does not grow. A read of the events
    after seq S starts at the first entry whose id is above S.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "tiermem:log",
        ids_key: str = "tiermem:ids",
        read_batch: int = 5000,
    ) -> None:
        self.client = client
        self.stream = stream
        self.ids_key = ids_key
        self.read_batch = read_batch
        self.data_keys = DataKeys(client, prefix=f"{stream}:dk")
        self._append_script = client.register_script(_APPEND_SCRIPT)
        self._trim_script = client.register_script(_TRIM_IDS_SCRIPT)

    def last_seq(self) -> int:
        entries = self.client.xrevrange(self.stream, count=1)
        if not entries:
            return 0
        entry_id = entries[0][0]
        return int(entry_id.split(b"-")[0])

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        if not ids:
            return []
        found = self.client.hmget(self.ids_key, list(ids))
        return [_parse_logged(item) if item is not None else None for item in found]

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> list[bytes]:
        """Append one batch of consecutive events; return each event's plain encoding.

        The log itself receives every `Store` sealed under its data key
        (see `events.seal`), and the key-store writes of the batch (new data
        keys, keys destroyed by unconditional Forgets) happen in the same
        atomic script as the append. The returned encodings are the plain
        ones, which the router publishes and sends to the shards.
        """
        if not events:
            return []
        first = events[0].seq
        mapping: dict[bytes, bytes] = {}
        encoded: list[bytes] = []
        for offset, (event, body_hash) in enumerate(zip(events, body_hashes, strict=True)):
            if event.seq is None or event.id is None:
                raise ValueError("events must carry seq and id before they are logged")
            if first is None or event.seq != first + offset:
                raise ValueError(f"a batch must carry consecutive seqs; got {event.seq} at offset {offset} after {first}")
            encoded.append(encode_event(event))
            mapping[event.id.encode()] = f"{event.seq}:{body_hash}".encode()
        plan = self.data_keys.plan(events)
        logged = [plan.sealed.get(index, item) for index, item in enumerate(encoded)]
        payload = _batch_encoder.encode([msgspec.Raw(item) for item in logged])
        # The id index travels as one NUL-separated string that the script
        # splits: thousands of separate arguments cost more to send, and ids
        # never contain NUL (the router rejects them).
        index = b"\x00".join(part for item in mapping.items() for part in item)
        arguments = [first, events[-1].seq, payload, index, plan.script_argument(self.data_keys)]
        try:
            self._append_script(keys=[self.stream, self.ids_key, *self.data_keys.script_keys()], args=arguments)
        except redis.ResponseError as error:
            raise LogError(f"appending events {first}..{events[-1].seq} failed: {error}") from error
        except BaseException:
            # The script may or may not have run: the cached data keys are
            # reloaded from Redis before the next append.
            self.data_keys.forget_cache()
            raise
        self.data_keys.commit(plan)
        return encoded

    def forgets_after(self, seq: int) -> list[ForgetRecord]:
        """Return every Forget that took effect after `seq`, from the forget ledger."""
        return self.data_keys.forgets_after(seq)

    def trim_ids(self, before_seq: int, *, batch: int = 1000) -> int:
        """Remove the id index entries whose seq is below `before_seq`; return how many.

        Walks the hash with HSCAN, `batch` entries per call, and deletes each
        batch's old entries in one script call that reads every entry again
        before it deletes it. An entry written during the trim (a concurrent
        append, or an id that an earlier trim removed and a retry logged
        again) has a seq above the log's last seq at the start, so it is
        kept. Raises ValueError when `before_seq` is beyond that last seq
        plus one, because a trim to such a seq could remove those entries.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if before_seq <= 1:
            return 0
        last_seq = self.last_seq()
        if before_seq > last_seq + 1:
            raise ValueError(
                f"before_seq {before_seq} is invalid because the log's last seq is {last_seq}. "
                "Pass at most the last seq plus one, so that entries appended during the trim are kept"
            )
        removed = 0
        cursor = 0
        while True:
            cursor, entries = self.client.hscan(self.ids_key, cursor, count=batch)
            old = []
            for event_id, value in entries.items():
                seq = _logged_seq(value)
                if seq is not None and seq < before_seq:
                    old.append(event_id)
            # HSCAN ignores COUNT for a small hash (listpack encoding) and
            # returns it whole, so the deletions are split to `batch` here.
            for start in range(0, len(old), batch):
                chunk = old[start : start + batch]
                removed += int(self._trim_script(keys=[self.ids_key], args=[before_seq, *chunk]))
            if cursor == 0:
                return removed

    def index(self, events: Sequence[Event], body_hashes: Sequence[int]) -> None:
        """Write the id index entries of events already in the log (repair after a failed append)."""
        mapping = {event.id: f"{event.seq}:{body_hash}" for event, body_hash in zip(events, body_hashes, strict=True) if event.id}
        if mapping:
            self.client.hset(self.ids_key, mapping=mapping)

    def read(self, after_seq: int, limit: int) -> list[Event]:
        events: list[Event] = []
        start = f"{after_seq + 1}-0"
        while len(events) < limit:
            entries = self.client.xrange(self.stream, min=start, count=16)
            if not entries:
                break
            for entry_id, fields in entries:
                for event in _decode_batch(fields[b"e"]):
                    if (event.seq or 0) > after_seq and len(events) < limit:
                        events.append(event)
            last_id = int(entries[-1][0].split(b"-")[0])
            start = f"{last_id + 1}-0"
        return self._open(events)

    def _open(self, events: list[Any]) -> list[Event]:
        """Replace each sealed Store by its plaintext, or by its placeholder if forgotten."""
        sealed = [event for event in events if isinstance(event, SealedStore)]
        if not sealed:
            return events
        keys = self.data_keys.data_keys((item.namespace, item.key, item.epoch) for item in sealed)
        # One cipher per data key for this read: building one costs more than a decryption.
        ciphers = {item: AESGCM(key) for item, key in keys.items() if key is not None}
        return [
            open_sealed(event, ciphers.get((event.namespace, event.key, event.epoch)))
            if isinstance(event, SealedStore)
            else event
            for event in events
        ]

    def iter_from(self, after_seq: int, until_seq: int | None = None) -> Iterator[list[Event]]:
        position = after_seq
        while until_seq is None or position < until_seq:
            limit = self.read_batch
            if until_seq is not None:
                limit = min(limit, until_seq - position)
            batch = self.read(position, limit)
            if not batch:
                return
            position = batch[-1].seq or position
            yield batch


# Append one batch atomically: check that it continues the log densely, then
# XADD it and index its ids. A MULTI/EXEC would run the HSET even when the
# XADD fails (Redis does not roll back), indexing ids that are not logged.
_APPEND_SCRIPT = """
local ops = {}
if ARGV[5] ~= nil and ARGV[5] ~= '' then
  ops = cmsgpack.unpack(ARGV[5])
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_seq = 0
if #last > 0 then
  last_seq = tonumber(string.match(last[1][1], '^(%d+)'))
end
if tonumber(ARGV[1]) ~= last_seq + 1 then
  return redis.error_reply('ERR tiermem log ends at seq ' .. last_seq .. ', batch starts at ' .. ARGV[1])
end
local fields = {}
for part in string.gmatch(ARGV[4], '([^%z]+)') do
  fields[#fields + 1] = part
end
if #fields % 2 ~= 0 then
  return redis.error_reply('ERR tiermem id index has an odd number of parts')
end
-- Every check is above this line: a script that fails after a write keeps
-- that write, so nothing may fail between the XADD and the index.
redis.call('XADD', KEYS[1], ARGV[2] .. '-0', 'f', ARGV[1], 'e', ARGV[3])
for i = 1, #fields, 1000 do
  redis.call('HSET', KEYS[2], unpack(fields, i, math.min(i + 999, #fields)))
end
""" + APPLY_OPS_LUA + """
return last_seq
"""

# Delete the id index entries named in ARGV[2..] whose seq, read again
# inside the script, is below ARGV[1]. Reading again makes a stale HSCAN
# result harmless, because an id that was logged again since has a newer seq.
# Values that do not parse as SEQ:BODYHASH are kept.
_TRIM_IDS_SCRIPT = """
local before = tonumber(ARGV[1])
local old = {}
for i = 2, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    local seq = tonumber(string.match(value, '^(%d+):'))
    if seq and seq < before then
      old[#old + 1] = ARGV[i]
    end
  end
end
local removed = 0
for i = 1, #old, 1000 do
  removed = removed + redis.call('HDEL', KEYS[1], unpack(old, i, math.min(i + 999, #old)))
end
return removed
"""

_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[Union[AnyEvent, SealedStore]])
_raw_batch_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_sealed_decoder = msgspec.msgpack.Decoder(SealedStore)


def _current(item: Any) -> bool:
    if isinstance(item, SealedStore):
        return True  # Its version is checked when it is opened.
    tag = item.__struct_config__.tag
    return not needs_upcast(tag, item.v) and item.v <= CURRENT_VERSIONS[tag]


def _decode_batch(payload: bytes) -> list[Any]:
    """Decode one log entry; entries of older schema versions go through upcasters.

    Sealed Stores come back sealed: `RedisEventLog._open` opens a whole
    read's worth of them with one round trip for their data keys.
    """
    try:
        events = _batch_decoder.decode(payload)
    except msgspec.ValidationError:
        events = None
    if events is not None and all(_current(event) for event in events):
        return events
    decoded: list[Any] = []
    for raw in _raw_batch_decoder.decode(payload):
        try:
            decoded.append(_sealed_decoder.decode(raw))
        except msgspec.ValidationError:
            decoded.append(decode_event(bytes(raw)))
    return decoded
