"""Sampling profiles of running processes with py-spy, and their summaries.

`Profiler.record` attaches `py-spy record` to each given pid for the length
of a `with` block, in py-spy's raw (collapsed stack) format, and
`summarize` turns such a file into self and inclusive sample counts per
function and self counts per package. py-spy must be able to ptrace the
target, which on Linux means running as root or with CAP_SYS_PTRACE (or
`kernel.yama.ptrace_scope` = 0 for a child of the same user).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

__all__ = ["Profiler", "find_py_spy", "summarize"]

log = structlog.get_logger("tiermem.bench.profile")

# Samples per second. py-spy's default is 100; it runs with --nonblocking,
# so the target is never paused, at the price of an occasional torn stack.
RATE_HZ = 100
_TOP = 25
# "func (path/to/file.py:123)" -> ("func", "path/to/file.py")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    """Return the py-spy next to this interpreter, or the one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _short_path(path: str) -> str:
    """Return a path relative to site-packages, the standard library or the cwd."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    stdlib = re.search(r"/lib/python3\.\d+/", path)
    if stdlib is not None:
        return path[stdlib.end() :]
    return path.removeprefix(str(Path.cwd()) + "/")


def _frame_name(frame: str) -> tuple[str, str]:
    """Return (function with its file, package) of one raw frame."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame
    path = _short_path(match["path"])
    package = path.split("/", 1)[0] if "/" in path else path
    return f"{match['function']} ({path})", package


def summarize(path: Path) -> dict[str, Any]:
    """Count samples per function (self and inclusive), per package and per thread."""
    total = 0
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        total += count
        threads[re.sub(r"\s*\(\d+\)$", "", thread) or "thread"] += count
        if not frames:
            continue
        names = [_frame_name(frame) for frame in frames]
        leaf, leaf_package = names[-1]
        self_counts[leaf] += count
        packages[leaf_package] += count
        for name in {name for name, _ in names}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "samples": samples,
                "share": round(samples / total, 4) if total else 0.0,
            }
            for name, samples in counter.most_common(_TOP)
        ]

    return {
        "samples": total,
        "threads": share(threads),
        "self": share(self_counts),
        "inclusive": share(inclusive),
        "packages": share(packages),
    }


class Profiler:
    """Records profiles into `directory`, one raw file per process and label."""

    def __init__(self, directory: Path, executable: str | None = None) -> None:
        self.directory = directory
        self.executable = executable or find_py_spy()
        if self.executable is None:
            raise FileNotFoundError(
                "py-spy not found: install it with `pip install py-spy` to use --profile"
            )
        self.files: dict[str, list[Path]] = {}

    @contextmanager
    def record(self, label: str, pids: dict[str, int]) -> Iterator[None]:
        """Sample each named pid while the block runs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for name, pid in pids.items():
            key = f"{label}/{name}"
            output = (
                self.directory / f"{label}-{name}-{len(self.files.get(key, []))}.txt"
            )
            command = [
                self.executable, "record", "--pid", str(pid),
                "--rate", str(RATE_HZ), "--format", "raw", "--output", str(output),
                "--nonblocking", "--threads", "--duration", "3600",
            ]  # fmt: skip
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            running.append((key, process, output))
        try:
            yield
        finally:
            for key, process, output in running:
                # py-spy writes its output when interrupted, as on Ctrl-C.
                process.send_signal(signal.SIGINT)
                try:
                    _, stderr = process.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    _, stderr = process.communicate()
                if output.exists():
                    self.files.setdefault(key, []).append(output)
                else:
                    log.error(
                        "bench.profile.failed",
                        process=key,
                        status=process.returncode,
                        error=stderr.decode(errors="replace").strip()[:300],
                    )

    def summaries(self) -> dict[str, Any]:
        """Summarize every recorded file, merged per scenario label and process name."""
        result = {}
        for key, files in self.files.items():
            merged = self.directory / f"{key.replace('/', '-')}-all.txt"
            with merged.open("w") as out:
                for path in files:
                    out.write(path.read_text(errors="replace"))
            result[key] = {"file": str(merged), **summarize(merged)}
        return result
