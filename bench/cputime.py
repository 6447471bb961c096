"""CPU time per process, read from /proc, to split a workload's cost by process."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["CpuMeter"]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of `pid` and its threads, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime 14 and stime 15 of
    # proc(5), so indexes 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


class CpuMeter:
    """Sums the CPU seconds that named processes spend between `start` and `stop` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start: dict[str, tuple[int, float]] = {}

    def start(self, pids: Mapping[str, int]) -> None:
        self._start = {}
        for name, pid in pids.items():
            used = cpu_seconds(pid)
            if used is not None:
                self._start[name] = (pid, used)

    def stop(self) -> None:
        for name, (pid, before) in self._start.items():
            after = cpu_seconds(pid)
            if after is not None and after >= before:
                self.seconds[name] = self.seconds.get(name, 0.0) + after - before
        self._start = {}

    def per_event_us(self, events: int) -> dict[str, float]:
        """Return each process's CPU microseconds per event, largest first."""
        if events <= 0:
            return {}
        ranked = sorted(self.seconds.items(), key=lambda item: item[1], reverse=True)
        return {name: round(seconds / events * 1e6, 1) for name, seconds in ranked}
