"""The machine and the software versions a benchmark run measured."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["load_average", "machine_info", "versions"]


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages (empty where unsupported)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _redis_server_version() -> str | None:
    from tiermem.servers import ServerError, find_redis_server

    try:
        binary = find_redis_server()
    except ServerError:
        return None
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    # "Redis server v=7.0.15 sha=... malloc=..." -> "7.0.15"
    for part in output.split():
        if part.startswith("v="):
            return part.removeprefix("v=")
    return output.strip() or None


def source_revision() -> str | None:
    """Return the git commit of the tiermem checkout, with "-dirty" if tracked files changed."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if changed else commit


def versions() -> dict[str, str | None]:
    import zmq

    return {
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "redis-server": _redis_server_version(),
        "redis-py": _package_version("redis"),
        "hiredis": _package_version("hiredis"),
        "ray": _package_version("ray"),
        "msgspec": _package_version("msgspec"),
        "eventsourcing": _package_version("eventsourcing"),
        "tiermem": _package_version("tiermem"),
        "tiermem source": source_revision(),
    }
