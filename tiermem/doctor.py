"""Health checks of a running stack, for `tiermem doctor`.

Each check returns a `Check`: its name, whether it passed, what it found
and, when it failed, what to do. The checks cover the disk of the data
directory, the configuration of every Redis, the Ray cluster, each bus lane,
the shard actors, apply and projection lag, the Celery queues and beat.
Checks that wait on the network run in parallel, each with its own deadline.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

import msgspec
import redis
from redis.exceptions import RedisClusterException

from bus.client import Client, RequestTimeout
from bus.router import LANES
from events.errors import LogConfigError, LogError
from events.log import RedisEventLog, check_log_config
from events.types import (
    Busy,
    Error,
    LogEvents,
    Maintain,
    Message,
    ReadLog,
    Search,
    Status,
    StatusReply,
)
from handlers.sharding import shard_of
from replay.celery_app import QUEUES, read_schedule_state, schedule_path, slot_number
from tiermem.config import StackConfig
from tiermem.settings import mask_secrets
from tiers.redis_tier import client_from_url, cluster_node_urls, is_cluster_url

__all__ = [
    "CHECK_ORDER",
    "Check",
    "DoctorOptions",
    "Report",
    "run_doctor",
    "settings_failed",
]

# The order of the checks in a report, whatever order they finish in.
CHECK_ORDER = (
    "disk",
    "redis.log",
    "redis.stm",
    "redis.im",
    "redis.broker",
    "ray",
    *(f"bus.{lane}" for lane in LANES),
    "shards",
    "apply_lag",
    "projection_lag",
    *(f"celery.{queue}" for queue in QUEUES),
    "celery.beat",
)

# Seconds beyond twice beat's shortest interval that its schedule file may
# lag before the beat check fails, because a loaded host delays beat's wakeups.
BEAT_SLACK_S = 5.0

# Slots of maintain_interval_s that the beat check looks back through in the
# log, one HMGET for all, when beat's schedule file is not on this host.
BEAT_LOOKBACK_SLOTS = 1000

# At most this many log events are read to count the shards' unapplied
# events, which bounds the check's time when a shard is far behind.
APPLY_LAG_SCAN_LIMIT = 200_000

_LOG_FIXES = {
    "appendonly": (
        "run CONFIG SET appendonly yes on the log Redis and put `appendonly yes` in its "
        "redis.conf; without it a restart of that Redis loses the log"
    ),
    "appendfsync": (
        "run CONFIG SET appendfsync always on the log Redis and put `appendfsync always` "
        "in its redis.conf; `everysec` is accepted only with allow_everysec = true, and "
        "then a crash of its host can lose up to one second of acknowledged events"
    ),
    "maxmemory-policy": (
        "run CONFIG SET maxmemory-policy noeviction on the log Redis and put "
        "`maxmemory-policy noeviction` in its redis.conf; any other policy lets Redis "
        "evict the log"
    ),
}


class Check(msgspec.Struct, kw_only=True):
    """The result of one check; `fix` is what to do when `ok` is false."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


class Report(msgspec.Struct, kw_only=True):
    """Every check of one run; `ok` is true when all passed."""

    ok: bool
    checks: list[Check]


class DoctorOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Deadlines and thresholds of the checks.

    `timeout_s` bounds each request to Redis, the router and Celery.
    `ray_timeout_s` bounds the Ray check, which starts a Python process that
    joins the cluster as a driver. `curve` is (server public key, client
    public key, client secret key), Z85, for a router that requires CURVE.
    """

    timeout_s: float = 5.0
    ray_timeout_s: float = 30.0
    min_free_bytes: int = 1024**3
    max_apply_lag: int = 0
    max_projection_lag: int = 10_000
    curve: tuple[bytes, bytes, bytes] | None = None


def _passed(name: str, detail: str) -> Check:
    return Check(name=name, ok=True, detail=mask_secrets(detail))


def _failed(name: str, detail: str, fix: str) -> Check:
    return Check(
        name=name, ok=False, detail=mask_secrets(detail), fix=mask_secrets(fix)
    )


def _redis(url: str, options: DoctorOptions) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=options.timeout_s, socket_connect_timeout=options.timeout_s
    )


def _event_log(config: StackConfig, options: DoctorOptions) -> RedisEventLog:
    return RedisEventLog(
        _redis(config.log_url or "", options), stream=config.log_stream
    )


# ----------------------------------------------------------------- disk


def check_disk(config: StackConfig, options: DoctorOptions) -> Check:
    """Check that the data directory exists and its file system has room."""
    path = Path(config.data_dir)
    if not path.is_dir():
        return _failed(
            "disk",
            f"the data directory {path} does not exist",
            "run doctor with --data-dir of the running stack, or set data_dir; "
            "the disk and projection checks read this directory",
        )
    usage = shutil.disk_usage(path)
    detail = (
        f"{_gib(usage.free)} free of {_gib(usage.total)} on the file system of {path}"
    )
    if usage.free < options.min_free_bytes:
        return _failed(
            "disk",
            f"{detail}, below the minimum of {_gib(options.min_free_bytes)}",
            "free space on that file system, or move data_dir: Redis cannot rewrite "
            "its append-only file and SQLite cannot commit on a full disk",
        )
    return _passed("disk", detail)


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"


# ----------------------------------------------------------------- redis


def _redis_settings(client: redis.Redis) -> dict[str, str]:
    found = client.config_get("appendonly", "appendfsync", "maxmemory-policy")
    settings = {}
    for key, value in found.items():
        settings[_text(key)] = _text(value)
    return settings


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unreachable(
    name: str, what: str, url: str, error: Exception, setting: str
) -> Check:
    return _failed(
        name,
        f"cannot reach the {what} at {url}: {error}",
        f"start that Redis, or correct {setting}; a running `tiermem up` restarts the Redis servers it "
        "started within a second and logs stack.child.exited, so if this persists, read its output",
    )


def _unset(name: str, setting: str) -> Check:
    return _failed(
        name,
        f"{setting} is not set and no running embedded stack provides it",
        f"start the stack with `tiermem up`, or set {setting}",
    )


def check_log_redis(config: StackConfig, options: DoctorOptions) -> Check:
    """Check that the log Redis replies to PING and keeps every acknowledged event."""
    name = "redis.log"
    if config.log_url is None:
        return _unset(name, "log_url")
    client = _redis(config.log_url, options)
    try:
        client.ping()
        check_log_config(client, allow_everysec=config.allow_everysec)
        found = _redis_settings(client)
    except LogConfigError as error:
        return _failed(
            name,
            f"the log Redis at {config.log_url} has {error.setting} {error.actual}; it must be {error.required}",
            _LOG_FIXES.get(error.setting, str(error)),
        )
    except LogError as error:
        return _failed(
            name,
            f"the log Redis at {config.log_url}: {error}",
            "allow CONFIG GET for tiermem's Redis user",
        )
    except redis.RedisError as error:
        return _unreachable(name, "log Redis", config.log_url, error, "log_url")
    finally:
        client.close()
    settings = ", ".join(
        f"{key} {found.get(key, '?')}"
        for key in ("appendonly", "appendfsync", "maxmemory-policy")
    )
    return _passed(name, f"{config.log_url}: {settings}")


def check_tier_redis(role: str, url: str | None, options: DoctorOptions) -> Check:
    """Check that an STM or IM Redis replies, keeps an append-only file and never evicts."""
    name = f"redis.{role}"
    setting = f"{role}_url"
    if url is None:
        return _unset(name, setting)
    if is_cluster_url(url):
        return _check_tier_cluster(role, url, options)
    client = _redis(url, options)
    try:
        client.ping()
        found = _redis_settings(client)
    except redis.ResponseError as error:
        return _failed(
            name,
            f"cannot read the configuration of the {role.upper()} Redis at {url}: {error}",
            "allow CONFIG GET for tiermem's Redis user",
        )
    except redis.RedisError as error:
        return _unreachable(name, f"{role.upper()} Redis", url, error, setting)
    finally:
        client.close()

    problems: list[str] = []
    fixes: list[str] = []
    if found.get("appendonly") != "yes":
        problems.append(f"appendonly is {found.get('appendonly')!r}")
        fixes.append(
            f"run CONFIG SET appendonly yes and put `appendonly yes` in its redis.conf; without it a "
            f"restart loses the tier and every shard rebuilds its {role.upper()} records from the log"
        )
    if found.get("maxmemory-policy") != "noeviction":
        problems.append(f"maxmemory-policy is {found.get('maxmemory-policy')!r}")
        fixes.append(
            "run CONFIG SET maxmemory-policy noeviction and put `maxmemory-policy noeviction` in its "
            "redis.conf; the shards decide capacities themselves, and a key that Redis evicts makes "
            "the tier differ from what the log defines"
        )

    if problems:
        return _failed(
            name,
            f"the {role.upper()} Redis at {url} must keep an append-only file and never evict: {'; '.join(problems)}",
            "; ".join(fixes),
        )
    return _passed(
        name,
        f"{url}: appendonly yes, appendfsync {found.get('appendfsync', '?')}, maxmemory-policy noeviction",
    )


def _check_tier_cluster(role: str, url: str, options: DoctorOptions) -> Check:
    """Run the tier Redis check on every primary and replica of a Redis Cluster."""
    name = f"redis.{role}"
    try:
        node_urls = cluster_node_urls(
            url, socket_timeout=options.timeout_s, socket_connect_timeout=options.timeout_s
        )
    except (redis.RedisError, RedisClusterException) as error:
        return _unreachable(name, f"{role.upper()} Redis Cluster", url, error, f"{role}_url")
    checks = [check_tier_redis(role, node_url, options) for node_url in node_urls]
    failed = [check for check in checks if not check.ok]
    if failed:
        return _failed(
            name,
            f"{len(failed)} of {len(checks)} nodes of the {role.upper()} Redis Cluster at {url} failed: "
            + "; ".join(check.detail for check in failed),
            "; ".join(dict.fromkeys(check.fix or "" for check in failed)),
        )
    return _passed(
        name, f"{url}: {len(checks)} nodes: " + "; ".join(check.detail for check in checks)
    )


def check_broker(config: StackConfig, options: DoctorOptions) -> Check:
    """Check that Celery's broker replies to PING."""
    name = "redis.broker"
    if config.broker_url is None:
        return _unset(name, "broker_url")
    if not config.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return _passed(
            name,
            f"{config.broker_url}: not a Redis URL, so only the Celery checks test it",
        )
    client = _redis(config.broker_url, options)
    try:
        client.ping()
    except redis.RedisError as error:
        return _unreachable(
            name, "Celery broker", config.broker_url, error, "broker_url"
        )
    finally:
        client.close()
    return _passed(name, f"{config.broker_url}: answers PING")


