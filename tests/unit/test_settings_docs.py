"""docs/configuration.md against the Struct definitions, and the rules against the Structs' own checks."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from tiermem.config import StackConfig
from tiermem.settings import (
    TABLE_END,
    TABLE_START,
    SettingsError,
    describe_settings,
    load_settings,
    settings_table,
    unused_descriptions,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

REGENERATE = (
    "regenerate it with `python -m tiermem.settings --write docs/configuration.md`"
)


def test_every_setting_described():
    undescribed = [info.name for info in describe_settings() if not info.description]

    assert undescribed == [], (
        f"add a description to tiermem/settings.py _DESCRIPTIONS for: {undescribed}"
    )


def test_no_description_of_a_removed_setting():
    assert unused_descriptions() == []


def test_every_number_has_a_rule():
    numbers = [
        info
        for info in describe_settings()
        if info.type.split()[0] in ("integer", "number")
    ]
    unruled = [info.name for info in numbers if info.allowed == "any"]

    assert numbers
    assert unruled == [], f"add a rule to tiermem/settings.py _RULES for: {unruled}"


def test_doc_table_matches_structs():
    document = DOC.read_text(encoding="utf-8")
    _, _, rest = document.partition(TABLE_START)
    table, found_end, _ = rest.partition(TABLE_END)

    assert found_end, f"{DOC} lacks the markers {TABLE_START} and {TABLE_END}"
    assert table.strip() == settings_table().strip(), (
        f"the settings table in {DOC} is out of date; {REGENERATE}"
    )


def test_doc_lists_every_setting_by_name():
    document = DOC.read_text(encoding="utf-8")
    missing = [
        info.name
        for info in describe_settings()
        if f"| `{info.name}` |" not in document
    ]

    assert missing == [], f"{DOC} does not document {missing}; {REGENERATE}"


def _nested(name: str, value: object) -> dict:
    data: dict = {}
    node = data
    *parents, last = name.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    "info",
    [
        info
        for info in describe_settings()
        if info.type.split()[0] in ("integer", "number")
    ],
    ids=lambda info: info.name,
)
def test_rules_reject_what_structs_reject(info):
    # A check added to a Struct's __post_init__ must have a rule here too,
    # or its message would lack the value's source.
    for value in (0, -1):
        try:
            msgspec.convert(_nested(info.name, value), StackConfig)
        except msgspec.ValidationError:
            with pytest.raises(SettingsError):
                load_settings(environ={info.env: str(value)})
