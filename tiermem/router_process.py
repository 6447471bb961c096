"""The router process: connect to Ray, start the shard actors, serve the lanes.

`tiermem up` runs this as a child process (`python -m tiermem.router_process
CONFIG`), so the router can be killed and restarted on its own while Redis
and Ray keep running. Killing it also ends its shard actors, which Ray ties
to the process that created them; the next router creates new ones, and
they recover from the tiers and the log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import redis
import structlog

from bus.dispatch import RayDispatcher, Waker
from bus.router import Router
from events.errors import TiermemError
from events.log import RedisEventLog, check_log_config
from handlers.actor import ShardSettings
from tiermem.config import StackConfig, load_stack_config
from tiermem.logs import configure_logging

__all__ = ["main", "run_router", "shard_settings"]

log = structlog.get_logger("tiermem.router_process")


def shard_settings(config: StackConfig) -> list[ShardSettings]:
    if not (config.log_url and config.stm_url and config.im_url):
        raise ValueError("log_url, stm_url and im_url must be set before the router starts")
    return [
        ShardSettings(
            shard=index,
            shards=config.shards,
            log_url=config.log_url,
            stm_url=config.stm_url,
            im_url=config.im_url,
            ltm_dir=config.ltm_dir,
            policy=config.policy,
            log_stream=config.log_stream,
            snapshot_dir=str(Path(config.data_dir) / "snapshots"),
            pools=config.pools,
        )
        for index in range(config.shards)
    ]


def search_service(db_path: Path):
    """Return the router's search callable over the search projection at `db_path`."""
    from events.errors import ErrorCode
    from events.types import Error, Results, Search
    from replay.projections import search, wait_for_seq

    def serve(event: Search):
        if event.min_seq and not wait_for_seq(db_path, event.min_seq, event.wait_ms / 1000):
            return Error(
                id=event.id,
                code=ErrorCode.UNAVAILABLE,
                message=f"the search index has not reached seq {event.min_seq} after {event.wait_ms} ms; retry later",
            )
        hits, index_seq = search(db_path, event.namespace, event.query, event.limit, now_ms=event.ts)
        return Results(id=event.id, seq=event.seq or 0, index_seq=index_seq, hits=hits)

    return serve


def run_router(config: StackConfig, endpoints_path: Path | None) -> None:
    """Start everything the router needs and serve until SIGTERM or SIGINT."""
    import ray

    started = time.monotonic()
    log_client = redis.Redis.from_url(config.log_url or "")
    check_log_config(log_client, allow_everysec=config.allow_everysec)
    event_log = RedisEventLog(log_client, stream=config.log_stream)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=config.ray_address, namespace="tiermem", log_to_driver=False, logging_level="WARNING")
    waker = Waker()
    dispatcher = RayDispatcher(shard_settings(config), waker, shard_resources=config.shard_resources)
    statuses = dispatcher.wait_ready(timeout=600)
    for status in statuses:
        log.info("shard.ready", shard=status.shard, watermark=status.watermark, pid=status.pid, recovery=status.recovery and status.recovery.replayed)

    from replay.metrics import projection_checkpoint_reader

    router = Router(
        config.router,
        event_log,
        dispatcher,
        waker,
        search=search_service(Path(config.projections_db)),
        projection_checkpoint=projection_checkpoint_reader(config.projections_db),
    )
    endpoints = router.bind()

    def request_stop(signum: int, frame: object) -> None:
        log.info("router.stopping", signal=signal.Signals(signum).name)
        router.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if endpoints_path is not None:
        record = dict(endpoints, router_pid=os.getpid())
        if router.metrics_url:
            record["metrics"] = router.metrics_url
        tmp = endpoints_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(endpoints_path)
    log.info("router.ready", seconds=round(time.monotonic() - started, 2), last_seq=router.seq)
    try:
        router.serve_forever()
    finally:
        router.close()
        dispatcher.close()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tiermem.router_process CONFIG.json ENDPOINTS.json", file=sys.stderr)
        return 2
    configure_logging()
    config = load_stack_config(Path(argv[0]))
    try:
        run_router(config, Path(argv[1]))
    except TiermemError as error:
        log.error("router.start.failed", error=str(error))
        print(f"tiermem router: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
