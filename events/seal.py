"""Crypto-shredding: stored values are encrypted in the log under keys a Forget destroys.

The log is append-only, so a Forget cannot delete the `Store` entries that
came before it. Instead every `Store` is written to the log sealed: its value
and tags are encrypted with AES-256-GCM under a data key that belongs to its
namespace, key and epoch. A Forget destroys the data keys of every value it
removes, and from then on the old entries cannot be decrypted by anyone:
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
length L (KEY never contains NUL, written \0 here):

    P:n:L:N       hash    "s\0KEY" -> "EPOCH[,LIVE...]": the key's epoch and
                          the epochs whose data keys still exist;
                          "m\0KEY\0EPOCH" -> data key (256 bits, hex)
    P:ns          hash    N -> the namespace's epoch
    P:forgets     zset    JSON [seq, N, KEY or null], scored by seq
    P:shredded    counter incremented by every destruction

One hash per namespace keeps a batch's key-store writes to a few commands
per namespace, and a Forget of a namespace to one UNLINK.
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


class _KeyState:
    """The router's cached state of one (namespace, key): its epoch and its live data keys."""

    __slots__ = ("epoch", "ciphers")

    def __init__(self, epoch: int, ciphers: dict[int, AESGCM]) -> None:
        self.epoch = epoch
        self.ciphers = ciphers

    def field(self) -> str:
        """Return the state field's value: the epoch, then each live epoch."""
        return ",".join(str(epoch) for epoch in (self.epoch, *sorted(self.ciphers)))


class SealPlan:
    """The sealed encodings of one batch and the key-store writes that must go with them.

    Built by `DataKeys.plan` and applied by the log's append script. The
    router's cache of data keys changes only after the append succeeded
    (`DataKeys.commit`), so a failed append leaves the cache as it was.
    """

    __slots__ = ("sealed", "_keys", "_namespaces", "_forgotten", "_new", "_destroyed", "_ledger")

    def __init__(self) -> None:
        self.sealed: dict[int, bytes] = {}
        self._keys: dict[tuple[str, str], _KeyState] = {}
        # Namespace epochs set by this batch, and the namespaces it forgot.
        self._namespaces: dict[str, int] = {}
        self._forgotten: dict[str, int] = {}
        # Data keys made by this batch (hex), and fields it destroys, per namespace.
        self._new: dict[tuple[str, str, int], str] = {}
        self._destroyed: dict[str, set[str]] = {}
        self._ledger: list[tuple[int, str]] = []

    def script_argument(self, data_keys: DataKeys) -> bytes:
        """Return the batch's key-store writes, MessagePack for the append script."""
        if not self._keys and not self._namespaces and not self._ledger:
            return b""
        writes: dict[str, list[str]] = {namespace: [] for namespace in self._forgotten}
        for (namespace, key), state in self._keys.items():
            forgotten_at = self._forgotten.get(namespace)
            if forgotten_at is not None and not state.ciphers and state.epoch <= forgotten_at:
                writes.setdefault(namespace, [])
                continue  # The namespace epoch alone describes this key.
            writes.setdefault(namespace, []).extend((_state_field(key), state.field()))
        for (namespace, key, epoch), material in self._new.items():
            writes[namespace].extend((_material_field(key, epoch), material))
        per_namespace = []
        for namespace, fields in writes.items():
            forgotten = namespace in self._forgotten
            destroyed = [] if forgotten else sorted(self._destroyed.get(namespace, ()))
            per_namespace.append([data_keys.namespace_hash(namespace), 1 if forgotten else 0, destroyed, fields])
        epochs = [[namespace, str(epoch)] for namespace, epoch in self._namespaces.items()]
        ledger = [[str(seq), record] for seq, record in self._ledger]
        return _encoder.encode([per_namespace, epochs, ledger])


def _state_field(key: str) -> str:
    return f"s\x00{key}"


def _material_field(key: str, epoch: int) -> str:
    return f"m\x00{key}\x00{epoch}"


def _parse_state(text: bytes) -> tuple[int, list[int]]:
    epoch, *live = (int(part) for part in text.split(b","))
    return epoch, live


