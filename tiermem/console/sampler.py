"""The overview's samples: the stack's counters, read at a fixed interval into a ring buffer.

Each sample contains the router's last seq, its lane counters and each
shard's watermark, from one `Status` request. From the projection database
it takes the records and bytes per tier and the checkpoint of every
projection. The rates and lags are derived from the previous sample and the
live feed. Whatever could not
be read is None in the sample, and `problems` states why in plain words.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from bus.client import Client, RequestTimeout
from events.errors import TiermemError
from events.types import Status, StatusReply
from tiermem.console.feed import EventFeed
from tiermem.console.sources import ConsoleError, StackSources

__all__ = ["Sampler", "projection_problem"]

log = structlog.get_logger("tiermem.console")

# A projection that stays behind the log for this long is reported: the
# Celery beat catches the projections up every second by default, so a
# short lag under load is normal.
BEHIND_AFTER_S = 5.0


def projection_problem(name: str, checkpoint: int, last_seq: int, data_dir: str) -> str:
    """Return the plain-words warning for a projection that stays behind the log."""
    return (
        f"the {name} projection is {last_seq - checkpoint:,} events behind the log "
        f"(it has read up to seq {checkpoint:,}, the log is at seq {last_seq:,}), so key lists, "
        "search and history miss the newest events. The Celery worker catches it up every "
        f"second; if this lasts, see {data_dir}/logs/celery-worker.log"
    )


class Sampler:
    """Read the stack's counters every `interval_s` seconds; keep the last `samples`.

    `on_sample(sample)` is called from the sampling thread after each sample.
    """

    def __init__(
        self,
        sources: StackSources,
        feed: EventFeed | None,
        *,
        interval_s: float,
        samples: int,
        on_sample: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.sources = sources
        self.feed = feed
        self.interval_s = interval_s
        self.on_sample = on_sample
        self._samples: deque[dict[str, Any]] = deque(maxlen=samples)
        self._previous: dict[str, Any] | None = None
        self._previous_at = 0.0
        self._behind_since: dict[str, float] = {}
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_problems: list[str] = []

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="console-sampler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._client is not None:
            self._client.close()
            self._client = None

    def samples(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._samples)

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def _run(self) -> None:
        failure = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                sample = self.take()
            except Exception as error:
                # Logged and not raised: one failed sample must not stop the plots.
                if repr(error) != failure:
                    log.exception(
                        "console.sample.failed",
                        error=repr(error),
                        next="sampling again",
                    )
                failure = repr(error)
            else:
                failure = None
                if self.on_sample is not None:
                    self.on_sample(sample)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    # ----------------------------------------------------------- one sample

    def take(self) -> dict[str, Any]:
        """Read every counter once, store the sample and return it."""
        now = time.monotonic()
        problems: list[str] = []
        status = self._status(problems)
        tiers, namespaces, checkpoints = self._projections(problems)

        sample: dict[str, Any] = {
            "t": int(time.time() * 1000),
            "last_seq": status.last_seq if status else None,
            "lanes": dict(status.lanes) if status else None,
            "lane_rates": None,
            "ingest_rate": None,
            "apply_rate": None,
            "shards": [],
            "tiers": tiers,
            "namespaces": namespaces,
            "projections": checkpoints,
            "projection_lag": None,
            "problems": problems,
        }

        if status is not None:
            self._add_shards(sample, status)
        self._add_rates(sample, now)
        self._add_projection_lag(sample, now, problems)
        if (
            self.feed is not None
            and self.feed.problem is not None
            and status is not None
        ):
            problems.append(
                f"the live event feed is not receiving: {self.feed.problem}"
            )

        if problems != self._last_problems:
            for problem in problems:
                if problem not in self._last_problems:
                    log.warning("console.sample.problem", problem=problem)
            self._last_problems = list(problems)
        with self._lock:
            self._samples.append(sample)
        self._previous, self._previous_at = sample, now
        return sample

    def _status(self, problems: list[str]) -> StatusReply | None:
        try:
            if self._client is None:
                self._client = self.sources.client()
            reply = self._client.request(Status(), lane="high")
        except RequestTimeout:
            self._client.close()
            self._client = None
            problems.append(
                f"the router did not reply to a Status request within {self.sources.bus_timeout_s:g} s: "
                f"it is down or overloaded. Is `tiermem up --data-dir {self.sources.data_dir}` running?"
            )
            return None
        except ConsoleError as error:
            problems.append(str(error))
            return None
        except TiermemError as error:
            problems.append(f"the router rejected a Status request: {error}")
            return None
        if not isinstance(reply, StatusReply):
            problems.append(
                f"the router replied to Status with {type(reply).__name__}, not the expected reply; try again in a moment"
            )
            return None
        return reply

    def _projections(
        self, problems: list[str]
    ) -> tuple[dict[str, Any] | None, int | None, dict[str, int] | None]:
        try:
            conn = self.sources.open_projections()
        except ConsoleError as error:
            problems.append(str(error))
            return None, None, None
        try:
            checkpoints = dict(
                conn.execute(
                    "SELECT name, seq FROM projection_checkpoints ORDER BY name"
                ).fetchall()
            )
            tiers = {tier: {"records": 0, "bytes": 0} for tier in ("stm", "im", "ltm")}
            for tier, records, size in conn.execute(
                "SELECT tier, sum(records), sum(bytes) FROM stats_tiers GROUP BY tier"
            ):
                tiers[tier] = {"records": records, "bytes": size}
            namespaces = conn.execute(
                "SELECT count(DISTINCT namespace) FROM stats_tiers"
            ).fetchone()[0]
        except sqlite3.OperationalError as error:
            # A new database has no tables until the first projection run.
            problems.append(
                f"the projection database {self.sources.projections_db} cannot be read yet ({error}); "
                "the Celery worker creates its tables on its first run"
            )
            return None, None, None
        finally:
            conn.close()
        return tiers, namespaces, checkpoints

    def _add_shards(self, sample: dict[str, Any], status: StatusReply) -> None:
        watermarks = {item.shard: item.watermark for item in status.shards}
        lags = self.feed.settle(watermarks) if self.feed is not None else {}
        previous = {
            item["shard"]: item for item in (self._previous or {}).get("shards", [])
        }
        for item in status.shards:
            lag = lags.get(item.shard)
            sample["shards"].append(
                {
                    "shard": item.shard,
                    "watermark": item.watermark,
                    "keys": item.keys,
                    "pid": item.pid,
                    "node": item.node,
                    "pending": lag["pending"] if lag else None,
                    "at_least": lag["at_least"] if lag else False,
                    "applied": lag["applied"] if lag else None,
                    "apply_rate": None,
                    "_before": previous.get(item.shard, {}).get("applied"),
                }
            )

    def _add_rates(self, sample: dict[str, Any], now: float) -> None:
        previous = self._previous
        elapsed = now - self._previous_at
        shards = sample["shards"]
        if previous is None or elapsed <= 0:
            for shard in shards:
                shard.pop("_before", None)
            return
        if sample["last_seq"] is not None and previous["last_seq"] is not None:
            sample["ingest_rate"] = max(
                0.0, (sample["last_seq"] - previous["last_seq"]) / elapsed
            )
        if sample["lanes"] is not None and previous["lanes"] is not None:
            sample["lane_rates"] = {
                lane: max(0.0, (count - previous["lanes"].get(lane, 0)) / elapsed)
                for lane, count in sample["lanes"].items()
            }
        total = 0.0
        known = False
        for shard in shards:
            before = shard.pop("_before", None)
            if before is not None and shard["applied"] is not None:
                shard["apply_rate"] = max(0.0, (shard["applied"] - before) / elapsed)
                total += shard["apply_rate"]
                known = True
        sample["apply_rate"] = total if known else None

    def _add_projection_lag(
        self, sample: dict[str, Any], now: float, problems: list[str]
    ) -> None:
        last_seq = sample["last_seq"]
        checkpoints = sample["projections"]
        if last_seq is None or checkpoints is None:
            self._behind_since.clear()
            return
        sample["projection_lag"] = {
            name: max(0, last_seq - seq) for name, seq in checkpoints.items()
        }
        for name, lag in sample["projection_lag"].items():
            if lag == 0:
                self._behind_since.pop(name, None)
                continue
            since = self._behind_since.setdefault(name, now)
            if now - since >= BEHIND_AFTER_S:
                problems.append(
                    projection_problem(
                        name, checkpoints[name], last_seq, str(self.sources.data_dir)
                    )
                )
