"""Schema versions and the upcasters that lift old event shapes to the current one.

Rules for changing an event type, so every log ever written stays readable:

1. A new field gets a default; that alone needs no new version.
2. Any other change (renaming, retyping, removing a field) bumps the type's
   `v` default and registers an upcaster from the previous version, which
   takes the decoded map and returns the map of the next version.
3. Every upcaster has a replay test with an event of the old shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from events.types import EVENT_TYPES

__all__ = ["CURRENT_VERSIONS", "Upcaster", "needs_upcast", "register", "upcast"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

CURRENT_VERSIONS: dict[str, int] = {
    cls.__struct_config__.tag: cls.__struct_defaults__[cls.__struct_fields__.index("v")]
    for cls in EVENT_TYPES
}

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that lifts `type_name` from `from_version` by one."""

    def decorate(function: Upcaster) -> Upcaster:
        key = (type_name, from_version)
        if key in _UPCASTERS:
            raise ValueError(f"an upcaster for {type_name} v{from_version} exists")
        _UPCASTERS[key] = function
        return function

    return decorate


def needs_upcast(type_name: str, version: int) -> bool:
    """Return whether a message of this type and version is older than current."""
    current = CURRENT_VERSIONS.get(type_name)
    return current is not None and version < current


def upcast(message: dict[str, Any]) -> dict[str, Any]:
    """Apply upcasters until the map has its type's current version.

    Raises `KeyError` when a step has no upcaster; callers turn that into an
    `unsupported_version` error.
    """
    type_name = message["type"]
    version = message.get("v", 1)
    current = CURRENT_VERSIONS[type_name]
    while version < current:
        step = _UPCASTERS[(type_name, version)]
        message = step(dict(message))
        version += 1
        message["v"] = version
    return message


@register("Store", 1)
def _store_v1_to_v2(message: dict[str, Any]) -> dict[str, Any]:
    """Store v1 carried tags as one comma-separated string: split it."""
    tags = message.get("tags")
    if isinstance(tags, str):
        message["tags"] = [tag.strip() for tag in tags.split(",") if tag.strip()]
    return message


@register("Forget", 1)
def _forget_v1_to_v2(message: dict[str, Any]) -> dict[str, Any]:
    """Forget v1 always named a key, which v2 reads the same way.

    A v1 Forget without `key` is rejected, not read as a Forget of the
    whole namespace: a v1 client that left the key out made a mistake.
    """
    if message.get("key") is None:
        raise msgspec.ValidationError("Object missing required field `key`")
    return message
