"""Projections: read models (search, stats, history) built from the log and effects.

Layout: `runner` consumes the log into one SQLite database, and `db` owns
that file and its checkpoints. `base` defines the projection protocol and
stage pipelines, and `registry` picks the projections to run. `search`,
`stats` and `history` are the built-ins with their query functions, and
`text` splits text for search.

The package attributes `search`, `stats` and `history` are the query
functions, not the modules of the same names. Import other names from the
modules: `from replay.projections.search import search_projection`.
"""

from replay.projections.base import (
    EventWithEffects,
    OnError,
    Pipeline,
    Projection,
    Stage,
    StageReport,
)
from replay.projections.errors import DatabaseNotFoundError, LogGapError, ProjectionError
from replay.projections.history import HistoryEntry, audit, history
from replay.projections.registry import (
    builtin_projections,
    load_projection,
    register,
    registered_projections,
    unregister,
)
from replay.projections.runner import (
    ProjectionReport,
    ProjectionResult,
    follow_projections,
    run_projections,
)
from replay.projections.search import search, wait_for_seq
from replay.projections.stats import (
    KeyStats,
    NamespaceStats,
    StatsReport,
    TierUsage,
    cold_keys,
    hot_keys,
    stats,
)

__all__ = [
    "DatabaseNotFoundError",
    "EventWithEffects",
    "HistoryEntry",
    "KeyStats",
    "LogGapError",
    "NamespaceStats",
    "OnError",
    "Pipeline",
    "Projection",
    "ProjectionError",
    "ProjectionReport",
    "ProjectionResult",
    "Stage",
    "StageReport",
    "StatsReport",
    "TierUsage",
    "audit",
    "builtin_projections",
    "cold_keys",
    "follow_projections",
    "history",
    "hot_keys",
    "load_projection",
    "register",
    "registered_projections",
    "run_projections",
    "search",
    "stats",
    "unregister",
    "wait_for_seq",
]