# ----------------------------------------------------------------- ray


def check_ray(config: StackConfig, options: DoctorOptions) -> Check:
    """Check that the Ray cluster accepts a driver and has a live node.

    The check runs in a child process, because joining a cluster changes
    the process's Ray state, and a child that does not finish by the
    deadline can be killed.
    """
    name = "ray"
    address = config.ray_address
    if address is None:
        return _unset(name, "ray_address")
    connect_error = _connect_error(address, options.timeout_s)
    if connect_error is not None:
        return _failed(
            name,
            f"cannot connect to the Ray address {address}: {connect_error}",
            "start the Ray head (`tiermem up` starts one for the embedded stack), or correct ray_address",
        )
    command = [sys.executable, "-m", "tiermem.doctor", "ray-probe", address]
    try:
        probe = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=options.ray_timeout_s,
            check=False,
            env=_ray_env(),
        )
    except subprocess.TimeoutExpired:
        return _failed(
            name,
            f"joining the Ray cluster at {address} did not finish within {options.ray_timeout_s:.0f} s",
            "check the Ray head's logs (DIR/logs/ray-start.log for the embedded stack) and `ray status --address ADDRESS`",
        )
    if probe.returncode != 0:
        last_line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return _failed(
            name,
            f"joining the Ray cluster at {address} failed with status {probe.returncode}: {last_line}",
            "check that this host runs the cluster's Ray version and can reach the head and its nodes",
        )
    nodes = json.loads(probe.stdout.strip().splitlines()[-1])
    alive = [node for node in nodes if node["alive"]]
    dead = len(nodes) - len(alive)
    detail = f"{address}: {len(alive)} live node(s)" + (
        f", {dead} dead" if dead else ""
    )
    if not alive:
        return _failed(name, detail, "start a Ray node; the shard actors need one")
    return _passed(name, detail)


