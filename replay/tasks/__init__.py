"""Celery tasks, one module per queue area.

| module | queue | tasks |
| --- | --- | --- |
| `replay.tasks.memory` | `memory_ops` | `tiermem.memory.publish_event`, `tiermem.memory.store_memory` |
| `replay.tasks.maintenance` | `maintenance` | `tiermem.maintenance.maintain`, sent by beat |
| `replay.tasks.erase` | `maintenance` | `tiermem.maintenance.erase`, sent by beat |
| `replay.tasks.id_index` | `maintenance` | `tiermem.maintenance.trim_ids`, sent by beat |
| `replay.tasks.projections` | `processing` | projection batches |
| `replay.tasks.replay` | `replay` | rebuild and verify jobs |

Import the task modules themselves. This package imports none of them,
because `replay.celery_app` looks them up while it is being imported, and
each of them imports `replay.celery_app`.
"""