def _length_prefixed(namespace: str) -> str:
    return f"{len(namespace)}:{namespace}"


def _ledger_entry(record: ForgetRecord) -> str:
    return msgspec.json.encode(record).decode()


def _aad(namespace: str, key: str, epoch: int, seq: int) -> bytes:
    return _encoder.encode([namespace, key, epoch, seq])


def seal(event: Store, epoch: int, cipher: AESGCM, nonce: bytes | None = None) -> bytes:
    """Return the log encoding of `event` with its value and tags encrypted.

    `nonce` is 12 random bytes, drawn here when not given; a nonce must
    never repeat under one data key.
    """
    if event.seq is None or event.ts is None:
        raise ValueError("a Store must carry seq and ts before it is sealed")
    plaintext = _encoder.encode([event.value, event.tags])
    if nonce is None:
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


def open_sealed(sealed: SealedStore, data_key: bytes | AESGCM | None) -> Store:
    """Return the `Store` inside `sealed`, or its placeholder when the data key is gone.

    `data_key` may be given as an `AESGCM` built from it, which a caller
    opening many entries of one key reuses.
    """
    value: Any = None
    tags: list[str] = []
    if data_key is not None:
        cipher = data_key if isinstance(data_key, AESGCM) else AESGCM(data_key)
        try:
            plaintext = cipher.decrypt(sealed.nonce, sealed.box, _aad(sealed.namespace, sealed.key, sealed.epoch, sealed.seq))
        except InvalidTag:
            pass  # A data key of the same name made after a Forget: the value is gone.
        else:
            value, tags = _plain_decoder.decode(plaintext)
    if not needs_upcast("Store", sealed.v):
        return Store(
            id=sealed.id,
            v=sealed.v,
            namespace=sealed.namespace,
            seq=sealed.seq,
            ts=sealed.ts,
            key=sealed.key,
            value=value,
            importance=sealed.importance,
            tags=tags,
            ttl_s=sealed.ttl_s,
            expected_version=sealed.expected_version,
        )
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
    return msgspec.convert(upcast(fields), Store)


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

    def namespace_hash(self, namespace: str) -> str:
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
        # Randomness for the whole batch in one call: one nonce per Store,
        # and at most one new data key per Store.
        stores = sum(1 for event in events if isinstance(event, Store))
        random = os.urandom(stores * (_NONCE_BYTES + _KEY_BYTES))
        nonces = memoryview(random)[: stores * _NONCE_BYTES]
        materials = memoryview(random)[stores * _NONCE_BYTES :]
        drawn = 0
        for index, event in enumerate(events):
            if isinstance(event, Store):
                state = self._state(plan, event.namespace, event.key)
                epoch = max(state.epoch, self._namespace_epoch(plan, event.namespace))
                cipher = state.ciphers.get(epoch)
                if cipher is None:
                    material = bytes(materials[drawn * _KEY_BYTES : (drawn + 1) * _KEY_BYTES])
                    cipher = AESGCM(material)
                    state.ciphers[epoch] = cipher
                    plan._new[(event.namespace, event.key, epoch)] = material.hex()
                nonce = bytes(nonces[drawn * _NONCE_BYTES : (drawn + 1) * _NONCE_BYTES])
                drawn += 1
                plan.sealed[index] = seal(event, epoch, cipher, nonce)
            elif isinstance(event, Forget):
                self._plan_forget(plan, event)
        return plan

    def _plan_forget(self, plan: SealPlan, event: Forget) -> None:
        seq = event.seq or 0
        namespace = event.namespace
        if event.key is None:
            plan._namespaces[namespace] = seq
            plan._forgotten[namespace] = seq
            # Keys already in the plan lose their data keys too; the UNLINK
            # of the namespace hash covers every earlier field.
            for (ns, _), state in plan._keys.items():
                if ns == namespace:
                    state.ciphers.clear()
            for item in [item for item in plan._new if item[0] == namespace]:
                del plan._new[item]
            plan._destroyed.pop(namespace, None)
            plan._ledger.append((seq, _ledger_entry(ForgetRecord(seq, namespace, None))))
            return
        state = self._state(plan, namespace, event.key)
        state.epoch = seq
        if event.expected_version is not None:
            return  # Its shard decides, and shreds with `shred` if it takes effect.
        for epoch in [epoch for epoch in state.ciphers if epoch < seq]:
            del state.ciphers[epoch]
            if plan._new.pop((namespace, event.key, epoch), None) is None:
                plan._destroyed.setdefault(namespace, set()).add(_material_field(event.key, epoch))
        plan._ledger.append((seq, _ledger_entry(ForgetRecord(seq, namespace, event.key))))

    def commit(self, plan: SealPlan) -> None:
        """Take the plan's key states into the cache, after its append succeeded."""
        for namespace in plan._forgotten:
            for cached in [item for item in self._keys if item[0] == namespace]:
                if cached not in plan._keys:
                    del self._keys[cached]
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

    def _missing(self, events: Sequence[Event]) -> tuple[list[tuple[str, str]], list[str]]:
        """Return the batch's keys and namespaces whose state the cache lacks, in order."""
        # Dicts as ordered sets: a batch can name thousands of keys.
        keys: dict[tuple[str, str], None] = {}
        namespaces: dict[str, None] = {}
        for event in events:
            if isinstance(event, (Store, Forget)):
                if event.namespace not in self._namespaces:
                    namespaces[event.namespace] = None
                if event.key is not None and (event.namespace, event.key) not in self._keys:
                    keys[(event.namespace, event.key)] = None
        return list(keys), list(namespaces)

    def _load(self, plan: SealPlan, events: Sequence[Event]) -> None:
        """Fetch the states of the batch's keys and namespaces that the cache lacks.

        One HMGET per namespace reads the state fields; only keys with live
        data keys cost a second round trip, so a batch of new keys costs one.
        """
        keys, namespaces = self._missing(events)
        if not keys and not namespaces:
            return
        by_namespace: dict[str, list[str]] = {}
        for namespace, key in keys:
            by_namespace.setdefault(namespace, []).append(key)
        pipeline = self.client.pipeline(transaction=False)
        if namespaces:
            pipeline.hmget(self.namespace_epochs, namespaces)
        for namespace, names in by_namespace.items():
            pipeline.hmget(self.namespace_hash(namespace), [_state_field(key) for key in names])
        replies = pipeline.execute()
        if namespaces:
            for namespace, epoch in zip(namespaces, replies[0], strict=True):
                # Loaded epochs go straight into the cache: they are what Redis has.
                self._namespaces[namespace] = int(epoch or 0)
            replies = replies[1:]

        live: list[tuple[tuple[str, str], list[int]]] = []
        for (namespace, names), states in zip(by_namespace.items(), replies, strict=True):
            for key, state_field in zip(names, states, strict=True):
                epoch, epochs = _parse_state(state_field) if state_field is not None else (0, [])
                plan._keys[(namespace, key)] = _KeyState(epoch, {})
                if epochs:
                    live.append(((namespace, key), epochs))
        if not live:
            return
        found = self.data_keys((namespace, key, epoch) for (namespace, key), epochs in live for epoch in epochs)
        for (namespace, key), epochs in live:
            materials = {epoch: found[(namespace, key, epoch)] for epoch in epochs}
            plan._keys[(namespace, key)].ciphers = {
                epoch: AESGCM(material) for epoch, material in materials.items() if material is not None
            }

    def _state(self, plan: SealPlan, namespace: str, key: str) -> _KeyState:
        item = (namespace, key)
        state = plan._keys.get(item)
        if state is None:
            cached = self._keys[item]
            # Copied, so a failed append leaves the cached state untouched.
            ciphers = dict(cached.ciphers)
            forgotten_at = plan._forgotten.get(namespace)
            if forgotten_at is not None:
                # The batch already forgot the namespace, so these are destroyed.
                ciphers = {epoch: c for epoch, c in ciphers.items() if epoch >= forgotten_at}
            state = _KeyState(cached.epoch, ciphers)
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
        self._shred_script(keys=[self.namespace_hash(namespace), self.ledger, self.shredded], args=[key, seq, record])

    # ------------------------------------------------------------ reading

    def data_keys(self, wanted: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str, int], bytes | None]:
        """Return the data key of each (namespace, key, epoch), None where it is destroyed.

        Read on every call and never cached, so a reader keeps no data key in
        memory that a Forget destroyed after its read. One HMGET per namespace.
        """
        by_namespace: dict[str, list[tuple[str, str, int]]] = {}
        for item in dict.fromkeys(wanted):
            by_namespace.setdefault(item[0], []).append(item)
        if not by_namespace:
            return {}
        pipeline = self.client.pipeline(transaction=False)
        for namespace, items in by_namespace.items():
            pipeline.hmget(self.namespace_hash(namespace), [_material_field(key, epoch) for _, key, epoch in items])
        found: dict[tuple[str, str, int], bytes | None] = {}
        for items, materials in zip(by_namespace.values(), pipeline.execute(), strict=True):
            for item, material in zip(items, materials, strict=True):
                found[item] = bytes.fromhex(material.decode()) if material is not None else None
        return found

    def forgets_after(self, seq: int) -> list[ForgetRecord]:
        """Return the ledger's Forgets with a sequence number above `seq`, in order."""
        members = self.client.zrangebyscore(self.ledger, f"({seq}", "+inf")
        records = [ForgetRecord(*_ledger_decoder.decode(member)) for member in members]
        return sorted(records, key=lambda record: (record.seq, record.namespace, record.key or ""))

    def shred_count(self) -> int:
        """Return how many destructions ever ran: a cheap "did anything change" check."""
        return int(self.client.get(self.shredded) or 0)


