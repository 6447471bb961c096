"""The erasure task: one erasure pass over the stack's files, on queue `maintenance`.

Beat sends it every `erase_interval_s`. A pass is idempotent: run twice, or
redelivered after its worker died, it rewrites nothing more the second time
(see `replay.erase`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from celery import Task

from replay.celery_app import ERASE_TASK, app
from replay.erase import erase_stack

__all__ = ["erase"]


@app.task(bind=True, name=ERASE_TASK)
def erase(self: Task, force: bool = False) -> dict[str, Any]:
    """Run one erasure pass; return its report as a dict."""
    return msgspec.to_builtins(erase_stack(self.app.conf.tiermem_stack, force=force))
