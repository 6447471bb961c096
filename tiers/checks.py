"""Argument checks that every tier backend runs before it touches storage.

Each check raises before any write, so a rejected commit leaves the tier as
it was, and all backends reject the same input with the same message.
"""

from __future__ import annotations

from tiers.base import TIER_NAMES, TierWrites

__all__ = [
    "WATERMARK_NAME",
    "check_control",
    "check_control_name",
    "check_identity",
    "check_watermark",
    "check_writes",
]

# Backends store the watermark next to the control values, under this name.
WATERMARK_NAME = "wm"


def check_identity(name: str, shard: int) -> None:
    """Raise ValueError unless `name` is a tier name and `shard` is 0 or more."""
    if name not in TIER_NAMES:
        raise ValueError(
            f"tier name {name!r} is invalid: use one of {', '.join(TIER_NAMES)}"
        )
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise ValueError(f"shard {shard!r} is invalid: use an int of 0 or more")


def check_watermark(watermark: int) -> None:
    """Raise ValueError unless `watermark` is an int of 0 or more."""
    if not isinstance(watermark, int) or isinstance(watermark, bool) or watermark < 0:
        raise ValueError(
            f"watermark {watermark!r} is invalid: use a sequence number of 0 or more"
        )


def check_control_name(name: str) -> None:
    """Raise ValueError unless `name` can name a control value."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"control name {name!r} is invalid: use a non-empty str")
    if name == WATERMARK_NAME:
        raise ValueError(
            f"control name {name!r} is reserved for the watermark: "
            "set it with the watermark argument of commit"
        )


def check_control(control: dict[str, bytes | None] | None) -> None:
    """Raise ValueError or TypeError unless every control entry is valid."""
    for name, value in (control or {}).items():
        check_control_name(name)
        if value is not None and not isinstance(value, bytes):
            raise TypeError(
                f"control value for {name!r} has type {type(value).__name__}: "
                "use bytes, or None to delete the entry"
            )


def _check_identifier(namespace: str, key: str) -> None:
    # Redis stores a record under namespace + NUL + key, so a NUL would let
    # two different records share one field.
    if "\0" in namespace or "\0" in key:
        raise ValueError(
            f"record ({namespace!r}, {key!r}) is invalid: namespace and key "
            "must not contain NUL"
        )


def check_writes(writes: TierWrites) -> None:
    """Raise ValueError unless `writes` can be applied as one commit.

    A (namespace, key) may repeat inside one list (the last entry wins), but
    must not appear in more than one of puts, touches and deletes, because the
    result would depend on the order in which a backend applies the lists.
    """
    owner: dict[tuple[str, str], str] = {}
    identities = (
        ("puts", [(record.namespace, record.key) for record in writes.puts]),
        ("touches", [(namespace, key) for namespace, key, _ in writes.touches]),
        ("deletes", list(writes.deletes)),
    )
    for list_name, keys in identities:
        for namespace, key in keys:
            _check_identifier(namespace, key)
            first = owner.setdefault((namespace, key), list_name)
            if first != list_name:
                raise ValueError(
                    f"record ({namespace!r}, {key!r}) is in both {first} and "
                    f"{list_name} of one commit: a record may be in only one"
                )
