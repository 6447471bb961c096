"""The maintenance task: one `Maintain` event on the bus's low lane per beat slot.

Beat sends `tiermem.maintenance.maintain` once per slot of
`maintain_interval_s` seconds (see `replay.celery_app.SlotSchedule`), with
the slot number fixed when it sends. The event id is derived from the slot,
so a task delivered twice, or sent by two beats in the same slot, makes one
maintenance pass, and each pass is in the log with the router's timestamp.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from events.types import Maintain
from replay.celery_app import MAINTAIN_TASK, app
from replay.tasks.memory import MAX_RETRIES, send_event, task_event_id

__all__ = ["maintain", "maintenance_event_id"]


def maintenance_event_id(interval_s: float, slot: int) -> str:
    """Return the event id of the pass for `slot`, e.g. `maintain:60000ms:29361234`.

    The interval is part of the id, because the same slot number means a
    different time once the interval changes.
    """
    return f"maintain:{round(interval_s * 1000)}ms:{slot}"


@app.task(bind=True, name=MAINTAIN_TASK, max_retries=MAX_RETRIES)
def maintain(
    self: Task, slot: int | None = None, interval_s: float | None = None
) -> dict[str, Any]:
    """Publish one `Maintain` for every namespace; return the router's reply as a dict.

    Without `slot` (a call made outside beat) the event id is derived from
    the task id instead.
    """
    if slot is None:
        event_id = task_event_id(self.request.id) if self.request.id else None
    else:
        if interval_s is None:
            interval_s = self.app.conf.tiermem_stack.maintain_interval_s
        event_id = maintenance_event_id(interval_s, slot)
    return send_event(self, Maintain(id=event_id), lane="low")
