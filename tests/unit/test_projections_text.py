"""Search text: value leaves, word splitting and FTS5 query building."""

from __future__ import annotations

import sqlite3

import pytest

from replay.projections.text import (
    TOKEN_CATEGORIES,
    index_text,
    match_expression,
    segment,
    strip_separators,
    value_text,
    words,
)

ZWSP = "\u200b"


def test_value_text_takes_string_leaves_in_order():
    value = {"title": "plan", "steps": ["buy", {"what": "milk", "n": 2}], "done": False}
    assert value_text(value) == "plan buy milk"


def test_value_text_of_scalars():
    assert value_text("hello") == "hello"
    assert value_text(42) == ""
    assert value_text(None) == ""
    assert value_text([]) == ""


def test_value_text_deep_nesting():
    value: object = "bottom"
    for _ in range(5000):
        value = [value]
    assert value_text(value) == "bottom"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("multi-agent", ["multi", "agent"]),
        ("don't", ["don", "t"]),
        ("a.md", ["a", "md"]),
        ('"unbalanced', ["unbalanced"]),
        ("NEAR", ["NEAR"]),
        ("col:value", ["col", "value"]),
        ("*", []),
        ("", []),
        ("   \t\n", []),
        ("AND OR NOT", ["AND", "OR", "NOT"]),
        ("Привет, мир!", ["Привет", "мир"]),
        ("مرحبا بالعالم", ["مرحبا", "بالعالم"]),
        ("東京は晴れ", ["東京は晴れ"]),
        ("नमस्ते", ["नमस्ते"]),
        ("pizza🍕", ["pizza🍕"]),
        ("ｆｕｌｌ width", ["full", "width"]),
    ],
)
def test_words_split(text, expected):
    assert words(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("multi-agent", '"multi" "agent"'),
        ("NEAR", '"NEAR"'),
        ("col:value", '"col" "value"'),
        ('"unbalanced', '"unbalanced"'),
        ("a.md", '"a" "md"'),
    ],
)
def test_match_expression_quotes_every_word(text, expected):
    assert match_expression(text) == expected


@pytest.mark.parametrize("text", ["", "*", '"', "()", "-", "^", ":", "🏽"])
def test_match_expression_none_without_words(text):
    assert match_expression(text) is None


def test_match_expression_segments_japanese():
    assert match_expression("東京") == f'"{ZWSP}東{ZWSP}京{ZWSP}"'


def test_segment_keeps_marks_with_their_base():
    assert segment("สวัสดี") == ZWSP + ZWSP.join(["ส", "วั", "ส", "ดี"]) + ZWSP


def test_segment_separates_from_latin_neighbours():
    assert segment("東京tower") == f"{ZWSP}東{ZWSP}京{ZWSP}tower"


def test_strip_separators_restores_text():
    for text in ["東京は晴れです", "สวัสดี", "plain text", "ramen 🍜 tonight"]:
        assert strip_separators(index_text(text)) == text


def test_index_text_drops_variation_selectors():
    assert index_text("❤️") == index_text("❤")


def test_expressions_parse_in_fts5():
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE VIRTUAL TABLE t USING fts5(body, "
        f"tokenize=\"unicode61 remove_diacritics 2 categories '{TOKEN_CATEGORIES}'\")"
    )
    conn.execute("INSERT INTO t VALUES (?)", (index_text("multi-agent NEAR col:value 東京"),))
    hostile = ["NEAR(a b)", "a AND", "OR", "NOT x", "col:value", "x*", '"', "{a b}: c", "a + b", "^a"]
    for text in hostile:
        expression = match_expression(text)
        if expression is not None:
            conn.execute("SELECT rowid FROM t WHERE t MATCH ?", (expression,)).fetchall()