def _ray_env() -> dict[str, str]:
    import os

    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0")


def _connect_error(address: str, timeout: float) -> str | None:
    """Return why a TCP connection to `HOST:PORT` (or `ray://HOST:PORT`) failed, or None."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None  # `auto` and other forms: the probe finds the cluster itself.
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as error:
        return str(error)


def _ray_probe(address: str) -> int:
    """Join the cluster as a driver and print its nodes as one JSON line (run in a child)."""
    import ray

    ray.init(
        address=address,
        namespace="tiermem-doctor",
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        nodes = [
            {"alive": bool(node["Alive"]), "address": node["NodeManagerAddress"]}
            for node in ray.nodes()
        ]
    finally:
        ray.shutdown()
    print(json.dumps(nodes))
    return 0


# ----------------------------------------------------------------- bus


def _request(
    endpoints: dict[str, str], lane: str, message: Message, options: DoctorOptions
) -> Message:
    """Send one request with one attempt; raise `RequestTimeout` at the deadline."""
    with Client(
        endpoints, timeout=options.timeout_s, attempts=1, curve=options.curve
    ) as client:
        (reply,) = client.pipeline([message], lane=lane)
    return reply


def _bus_blocker(
    config: StackConfig, endpoints: dict[str, str] | None, options: DoctorOptions
) -> tuple[str, str] | None:
    """Return (detail, fix) when the router cannot be asked at all, else None."""
    if endpoints is None or not all(lane in endpoints for lane in LANES):
        return (
            "the router's endpoints are unknown: DIR/endpoints.json is missing and the configured ports include 0",
            "start the stack with `tiermem up`, or set router.ports to the ports the router listens on",
        )
    if config.router.auth.enabled and options.curve is None:
        return (
            "the router requires CURVE (router.auth.server_secret_file is set)",
            "pass --client-key with the .key_secret file of a client listed in router.auth.clients",
        )
    return None


def check_lanes(
    config: StackConfig, endpoints: dict[str, str] | None, options: DoctorOptions
) -> list[Check]:
    """Send a `ReadLog` on each lane at once and check that each lane replies.

    `ReadLog` is answered by the router itself, so a shard actor that does
    not answer fails the `shards` check, not these.
    """
    blocker = _bus_blocker(config, endpoints, options)
    if blocker is not None:
        return [_failed(f"bus.{lane}", *blocker) for lane in LANES]
    assert endpoints is not None
    with ThreadPoolExecutor(
        max_workers=len(LANES), thread_name_prefix="doctor-lane"
    ) as pool:
        futures = {
            lane: pool.submit(
                _request, endpoints, lane, ReadLog(from_seq=1, limit=1), options
            )
            for lane in LANES
        }
        return [
            _lane_check(lane, endpoints[lane], futures[lane].result, options)
            for lane in LANES
        ]


def _lane_check(
    lane: str, endpoint: str, result: Callable[[], Message], options: DoctorOptions
) -> Check:
    name = f"bus.{lane}"
    try:
        reply = result()
    except RequestTimeout:
        return _failed(
            name,
            f"no reply on the {lane} lane at {endpoint} within {options.timeout_s:.1f} s",
            "check that the router runs (DIR/logs/router.log for the embedded stack) and that this host can reach that port",
        )
    if isinstance(reply, LogEvents):
        return _passed(
            name, f"{endpoint} answered; the router's last seq is {reply.last_seq}"
        )
    if isinstance(reply, Busy):
        return _passed(
            name,
            f"{endpoint} answered Busy: the shards have router.max_inflight_batches unfinished calls",
        )
    if isinstance(reply, Error):
        return _passed(
            name, f"{endpoint} answered with error {reply.code}: {reply.message}"
        )
    return _passed(name, f"{endpoint} answered {type(reply).__name__}")


def check_shards(
    config: StackConfig, endpoints: dict[str, str] | None, options: DoctorOptions
) -> tuple[Check, StatusReply | None]:
    """Ask the router for `Status`, which every shard actor must answer; return the check and the reply."""
    name = "shards"
    blocker = _bus_blocker(config, endpoints, options)
    if blocker is not None:
        return _failed(name, *blocker), None
    assert endpoints is not None
    try:
        reply = _request(endpoints, "high", Status(), options)
    except RequestTimeout:
        return (
            _failed(
                name,
                f"no Status reply within {options.timeout_s:.1f} s. Status waits for every shard actor, "
                "so one that is hung, or restarting after its process died, delays it; if the bus "
                "checks also failed, the router itself is not answering",
                "check the router's log (DIR/logs/router.log) for dispatch.retrying and shard errors; "
                "Ray restarts a dead actor, which answers once it has recovered. If an actor stays "
                "silent, restart the router, which creates new actors",
            ),
            None,
        )
    if not isinstance(reply, StatusReply):
        detail = reply.message if isinstance(reply, Error) else type(reply).__name__
        return _failed(
            name,
            f"Status failed: {detail}",
            "check the router's log for the shard's error",
        ), None
    shards = "; ".join(
        f"shard {item.shard}: pid {item.pid} on {item.node}, watermark {item.watermark}, {item.keys} keys"
        for item in reply.shards
    )
    if len(reply.shards) != config.shards:
        return (
            _failed(
                name,
                f"the router runs {len(reply.shards)} shard(s), but the configuration has shards = {config.shards}: {shards}",
                "run doctor with the configuration the router runs with (--data-dir of the stack, or its --config)",
            ),
            reply,
        )
    return _passed(
        name, f"{len(reply.shards)} shard actor(s) answered: {shards}"
    ), reply


# ----------------------------------------------------------------- lag


def _owners(event: Message, shards: int) -> Sequence[int]:
    if isinstance(event, Maintain):
        return range(shards)
    if isinstance(event, Search):
        return ()  # The router serves it from the search projection, so no shard applies it.
    return (shard_of(event.namespace or "", shards),)


def _unapplied(
    event_log: RedisEventLog, watermarks: dict[int, int], until_seq: int, shards: int
) -> tuple[dict[int, int], bool]:
    """Count each shard's events in the log after its watermark, up to `until_seq`.

    Returns the counts and whether the scan reached `until_seq` before
    `APPLY_LAG_SCAN_LIMIT` events.
    """
    counts = dict.fromkeys(watermarks, 0)
    start = min(watermarks.values(), default=until_seq)
    scanned = 0
    for batch in event_log.iter_from(start, until_seq):
        for event in batch:
            for shard in _owners(event, shards):
                if shard in counts and (event.seq or 0) > watermarks[shard]:
                    counts[shard] += 1
        scanned += len(batch)
        if scanned >= APPLY_LAG_SCAN_LIMIT:
            return counts, batch[-1].seq == until_seq
    return counts, True


def check_apply_lag(
    config: StackConfig, status: StatusReply | None, options: DoctorOptions
) -> Check:
    """Count the events that each shard has not applied yet.

    A shard's watermark moves only with its own events, so the lag is the
    number of its events in the log after its watermark, not the log's last
    seq minus the watermark. With a `Status` reply, the count stops at the
    seq the router had reached when it sent Status to the shards. Ray runs a
    shard's calls in order, so a shard that applies normally shows no lag,
    and a lag means that the shard has paused because a tier is down.
    Without a reply, the watermarks come from STM and the count goes to the
    log's end, so it includes events in flight.
    """
    name = "apply_lag"
    if config.log_url is None:
        return _unset(name, "log_url")
    event_log = _event_log(config, options)
    try:
        last_seq = event_log.last_seq()
        if status is not None:
            watermarks = {item.shard: item.watermark for item in status.shards}
            until_seq = min(status.last_seq, last_seq)
            source = "Status"
        else:
            if config.stm_url is None:
                return _unset(name, "stm_url")
            watermarks = _stm_watermarks(config, options)
            until_seq = last_seq
            source = "STM, because Status failed"
        # The router's shard count decides ownership, even if the configuration differs.
        counts, complete = _unapplied(event_log, watermarks, until_seq, len(watermarks))
    except (redis.RedisError, RedisClusterException) as error:
        return _failed(
            name,
            f"not checked: cannot read the log or STM: {error}",
            "fix the redis.log and redis.stm checks first",
        )
    finally:
        event_log.client.close()

    if status is not None and last_seq < status.last_seq:
        return _failed(
            name,
            f"the log ends at seq {last_seq}, but the router has sequenced up to {status.last_seq}: "
            "the log's Redis has lost acknowledged events",
            "check the log Redis's appendonly and appendfsync (see redis.log) and its log for a restart; "
            "restart the router so that it resumes from the log's end, and expect clients to resend",
        )
    lags = ", ".join(
        f"shard {shard}: {count}" for shard, count in sorted(counts.items())
    )
    detail = f"events logged but not applied (watermarks from {source}): {lags}; log last seq {last_seq}"
    if not complete:
        detail += f"; counted over the first {APPLY_LAG_SCAN_LIMIT} events after the lowest watermark only"
    behind = {
        shard: count for shard, count in counts.items() if count > options.max_apply_lag
    }
    if behind:
        return _failed(
            name,
            f"{detail}; more than {options.max_apply_lag} unapplied on shard(s) {', '.join(map(str, sorted(behind)))}",
            "a shard that stops applying has paused on a failed tier: check the redis.stm and redis.im "
            "checks, and the shard.breaker events in the shard actors' logs (Ray's worker-*.out files; for the "
            "embedded stack, under the folder named in DIR/ray-temp-dir, in session_latest/logs); it resumes, "
            "in order, once the tier is back",
        )
    return _passed(name, detail)


def _stm_watermarks(config: StackConfig, options: DoctorOptions) -> dict[int, int]:
    from replay.projections.runner import shard_watermarks

    client = client_from_url(
        config.stm_url or "", socket_timeout=options.timeout_s, socket_connect_timeout=options.timeout_s
    )
    try:
        return dict(enumerate(shard_watermarks(client, config.shards)))
    finally:
        client.close()


def check_projection_lag(config: StackConfig, options: DoctorOptions) -> Check:
    """Compare the search projection's checkpoint with the log's last seq, reading the database read-only."""
    from replay.projections.db import connect_readonly
    from replay.projections.search import SEARCH

    name = "projection_lag"
    if config.log_url is None:
        return _unset(name, "log_url")
    db_path = Path(config.projections_db)
    checkpoints: dict[str, int] = {}
    if db_path.is_file():
        try:
            conn = connect_readonly(db_path)
            try:
                checkpoints = dict(
                    conn.execute(
                        "SELECT name, seq FROM projection_checkpoints"
                    ).fetchall()
                )
            finally:
                conn.close()
        except sqlite3.Error as error:
            return _failed(
                name,
                f"cannot read the checkpoints in {db_path}: {error}",
                "run `tiermem projections run --data-dir DIR` to create the tables",
            )
    event_log = _event_log(config, options)
    try:
        last_seq = event_log.last_seq()
    except redis.RedisError as error:
        return _failed(
            name,
            f"not checked: cannot read the log: {error}",
            "fix the redis.log check first",
        )
    finally:
        event_log.client.close()

    if not checkpoints and last_seq == 0:
        return _passed(name, "no events logged yet")
    if SEARCH not in checkpoints and not db_path.is_file():
        return _failed(
            name,
            f"{db_path} does not exist, but the log holds {last_seq} events: no projection has run",
            "check the Celery checks: beat starts a projection run every projection_interval_s on the processing queue",
        )
    search_seq = checkpoints.get(SEARCH, 0)
    lag = max(0, last_seq - search_seq)
    others = ", ".join(
        f"{key} at {value}"
        for key, value in sorted(checkpoints.items())
        if key != SEARCH
    )
    detail = f"search index at seq {search_seq} of {last_seq}: {lag} events behind" + (
        f" (also {others})" if others else ""
    )
    if lag > options.max_projection_lag:
        return _failed(
            name,
            f"{detail}, more than {options.max_projection_lag}",
            "check the Celery checks and the worker's log (DIR/logs/celery-worker.log) for projection "
            "errors; `tiermem projections run --data-dir DIR` catches the projections up by hand",
        )
    return _passed(name, detail)


# ----------------------------------------------------------------- celery


def check_celery(config: StackConfig, options: DoctorOptions) -> list[Check]:
    """Ask every Celery worker which queues it consumes, and check each of tiermem's queues."""
    if config.broker_url is None:
        return [_unset(f"celery.{queue}", "broker_url") for queue in QUEUES]
    from kombu.exceptions import OperationalError

    from replay.celery_app import create_app

    app = create_app(config)
    try:
        replies = app.control.inspect(timeout=options.timeout_s).active_queues() or {}
    except (OperationalError, OSError, redis.RedisError) as error:
        return [
            _failed(
                f"celery.{queue}",
                f"cannot ask the workers through the broker at {config.broker_url}: {error}",
                "fix the redis.broker check first",
            )
            for queue in QUEUES
        ]
    finally:
        app.close()
    consumers: dict[str, list[str]] = {queue: [] for queue in QUEUES}
    for worker, queues in sorted(replies.items()):
        for queue in queues or []:
            if queue.get("name") in consumers:
                consumers[queue["name"]].append(worker)
    checks = []
    for queue in QUEUES:
        name = f"celery.{queue}"
        if consumers[queue]:
            checks.append(_passed(name, f"consumed by {', '.join(consumers[queue])}"))
            continue
        seen = (
            f" ({len(replies)} worker(s) replied, none consuming it)"
            if replies
            else " (no worker replied)"
        )
        checks.append(
            _failed(
                name,
                f"no Celery worker consumes the {queue} queue within {options.timeout_s:.1f} s{seen}",
                "start a worker: `tiermem up` starts one; elsewhere run `TIERMEM_CONFIG=DIR/stack.json celery "
                "-A replay.celery_app worker --queues memory_ops,processing,maintenance,replay`",
            )
        )
    return checks


