"""Crypto-shredding: stored values are encrypted in the log under keys a Forget destroys.

The log is append-only, so a Forget cannot delete the `Store` entries that
came before it. Instead every `Store` is written to the log sealed: its value
and tags are encrypted with AES-256-GCM under a data key that belongs to its
namespace, key and epoch. A Forget destroys the data keys of everything it
forgets, and from then on the old entries cannot be decrypted by anyone:
readers of the log get the `Store` back with its value replaced by None and
its tags by an empty list (the placeholder), and replay treats the memory as
forgotten.

The epoch of a key is the sequence number of the latest Forget that covered
it (a Forget of the key or of its whole namespace), 0 when there was none, so
a Store after a Forget gets a fresh data key and never reuses a destroyed one.
An unconditional Forget destroys its data keys in the same atomic log append
that records it. A conditional Forget (with `expected_version`) is decided
by its shard, which destroys the keys with `DataKeys.shred` before it commits.

Every Forget that took effect is also written to the forget ledger, a sorted
set by sequence number, which snapshot scrubbing reads: a snapshot taken
before a Forget still contains the plaintext it forgot, and is rewritten.

What stays: namespace and key names, the epochs, the ledger, and the fact that
a Store happened with its size, time and metadata. What goes: the value and
the tags. Layout in the log's Redis, for prefix P and a namespace N of
length L:

    P:k:L:N:KEY   hash    "e" -> the key's epoch; "<epoch>" -> data key (256 bits, hex)
    P:n:L:N       set     the keys of N that have a data key hash
    P:ns          hash    N -> the namespace's epoch
    P:forgets     zset    JSON [seq, N, KEY or null], scored by seq
    P:shredded    counter incremented by every destruction
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from events.types import Event, Forget, Store
from events.upcast import needs_upcast, upcast

__all__ = ["DataKeys", "ForgetRecord", "SealPlan", "SealedStore", "open_sealed", "seal"]

_KEY_BYTES = 32
_NONCE_BYTES = 12

# Operation codes of the append script (see events.log): one new data key,
# one key Forget, one namespace Forget.
OP_NEW_KEY = 1
OP_FORGET_KEY = 2
OP_FORGET_NAMESPACE = 3

_encoder = msgspec.msgpack.Encoder()
_plain_decoder = msgspec.msgpack.Decoder(tuple[Any, list[str]])
_ledger_decoder = msgspec.json.Decoder(tuple[int, str, str | None])


class SealedStore(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="SealedStore"):
    """The log form of a `Store`: every field in clear except the value and tags.

    `box` is the AES-GCM ciphertext of the MessagePack array [value, tags],
    with the namespace, key, epoch and seq as associated data, so a box moved
    to another entry fails to open. `size` is the plaintext's length.
    """

    id: str | None = None
    v: int
    namespace: str
    seq: int
    ts: int
    key: str
    importance: float
    ttl_s: int | None = None
    expected_version: int | None = None
    epoch: int
    nonce: bytes
    box: bytes
    size: int


class ForgetRecord(msgspec.Struct, frozen=True, array_like=True):
    """One Forget that took effect, as a ledger entry; `key` None means the whole namespace."""

    seq: int
    namespace: str
    key: str | None


class SealPlan:
    """The sealed encodings of one batch and the key-store writes that must go with them.

    Built by `DataKeys.plan` and applied by the log's append script. The
    router's cache of data keys changes only after the append succeeded
    (`DataKeys.commit`), so a failed append leaves the cache as it was.
    """

    __slots__ = ("sealed", "ops", "_keys", "_namespaces", "_forgotten_namespaces")

    def __init__(self) -> None:
        self.sealed: dict[int, bytes] = {}
        self.ops: list[list[Any]] = []
        self._keys: dict[tuple[str, str], _KeyState] = {}
        self._namespaces: dict[str, int] = {}
        self._forgotten_namespaces: set[str] = set()

    def script_argument(self) -> bytes:
        return _encoder.encode(self.ops) if self.ops else b""


class _KeyState:
    """The router's cached state of one (namespace, key): its epoch and its live data keys."""

    __slots__ = ("epoch", "ciphers")

    def __init__(self, epoch: int, ciphers: dict[int, AESGCM]) -> None:
        self.epoch = epoch
        self.ciphers = ciphers


