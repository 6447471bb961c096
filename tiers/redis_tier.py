"""The Redis tier backend, used for STM and IM.

One shard of one tier is three hashes whose names share a Redis Cluster hash
tag, so they live in one slot and one MULTI/EXEC may touch all of them:

    tm:{<tier>:<shard>}:v    field namespace NUL key -> encoded value
    tm:{<tier>:<shard>}:m    field namespace NUL key -> encoded Meta
    tm:{<tier>:<shard>}:ctl  field "wm" -> watermark as decimal digits,
                             field <control name> -> control value

Namespace and key never contain NUL (`commit` rejects it), so the first NUL
of a field separates them.

The client is a `redis.Redis` or, for a `redis+cluster://` URL, a
`redis.cluster.RedisCluster` (see `client_from_url`). On a cluster the hash
tag puts the three hashes of a tier shard in one slot, so every command,
MULTI/EXEC and script of a tier goes to that slot's primary. No method scans
the keyspace: scans read the shard's own hashes with HSCAN, so a tier never
has to visit the other primaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from tiers.base import Meta, Record, TierWrites
from tiers.checks import (
    WATERMARK_NAME,
    check_control,
    check_control_name,
    check_identity,
    check_watermark,
    check_writes,
)
from tiers.codec import (
    Compression,
    ValueCodec,
    compression_for,
    decode_meta,
    encode_meta,
)
from tiers.digest import digest_sorted_records
from tiers.errors import CorruptDataError, storage_errors

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterAddress",
    "RedisClient",
    "RedisTier",
    "client_from_url",
    "cluster_node_urls",
    "is_cluster_url",
    "parse_cluster_url",
    "redis_key_prefix",
]

# Sets the meta of each (field, meta) pair in ARGV only where the value hash
# contains the field, so a touch never creates metadata without a value. Lua
# runs atomically, and inside the commit's MULTI it sees the writes queued
# before it.
_TOUCH_SCRIPT = """
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""

# RedisClusterException is not a RedisError: redis-py raises it when no node
# serves a slot or when a transaction spans two slots.
_REDIS_ERRORS = (redis.RedisError, RedisClusterException)

RedisClient = redis.Redis | RedisCluster

# The URL schemes of a Redis Cluster, each with the scheme of its nodes' URLs.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

_CLUSTER_URL_FORM = (
    "redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][?OPTION=VALUE...]"
)
_DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterAddress:
    """A parsed Redis Cluster URL: startup nodes and the parts all node URLs share.

    `scheme` is `redis` or `rediss`, `userinfo` is `USER:PASSWORD@` or empty,
    and `query` is `?...` or empty.
    """

    scheme: str
    userinfo: str
    nodes: tuple[tuple[str, int], ...]
    query: str

    def node_url(self, host: str, port: int) -> str:
        """Return the URL of one node, with the cluster's credentials and options."""
        netloc = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{self.userinfo}{netloc}:{port}/0{self.query}"


def is_cluster_url(url: str) -> bool:
    """Return whether `url` names a Redis Cluster, by its scheme."""
    scheme, separator, _ = url.partition("://")
    return bool(separator) and scheme.lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterAddress:
    """Parse a `redis+cluster://` or `rediss+cluster://` URL.

    The URL lists one or more startup nodes, separated by commas, and a
    node without a port gets 6379. The client learns the other nodes from the
    first startup node that replies. The path may only be empty or `/0`,
    because a cluster has database 0 only. Query options apply to the
    connection of every node, as in a `redis://` URL.

    Raises ValueError naming the invalid part, without the password.
    """
    scheme, separator, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme.lower()) if separator else None
    if node_scheme is None:
        raise ValueError(
            f"URL scheme {scheme!r} is not a Redis Cluster scheme: "
            f"write {_CLUSTER_URL_FORM}"
        )
    parts = urlsplit(f"{node_scheme}://{rest}")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(
            f"Redis Cluster URL path {parts.path!r} is invalid: a cluster has "
            "database 0 only, so leave the path empty or write /0"
        )
    if parts.fragment:
        raise ValueError(
            f"Redis Cluster URL fragment {parts.fragment!r} is invalid: "
            f"write {_CLUSTER_URL_FORM}"
        )
    credentials, at, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"Redis Cluster URL names no node: write {_CLUSTER_URL_FORM}")
    nodes = tuple(_parse_node(item) for item in hosts.split(","))
    return ClusterAddress(
        scheme=node_scheme,
        userinfo=f"{credentials}{at}",
        nodes=nodes,
        query=f"?{parts.query}" if parts.query else "",
    )