# ----------------------------------------------------------------- beat

_START_BEAT = (
    "read DIR/logs/celery-beat.log for why beat stopped, then restart the stack with `tiermem up`, "
    "which starts beat; a beat run apart from `tiermem up` starts with "
    "`TIERMEM_CONFIG=DIR/stack.json celery -A replay.celery_app beat` on its host"
)


def check_beat(config: StackConfig, options: DoctorOptions, *, now: float | None = None) -> Check:
    """Check that Celery beat runs: from its schedule file when it is on this host, else from the log.

    Beat writes `DIR/celerybeat-schedule.json` when it starts and each time
    it sends a task, with every entry's last send time, and it sends the
    projection run every `projection_interval_s`. Without the file (beat runs on another host),
    the log must contain the `Maintain` that beat scheduled for the current
    slot of `maintain_interval_s` or the one before, found by its event id.
    `now` is the Unix time to compare with, the clock by default.
    """
    name = "celery.beat"
    if config.broker_url is None:
        return _unset(name, "broker_url")
    now = time.time() if now is None else now
    path = schedule_path(config)
    if path.exists():
        return _beat_from_schedule(config, path, now)
    return _beat_from_log(config, options, now)


def _beat_from_schedule(config: StackConfig, path: Path, now: float) -> Check:
    name = "celery.beat"
    state = read_schedule_state(path)
    if state is None or not state.entries:
        return _failed(
            name,
            f"beat's schedule file {path} cannot be read or lists no tasks",
            f"stop beat, delete {path} and start beat again, which writes it anew; {_START_BEAT}",
        )

    # A beat that starts again writes the file with the send times it
    # restored, which are old, so the file's modification time counts too.
    sent = max(
        entry.last_run_at.replace(tzinfo=entry.last_run_at.tzinfo or timezone.utc).timestamp()
        for entry in state.entries.values()
    )
    try:
        written = path.stat().st_mtime
    except OSError:
        written = sent

    age = max(0.0, now - max(sent, written))
    shortest = min(config.projection_interval_s, config.maintain_interval_s, config.snapshot_interval_s)
    limit = 2 * shortest + BEAT_SLACK_S
    detail = (
        f"beat (pid {state.beat_pid}) last wrote {path} {age:.1f} s ago; "
        f"it sends a task every {shortest:g} s and rewrites the file each time"
    )
    if age > limit:
        return _failed(
            name,
            f"{detail}, so it has stopped: nothing written for more than {limit:g} s. Without beat, no "
            "Maintain, projection run or snapshot is scheduled",
            _START_BEAT,
        )
    return _passed(name, detail)