# KEYS: namespace hash, ledger, counter. ARGV: the key, the Forget's seq, its
# ledger record. Keeps the live epochs at or above seq.
_SHRED_SCRIPT = """
local seq = tonumber(ARGV[2])
local state = redis.call('HGET', KEYS[1], 's\0' .. ARGV[1])
if state then
  local kept = {}
  local first = true
  for epoch in string.gmatch(state, '([^,]+)') do
    if first then
      first = false
      kept[1] = epoch
    elseif tonumber(epoch) < seq then
      redis.call('HDEL', KEYS[1], 'm\0' .. ARGV[1] .. '\0' .. epoch)
    else
      kept[#kept + 1] = epoch
    end
  end
  redis.call('HSET', KEYS[1], 's\0' .. ARGV[1], table.concat(kept, ','))
end
redis.call('ZADD', KEYS[2], seq, ARGV[3])
redis.call('INCR', KEYS[3])
return 1
"""

# The part of the log's append script that applies a SealPlan's writes. It
# expects `ops` (the decoded plan: per namespace [hash, unlink, fields to
# delete, field/value pairs to set], namespace epochs, ledger entries),
# KEYS[3] the namespace epoch hash, KEYS[4] the ledger and KEYS[5] the
# counter. Sequence numbers travel as decimal strings: Lua numbers are
# doubles, exact up to 2^53, which is as far as the comparisons here reach.
APPLY_OPS_LUA = """
if ops[1] then
  local destroyed = false
  for _, op in ipairs(ops[1]) do
    if op[2] == 1 then
      redis.call('UNLINK', op[1])
      destroyed = true
    end
    for i = 1, #op[3], 1000 do
      redis.call('HDEL', op[1], unpack(op[3], i, math.min(i + 999, #op[3])))
      destroyed = true
    end
    for i = 1, #op[4], 1000 do
      redis.call('HSET', op[1], unpack(op[4], i, math.min(i + 999, #op[4])))
    end
  end
  for _, epoch in ipairs(ops[2]) do
    redis.call('HSET', KEYS[3], epoch[1], epoch[2])
  end
  for _, entry in ipairs(ops[3]) do
    redis.call('ZADD', KEYS[4], entry[1], entry[2])
    destroyed = true
  end
  if destroyed then
    redis.call('INCR', KEYS[5])
  end
end
"""