def _parse_node(text: str) -> tuple[str, int]:
    invalid = (
        f"Redis Cluster node {text!r} is invalid: write HOST:PORT, "
        f"as in {_CLUSTER_URL_FORM}"
    )
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(invalid) from None
    if not parts.hostname or parts.netloc != text:
        raise ValueError(invalid)
    return parts.hostname, port or _DEFAULT_PORT


def client_from_url(url: str, **options: Any) -> RedisClient:
    """Create a client of the Redis server or Redis Cluster that `url` names.

    A `redis+cluster://` or `rediss+cluster://` URL (see `parse_cluster_url`)
    gives a `RedisCluster`, which follows MOVED and ASK redirects. It reads
    the slot map when it is created, so it raises at once when no startup
    node replies or some slot has no node. Any other URL gives
    `redis.Redis.from_url(url)`, which connects at the first command.
    `options` go to the client, for example `socket_timeout`.
    """
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    address = parse_cluster_url(url)
    (host, port), *others = address.nodes
    startup_nodes = [ClusterNode(other, other_port) for other, other_port in others]
    return RedisCluster.from_url(
        address.node_url(host, port), startup_nodes=startup_nodes, **options
    )


def cluster_node_urls(url: str, **options: Any) -> list[str]:
    """Return the URL of every primary and replica of the Redis Cluster at `url`.

    Each URL carries the credentials and query options of `url`. Nodes that
    serve no slot are left out, because redis-py learns the nodes from the
    slot map.
    """
    address = parse_cluster_url(url)
    client = client_from_url(url, **options)
    try:
        nodes = sorted((node.host, node.port) for node in client.get_nodes())
    finally:
        client.close()
    return [address.node_url(host, port) for host, port in nodes]


def redis_key_prefix(name: str, shard: int) -> str:
    """Return the key prefix, hash tag included, of one tier shard."""
    return f"tm:{{{name}:{shard}}}"


def _field(namespace: str, key: str) -> bytes:
    return f"{namespace}\0{key}".encode()


def _split_field(field: bytes) -> tuple[str, str]:
    namespace, separator, key = field.decode().partition("\0")
    if not separator:
        raise CorruptDataError(
            f"hash field {field!r} has no NUL between namespace and key"
        )
    return namespace, key