def _beat_from_log(config: StackConfig, options: DoctorOptions, now: float) -> Check:
    from replay.tasks.maintenance import maintenance_event_id

    name = "celery.beat"
    if config.log_url is None:
        return _unset(name, "log_url")
    interval = config.maintain_interval_s
    slot = slot_number(now, interval)
    ids = [maintenance_event_id(interval, slot - back) for back in range(BEAT_LOOKBACK_SLOTS)]
    event_log = _event_log(config, options)
    try:
        found = event_log.lookup(ids)
    except redis.RedisError as error:
        return _failed(
            name,
            f"not checked: beat's schedule file {schedule_path(config)} is not on this host, and the log "
            f"cannot be read: {error}",
            "fix the redis.log check first, or run doctor on beat's host",
        )
    finally:
        event_log.client.close()
    back = next((index for index, logged in enumerate(found) if logged is not None), None)
    where = f"beat's schedule file {schedule_path(config)} is not on this host, so the log was read"
    if back is not None and back <= 1:
        logged = found[back]
        return _passed(
            name,
            f"{where}: the Maintain that beat scheduled for slot {slot - back} is at seq {logged.seq}; "
            f"beat sends one every {interval:g} s",
        )
    if back is None:
        last = f"no Maintain that beat scheduled is in the log for the last {BEAT_LOOKBACK_SLOTS} slots"
    else:
        last = f"the last Maintain that beat scheduled is from {back} slots ago (seq {found[back].seq})"
    return _failed(
        name,
        f"{where}: {last} of {interval:g} s. A beat started less than two slots ago has not sent one yet",
        "check that beat runs on its host (run doctor there, where it reads DIR/celerybeat-schedule.json) "
        "and that the celery.maintenance check passes, because a worker on that queue sends beat's "
        f"Maintain to the router; {_START_BEAT}",
    )