def _length_prefixed(namespace: str) -> str:
    return f"{len(namespace)}:{namespace}"


def _ledger_entry(record: ForgetRecord) -> str:
    return msgspec.json.encode(record).decode()


def _aad(namespace: str, key: str, epoch: int, seq: int) -> bytes:
    return _encoder.encode([namespace, key, epoch, seq])


def seal(event: Store, epoch: int, cipher: AESGCM) -> bytes:
    """Return the log encoding of `event` with its value and tags encrypted."""
    if event.seq is None or event.ts is None:
        raise ValueError("a Store must carry seq and ts before it is sealed")
    plaintext = _encoder.encode([event.value, event.tags])
    nonce = os.urandom(_NONCE_BYTES)
    box = cipher.encrypt(nonce, plaintext, _aad(event.namespace, event.key, epoch, event.seq))
    return _encoder.encode(
        SealedStore(
            id=event.id,
            v=event.v,
            namespace=event.namespace,
            seq=event.seq,
            ts=event.ts,
            key=event.key,
            importance=event.importance,
            ttl_s=event.ttl_s,
            expected_version=event.expected_version,
            epoch=epoch,
            nonce=nonce,
            box=box,
            size=len(plaintext),
        )
    )


def open_sealed(sealed: SealedStore, data_key: bytes | None) -> Store:
    """Return the `Store` inside `sealed`, or its placeholder when the data key is gone."""
    value: Any = None
    tags: list[str] = []
    if data_key is not None:
        try:
            plaintext = AESGCM(data_key).decrypt(
                sealed.nonce, sealed.box, _aad(sealed.namespace, sealed.key, sealed.epoch, sealed.seq)
            )
        except InvalidTag:
            pass  # A data key of the same name made after a Forget: the value is gone.
        else:
            value, tags = _plain_decoder.decode(plaintext)
    fields = {
        "type": "Store",
        "id": sealed.id,
        "v": sealed.v,
        "namespace": sealed.namespace,
        "seq": sealed.seq,
        "ts": sealed.ts,
        "key": sealed.key,
        "value": value,
        "importance": sealed.importance,
        "tags": tags,
        "ttl_s": sealed.ttl_s,
        "expected_version": sealed.expected_version,
    }
    if needs_upcast("Store", sealed.v):
        fields = upcast(fields)
    return msgspec.convert(fields, Store)


