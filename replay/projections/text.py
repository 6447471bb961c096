"""Text for the search index: what a memory's text is, and how queries become FTS5.

The index uses SQLite's `unicode61` tokenizer, which splits at every
character outside its token categories and does not segment scripts
written without spaces. So both the indexed text and each query word go
through `segment`, which puts a zero-width space (a separator for the
tokenizer) around every character of those scripts and of emoji. A
Japanese query then matches as a phrase of single characters, which is a
substring match. A query is split into words here, and every word is
quoted, so FTS5 syntax in user text (`NEAR`, `AND`, `col:value`, `*`,
an unbalanced quote) is matched as plain words.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

__all__ = [
    "TOKEN_CATEGORIES",
    "index_text",
    "match_expression",
    "normalize",
    "segment",
    "strip_separators",
    "value_text",
    "words",
]

# The tokenizer's token characters: letters, numbers, marks, private use
# and other symbols (emoji). The marks keep Devanagari, Thai and Arabic
# words whole; the default "L* N* Co" splits them at every vowel sign.
TOKEN_CATEGORIES = "L* N* Co M* So"

_TOKEN_CATEGORY_PREFIXES = ("L", "N", "M")
_TOKEN_CATEGORIES_EXACT = ("Co", "So")

# A separator for the tokenizer that is invisible in a snippet.
_SEPARATOR = "\u200b"

# Scripts written without spaces between words, and the emoji blocks.
_UNSPACED = re.compile(
    "["
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1100-\u11ff"  # Hangul Jamo
    "\u1780-\u17ff"  # Khmer
    "\u2600-\u27bf"  # Miscellaneous Symbols, Dingbats
    "\u2b00-\u2bff"  # Miscellaneous Symbols and Arrows
    "\u3005-\u3007"  # iteration mark, closing mark, ideographic zero
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul Compatibility Jamo
    "\u31f0-\u31ff"  # Katakana Phonetic Extensions
    "\u3400-\u4dbf"  # CJK Unified Ideographs Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uac00-\ud7af"  # Hangul Syllables
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U0001f000-\U0001faff"  # emoji and pictographs
    "\U00020000-\U0003134f"  # CJK Unified Ideographs Extensions B to H
    "]+"
)

# Variation selectors only choose text or emoji presentation; without this
# "❤️" and "❤" would be different words.
_PRESENTATION = dict.fromkeys(map(ord, "\ufe0e\ufe0f"))


def normalize(text: str) -> str:
    """Return `text` in NFKC form without variation selectors.

    NFKC folds full-width Latin and compatibility characters ("ｐｉｚｚａ",
    "ﬁ") to their plain forms, on both the indexed and the query side.
    """
    return unicodedata.normalize("NFKC", text).translate(_PRESENTATION)


def _split_run(match: re.Match[str]) -> str:
    units: list[str] = []
    for char in match.group():
        if units and unicodedata.category(char).startswith("M"):
            units[-1] += char  # a combining mark stays with its base character
        else:
            units.append(char)
    return _SEPARATOR + _SEPARATOR.join(units) + _SEPARATOR


def segment(text: str) -> str:
    """Put a separator around each character of unspaced scripts and emoji."""
    return _UNSPACED.sub(_split_run, text)


def strip_separators(text: str) -> str:
    """Remove the separators `segment` added (for snippets shown to people)."""
    return text.replace(_SEPARATOR, "")


def index_text(text: str) -> str:
    """Return `text` as the index stores it: normalized and segmented."""
    return segment(normalize(text))


def _is_token_char(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] in _TOKEN_CATEGORY_PREFIXES or category in _TOKEN_CATEGORIES_EXACT


def words(text: str) -> list[str]:
    """Split `text` into words: maximal runs of the tokenizer's token characters.

    Everything else separates words, so "multi-agent" is "multi" and
    "agent", "a.md" is "a" and "md", and "*" or '"' alone give no word.
    """
    found: list[str] = []
    current: list[str] = []
    for char in normalize(text):
        if _is_token_char(char):
            current.append(char)
        elif current:
            found.append("".join(current))
            current = []
    if current:
        found.append("".join(current))
    return found


def match_expression(text: str) -> str | None:
    """Return an FTS5 MATCH expression for user `text`, or None if it has no words.

    Each word becomes one quoted FTS5 string, and the strings are joined by
    spaces, which FTS5 reads as AND: a memory matches when it contains
    every word. A word of an unspaced script becomes a phrase of its
    characters. Quotes are doubled, as FTS5 requires, although `words`
    never returns one.
    """
    quoted = ['"' + segment(word).replace('"', '""') + '"' for word in words(text)]
    return " ".join(quoted) if quoted else None


def value_text(value: Any) -> str:
    """Return the string leaves of a JSON-like value, depth first, joined by spaces.

    Mapping keys, numbers, booleans and nulls are not text. The walk uses
    its own stack, so a deeply nested value cannot exhaust Python's.
    """
    leaves: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            leaves.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return " ".join(leaves)