# ----------------------------------------------------------------- running


def run_doctor(
    config: StackConfig,
    endpoints: dict[str, str] | None,
    options: DoctorOptions | None = None,
) -> Report:
    """Run every check against the stack that `config` and `endpoints` describe.

    `endpoints` are the router's lanes (as in `DIR/endpoints.json`), or None
    when they are unknown. The checks that wait on the network run in
    parallel.
    """
    options = options or DoctorOptions()

    def bus_checks() -> list[Check]:
        lanes = check_lanes(config, endpoints, options)
        shards, status = check_shards(config, endpoints, options)
        return [*lanes, shards, check_apply_lag(config, status, options)]

    def redis_checks() -> list[Check]:
        return [
            check_log_redis(config, options),
            check_tier_redis("stm", config.stm_url, options),
            check_tier_redis("im", config.im_url, options),
            check_broker(config, options),
        ]

    groups: list[Callable[[], list[Check]]] = [
        lambda: [
            check_disk(config, options),
            check_projection_lag(config, options),
            check_beat(config, options),
        ],
        redis_checks,
        lambda: [check_ray(config, options)],
        bus_checks,
        lambda: check_celery(config, options),
    ]
    with ThreadPoolExecutor(
        max_workers=len(groups), thread_name_prefix="doctor"
    ) as pool:
        futures = [pool.submit(group) for group in groups]
        checks = [check for future in futures for check in future.result()]
    position = {name: index for index, name in enumerate(CHECK_ORDER)}
    checks.sort(key=lambda check: position.get(check.name, len(position)))
    return Report(ok=all(check.ok for check in checks), checks=checks)


def settings_failed(error: Exception) -> Report:
    """Return the report of a run that could not load the settings or find the stack."""
    check = _failed(
        "settings",
        str(error),
        "correct the setting or file that the detail names, or pass --data-dir of a running stack or --config FILE",
    )
    return Report(ok=False, checks=[check])


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "ray-probe":
        return _ray_probe(argv[1])
    print(
        "usage: python -m tiermem.doctor ray-probe ADDRESS (used by `tiermem doctor`)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