class DataKeys:
    """The key store in the log's Redis: data keys per (namespace, key, epoch), and the forget ledger.

    The router owns one instance and is the only writer of new keys. Any
    process may read keys, shred for a conditional Forget, and read the
    ledger. The router's cache keeps at most `cache_size` keys' states.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "tiermem:dk", cache_size: int = 65536) -> None:
        self.client = client
        self.prefix = prefix
        self.cache_size = cache_size
        self._keys: OrderedDict[tuple[str, str], _KeyState] = OrderedDict()
        self._namespaces: OrderedDict[str, int] = OrderedDict()
        self._shred_script = client.register_script(_SHRED_SCRIPT)

    # ------------------------------------------------------------ names

    def key_hash(self, namespace: str, key: str) -> str:
        return f"{self.prefix}:k:{_length_prefixed(namespace)}:{key}"

    def namespace_set(self, namespace: str) -> str:
        return f"{self.prefix}:n:{_length_prefixed(namespace)}"

    @property
    def namespace_epochs(self) -> str:
        return f"{self.prefix}:ns"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}:forgets"

    @property
    def shredded(self) -> str:
        return f"{self.prefix}:shredded"

    def script_keys(self) -> list[str]:
        """Keys of the append script besides the stream and id index."""
        return [self.namespace_epochs, self.ledger, self.shredded]

    # ------------------------------------------------------------ writing (the router)

    def plan(self, events: Sequence[Event]) -> SealPlan:
        """Seal the batch's Stores and collect the key-store writes, in sequence order."""
        plan = SealPlan()
        self._load(plan, events)
        for index, event in enumerate(events):
            if isinstance(event, Store):
                state = self._state(plan, event.namespace, event.key)
                epoch = max(state.epoch, self._namespace_epoch(plan, event.namespace))
                cipher = state.ciphers.get(epoch)
                if cipher is None:
                    material = AESGCM.generate_key(bit_length=_KEY_BYTES * 8)
                    cipher = AESGCM(material)
                    state.ciphers[epoch] = cipher
                    plan.ops.append([
                        OP_NEW_KEY,
                        self.key_hash(event.namespace, event.key),
                        self.namespace_set(event.namespace),
                        event.key,
                        str(epoch),
                        material.hex(),
                    ])
                plan.sealed[index] = seal(event, epoch, cipher)
            elif isinstance(event, Forget):
                seq = event.seq or 0
                if event.key is None:
                    plan._namespaces[event.namespace] = seq
                    plan._forgotten_namespaces.add(event.namespace)
                    # Keys already in the plan lose their data keys too.
                    for (namespace, _), state in plan._keys.items():
                        if namespace == event.namespace:
                            state.ciphers.clear()
                    plan.ops.append([
                        OP_FORGET_NAMESPACE,
                        event.namespace,
                        self.namespace_set(event.namespace),
                        f"{self.prefix}:k:{_length_prefixed(event.namespace)}:",
                        str(seq),
                        _ledger_entry(ForgetRecord(seq, event.namespace, None)),
                    ])
                else:
                    state = self._state(plan, event.namespace, event.key)
                    destroy = event.expected_version is None
                    if destroy:
                        state.ciphers = {epoch: c for epoch, c in state.ciphers.items() if epoch >= seq}
                    state.epoch = seq
                    plan.ops.append([
                        OP_FORGET_KEY,
                        self.key_hash(event.namespace, event.key),
                        str(seq),
                        1 if destroy else 0,
                        _ledger_entry(ForgetRecord(seq, event.namespace, event.key)),
                    ])
        return plan

    def commit(self, plan: SealPlan) -> None:
        """Take the plan's key states into the cache, after its append succeeded."""
        for namespace in plan._forgotten_namespaces:
            for cached in [item for item in self._keys if item[0] == namespace]:
                if cached not in plan._keys:
                    del self._keys[cached]
            forgotten_at = plan._namespaces[namespace]
            for item, state in plan._keys.items():
                if item[0] == namespace:
                    state.ciphers = {epoch: c for epoch, c in state.ciphers.items() if epoch >= forgotten_at}
        for item, state in plan._keys.items():
            self._keys[item] = state
            self._keys.move_to_end(item)
        for namespace, epoch in plan._namespaces.items():
            self._namespaces[namespace] = epoch
            self._namespaces.move_to_end(namespace)
        while len(self._keys) > self.cache_size:
            self._keys.popitem(last=False)
        while len(self._namespaces) > self.cache_size:
            self._namespaces.popitem(last=False)

    def forget_cache(self) -> None:
        """Drop every cached data key (after a failed append whose outcome is unknown)."""
        self._keys.clear()
        self._namespaces.clear()

    def _load(self, plan: SealPlan, events: Sequence[Event]) -> None:
        """Fetch, in one round trip, the states of the batch's keys the cache lacks."""
        keys: list[tuple[str, str]] = []
        namespaces: list[str] = []
        for event in events:
            if isinstance(event, (Store, Forget)):
                if event.namespace not in self._namespaces and event.namespace not in namespaces:
                    namespaces.append(event.namespace)
                if event.key is not None:
                    item = (event.namespace, event.key)
                    if item not in self._keys and item not in keys:
                        keys.append(item)
        if not keys and not namespaces:
            return
        pipeline = self.client.pipeline(transaction=False)
        for namespace, key in keys:
            pipeline.hgetall(self.key_hash(namespace, key))
        if namespaces:
            pipeline.hmget(self.namespace_epochs, namespaces)
        results = pipeline.execute()
        for item, fields in zip(keys, results, strict=False):
            epoch = int(fields.pop(b"e", 0))
            ciphers = {int(name): AESGCM(bytes.fromhex(material.decode())) for name, material in fields.items()}
            plan._keys[item] = _KeyState(epoch, ciphers)
        if namespaces:
            for namespace, epoch in zip(namespaces, results[-1], strict=True):
                plan._namespaces[namespace] = int(epoch or 0)

    def _state(self, plan: SealPlan, namespace: str, key: str) -> _KeyState:
        item = (namespace, key)
        state = plan._keys.get(item)
        if state is None:
            cached = self._keys[item]
            # Copied, so a failed append leaves the cached state untouched.
            state = _KeyState(cached.epoch, dict(cached.ciphers))
            plan._keys[item] = state
        return state

    def _namespace_epoch(self, plan: SealPlan, namespace: str) -> int:
        if namespace in plan._namespaces:
            return plan._namespaces[namespace]
        return self._namespaces[namespace]

    # ------------------------------------------------------------ shredding (a shard)

    def shred(self, namespace: str, key: str, seq: int) -> None:
        """Destroy the data keys of (namespace, key) older than `seq`, for a conditional Forget at `seq`.

        Idempotent: a shard that applies the Forget again after a crash
        destroys nothing more.
        """
        record = _ledger_entry(ForgetRecord(seq, namespace, key))
        self._shred_script(keys=[self.key_hash(namespace, key), self.ledger, self.shredded], args=[seq, record])

    # ------------------------------------------------------------ reading

    def data_keys(self, wanted: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str, int], bytes | None]:
        """Return the data key of each (namespace, key, epoch), None where it is destroyed.

        Read on every call and never cached, so a reader keeps no data key in
        memory that a Forget destroyed after its read.
        """
        items = list(dict.fromkeys(wanted))
        if not items:
            return {}
        pipeline = self.client.pipeline(transaction=False)
        for namespace, key, epoch in items:
            pipeline.hget(self.key_hash(namespace, key), str(epoch))
        found = pipeline.execute()
        return {item: bytes.fromhex(key.decode()) if key is not None else None for item, key in zip(items, found, strict=True)}

    def forgets_after(self, seq: int) -> list[ForgetRecord]:
        """Return the ledger's Forgets with a sequence number above `seq`, in order."""
        members = self.client.zrangebyscore(self.ledger, f"({seq}", "+inf")
        records = [ForgetRecord(*_ledger_decoder.decode(member)) for member in members]
        return sorted(records, key=lambda record: (record.seq, record.namespace, record.key or ""))

    def prune_ledger(self, through_seq: int) -> int:
        """Delete ledger entries at or below `through_seq`; return how many went."""
        return int(self.client.zremrangebyscore(self.ledger, "-inf", through_seq))

    def shred_count(self) -> int:
        """Return how many destructions ever ran: a cheap "did anything change" check."""
        return int(self.client.get(self.shredded) or 0)


