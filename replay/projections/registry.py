"""Which projections the runner keeps: the built-ins, registered ones and named ones.

A custom projection joins in one of two ways. Code that runs before the
runner calls `register(projection)`. Or a configuration names it as
`module:attribute` (or `path/to/file.py:attribute`), which
`load_projection` imports. An attribute that is a class or a factory
function is called with no arguments. Both kinds run under the same
checkpoint rules as the built-ins.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

import xxhash

from replay.projections.base import Projection, check_name
from replay.projections.errors import ProjectionError
from replay.projections.history import HISTORY, history_projection
from replay.projections.search import SEARCH, search_projection
from replay.projections.stats import STATS, stats_projection

__all__ = [
    "BUILTIN_NAMES",
    "builtin_projections",
    "load_projection",
    "register",
    "registered_projections",
    "resolve_projections",
    "unregister",
]

BUILTIN_NAMES = (SEARCH, STATS, HISTORY)

_registered: dict[str, Projection] = {}


def builtin_projections() -> list[Projection]:
    """Return new instances of the search, stats and history projections."""
    return [search_projection(), stats_projection(), history_projection()]


def _check_projection(candidate: object, source: str) -> Projection:
    if not isinstance(candidate, Projection):
        raise ProjectionError(
            f"{source} is a {type(candidate).__name__}, not a projection: it needs "
            "a `name` and the methods `setup(conn)` and `apply(conn, batch)`"
        )
    check_name(candidate.name)
    return candidate


def register(projection: Projection) -> Projection:
    """Add a projection to those `run_projections` keeps by default; return it.

    Raises `ProjectionError` for a built-in name, or a name already
    registered for another object.
    """
    _check_projection(projection, repr(projection))
    name = projection.name
    if name in BUILTIN_NAMES:
        raise ProjectionError(f"projection name {name!r} is a built-in; choose another")
    existing = _registered.get(name)
    if existing is not None and existing is not projection:
        raise ProjectionError(
            f"a projection named {name!r} is already registered ({existing!r}); "
            "unregister it first or choose another name"
        )
    _registered[name] = projection
    return projection


def unregister(name: str) -> None:
    """Remove a registered projection; its tables and checkpoint stay in the database."""
    _registered.pop(name, None)


def registered_projections() -> list[Projection]:
    """Return the registered projections in registration order."""
    return list(_registered.values())


def _import_module(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ProjectionError(f"projection file {module_name!r} not found")
        unique = f"tiermem_projection_{path.stem}_{xxhash.xxh64_hexdigest(str(path).encode())}"
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise ProjectionError(f"cannot import projection file {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ProjectionError(
            f"cannot import projection module {module_name!r}: {error}"
        ) from error


def load_projection(spec: str) -> Projection:
    """Import the projection that `spec` names, as `module:attribute` or `file.py:attribute`.

    `attribute` may be dotted. If it is a class or a function, it is called
    with no arguments and must return a projection.
    """
    module_name, separator, attribute = spec.rpartition(":")
    if not separator or not module_name or not attribute:
        raise ProjectionError(
            f"projection spec {spec!r} is invalid: use module:attribute, for "
            "example examples/word_count_projection.py:projection"
        )
    target: object = _import_module(module_name)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise ProjectionError(
                f"projection spec {spec!r}: {module_name} has no attribute {attribute!r}"
            ) from error
    if inspect.isclass(target) or inspect.isfunction(target):
        target = target()
    return _check_projection(target, f"projection spec {spec!r}")


def resolve_projections(projections: Sequence[Projection | str] | None) -> list[Projection]:
    """Return the projections to run: the built-ins and registered ones for None.

    Strings are loaded with `load_projection`. Raises `ProjectionError` when
    two projections share a name.
    """
    if projections is None:
        chosen: list[Projection] = builtin_projections() + registered_projections()
    else:
        chosen = [
            load_projection(item) if isinstance(item, str) else _check_projection(item, repr(item))
            for item in projections
        ]
    names = [projection.name for projection in chosen]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ProjectionError(
            f"projections {duplicates} appear more than once: each name has one checkpoint"
        )
    return chosen