class RedisTier:
    """A `Tier` stored in three hashes of a Redis server or a Redis Cluster.

    `client` is a `redis.Redis` or a `RedisCluster`, and must return bytes
    (`decode_responses=False`). The caller owns it
    unless `owns_client` is true, in which case `close` closes it. A commit
    is one MULTI/EXEC, so other clients see all of it or none of it. After a
    crash the AOF holds all of it or none of it too, because Redis (7.0)
    drops an incomplete MULTI block when it loads a truncated AOF. How many
    acknowledged commits a crash of the host may lose is set by the server's
    `appendfsync`.
    Reads and scans fetch at most `chunk_size` fields per command.

    Redis does not roll back a transaction in which one command fails while
    it runs. The commands here fail that way only on a key of the wrong type,
    which only a foreign writer can create. Out of memory under `noeviction`
    rejects the whole EXEC, so it leaves no partial commit.

    Every method raises StorageError when a Redis command fails.
    """

    def __init__(
        self,
        name: str,
        client: RedisClient,
        shard: int,
        *,
        compression: Compression | None = None,
        chunk_size: int = 1000,
        owns_client: bool = False,
    ) -> None:
        check_identity(name, shard)
        connection_kwargs = getattr(client, "get_connection_kwargs", dict)()
        if connection_kwargs.get("decode_responses"):
            raise ValueError(
                "the Redis client decodes responses to str: create it with "
                "decode_responses=False, because stored values are bytes"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size {chunk_size} is invalid: use 1 or more")

        self.name = name
        self.shard = shard
        self.client = client
        self.chunk_size = chunk_size
        self.owns_client = owns_client
        self._codec = ValueCodec(compression or compression_for(name))
        prefix = redis_key_prefix(name, shard)
        self.values_key = f"{prefix}:v"
        self.metas_key = f"{prefix}:m"
        self.control_key = f"{prefix}:ctl"

    def __repr__(self) -> str:
        return f"RedisTier(name={self.name!r}, shard={self.shard})"

    def watermark(self) -> int:
        with self._errors("watermark"):
            raw = self.client.hget(self.control_key, WATERMARK_NAME)
        if raw is None:
            return 0
        if not raw.isdigit():
            raise CorruptDataError(
                f"watermark {raw!r} in {self.control_key} is not decimal digits",
                tier=self.name,
                shard=self.shard,
            )
        return int(raw)

    def get(self, namespace: str, key: str) -> Record | None:
        return self.get_many([(namespace, key)]).get((namespace, key))

    def get_many(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], Record]:
        """Return the records among `keys` that exist, read in one MULTI/EXEC.

        The transaction keeps a commit from landing between the read of the
        values and the read of the metadata.
        """
        # Repack each key as a tuple, so keys given as lists work, and drop repeats.
        identities = list(dict.fromkeys((namespace, key) for namespace, key in keys))
        if not identities:
            return {}
        fields = [_field(namespace, key) for namespace, key in identities]
        with self._errors("get_many"):
            values, metas = self._read_fields(fields)
        found: dict[tuple[str, str], Record] = {}
        for identity, field, value_blob, meta_blob in zip(
            identities, fields, values, metas, strict=True
        ):
            record = self._record(field, value_blob, meta_blob)
            if record is not None:
                found[identity] = record
        return found

    def scan_meta(self) -> Iterator[tuple[str, str, Meta]]:
        """Yield (namespace, key, meta) for every record, from HSCAN of the meta hash.

        HSCAN may return a field twice when the hash is resized during the
        scan, so the fields already yielded are remembered and skipped.
        """
        seen: set[bytes] = set()
        with self._errors("scan_meta"):
            for field, meta_blob in self.client.hscan_iter(
                self.metas_key, count=self.chunk_size
            ):
                if field in seen:
                    continue
                seen.add(field)
                namespace, key = _split_field(field)
                yield namespace, key, decode_meta(meta_blob)

    def records(self) -> Iterator[Record]:
        """Yield every record in (namespace, key) order.

        The field names are collected first, with HSCAN, because Redis hashes
        have no order. They are sorted as bytes: UTF-8 keeps code point order
        and NUL sorts below every other byte, so byte order is (namespace,
        key) order. The records are then read `chunk_size` at a time, each
        chunk in one MULTI/EXEC. A commit between two chunks shows in the
        later chunks only.
        """
        with self._errors("records"):
            scanned = self.client.hscan_iter(self.metas_key, count=self.chunk_size)
            fields = sorted({field for field, _ in scanned})
            for start in range(0, len(fields), self.chunk_size):
                chunk = fields[start : start + self.chunk_size]
                values, metas = self._read_fields(chunk)
                for field, value_blob, meta_blob in zip(
                    chunk, values, metas, strict=True
                ):
                    record = self._record(field, value_blob, meta_blob)
                    if record is not None:
                        yield record

    def commit(
        self,
        writes: TierWrites,
        watermark: int,
        control: dict[str, bytes | None] | None = None,
    ) -> None:
        """Apply `writes`, the watermark and control values in one MULTI/EXEC.

        A touch of a record the tier does not contain is ignored. Arguments are
        checked and values encoded before anything is sent, so a commit
        rejected by a check sends nothing.
        """
        check_writes(writes)
        check_watermark(watermark)
        check_control(control)
        value_fields: dict[bytes, bytes] = {}
        meta_fields: dict[bytes, bytes] = {}
        for record in writes.puts:
            field = _field(record.namespace, record.key)
            value_fields[field] = self._codec.encode(record.value)
            meta_fields[field] = encode_meta(record.meta)
        touch_args: list[bytes] = []
        for namespace, key, meta in writes.touches:
            touch_args += (_field(namespace, key), encode_meta(meta))
        deleted_fields = [_field(namespace, key) for namespace, key in writes.deletes]
        control_sets: dict[str, bytes] = {WATERMARK_NAME: str(watermark).encode()}
        control_deletes: list[str] = []
        for name, value in (control or {}).items():
            if value is None:
                control_deletes.append(name)
            else:
                control_sets[name] = value

        pipe = self.client.pipeline(transaction=True)
        if deleted_fields:
            pipe.hdel(self.values_key, *deleted_fields)
            pipe.hdel(self.metas_key, *deleted_fields)
        if value_fields:
            pipe.hset(self.values_key, mapping=value_fields)
            pipe.hset(self.metas_key, mapping=meta_fields)
        if touch_args:
            # redis-py 8.1's ClusterPipeline raises on `eval()`, but queues a raw
            # EVAL, routed by the slot of its keys, like any other command.
            pipe.execute_command(
                "EVAL", _TOUCH_SCRIPT, 2, self.values_key, self.metas_key, *touch_args
            )
        pipe.hset(self.control_key, mapping=control_sets)
        if control_deletes:
            pipe.hdel(self.control_key, *control_deletes)
        with self._errors("commit"):
            pipe.execute()

    def control(self, name: str) -> bytes | None:
        check_control_name(name)
        with self._errors("control"):
            return self.client.hget(self.control_key, name)

    def put_control(self, name: str, value: bytes | None) -> None:
        check_control({name: value})
        with self._errors("put_control"):
            if value is None:
                self.client.hdel(self.control_key, name)
            else:
                self.client.hset(self.control_key, name, value)

    def digest(self) -> tuple[str, int]:
        return digest_sorted_records(self.records())

    def clear(self) -> None:
        with self._errors("clear"):
            self.client.delete(self.values_key, self.metas_key, self.control_key)

    def close(self) -> None:
        """Close the client if this tier owns it, and otherwise leave it open."""
        if self.owns_client:
            self.client.close()

    def _errors(self, action: str):
        return storage_errors(self.name, self.shard, action, _REDIS_ERRORS)

    def _read_fields(
        self, fields: list[bytes]
    ) -> tuple[list[bytes | None], list[bytes | None]]:
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(self.values_key, fields)
        pipe.hmget(self.metas_key, fields)
        values, metas = pipe.execute()
        return values, metas

    def _record(
        self, field: bytes, value_blob: bytes | None, meta_blob: bytes | None
    ) -> Record | None:
        if value_blob is None and meta_blob is None:
            return None
        if value_blob is None or meta_blob is None:
            missing = self.values_key if value_blob is None else self.metas_key
            raise CorruptDataError(
                f"record {_split_field(field)!r} has no entry in {missing}: every "
                "record needs both a value and a meta entry",
                tier=self.name,
                shard=self.shard,
            )
        namespace, key = _split_field(field)
        return Record(
            namespace, key, self._codec.decode(value_blob), decode_meta(meta_blob)
        )