# KEYS: key hash, ledger, counter. ARGV: the Forget's seq, its ledger record.
_SHRED_SCRIPT = """
local seq = tonumber(ARGV[1])
local fields = redis.call('HKEYS', KEYS[1])
for _, field in ipairs(fields) do
  if field ~= 'e' and tonumber(field) < seq then
    redis.call('HDEL', KEYS[1], field)
  end
end
redis.call('ZADD', KEYS[2], seq, ARGV[2])
redis.call('INCR', KEYS[3])
return #fields
"""

# The part of the log's append script that applies a SealPlan's operations,
# in order. Sequence numbers travel as decimal strings: Lua numbers are
# doubles, exact up to 2^53, which is as far as the comparisons here reach. It expects `ops` (the decoded plan), KEYS[3] the namespace epoch
# hash, KEYS[4] the ledger and KEYS[5] the counter.
APPLY_OPS_LUA = """
for _, op in ipairs(ops) do
  local code = op[1]
  if code == 1 then
    redis.call('HSETNX', op[2], op[5], op[6])
    redis.call('SADD', op[3], op[4])
  elseif code == 2 then
    redis.call('HSET', op[2], 'e', op[3])
    if op[4] == 1 then
      for _, field in ipairs(redis.call('HKEYS', op[2])) do
        if field ~= 'e' and tonumber(field) < tonumber(op[3]) then
          redis.call('HDEL', op[2], field)
        end
      end
      redis.call('ZADD', KEYS[4], op[3], op[5])
      redis.call('INCR', KEYS[5])
    end
  elseif code == 3 then
    redis.call('HSET', KEYS[3], op[2], op[5])
    for _, member in ipairs(redis.call('SMEMBERS', op[3])) do
      redis.call('DEL', op[4] .. member)
    end
    redis.call('DEL', op[3])
    redis.call('ZADD', KEYS[4], op[5], op[6])
    redis.call('INCR', KEYS[5])
  end
end
"""
