"""Argument types of the command line: numbers no option accepts are rejected by argparse."""

from __future__ import annotations

import argparse

import pytest

from tiermem.cli import build_parser
from tiermem.commands.arguments import non_negative_int, positive_float, positive_int


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (positive_int, "1", 1),
        (positive_int, "250", 250),
        (non_negative_int, "0", 0),
        (positive_float, "0.5", 0.5),
        (positive_float, "10", 10.0),
    ],
)
def test_valid_values_parsed(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_int, "0", "expected an integer of 1 or more, got 0"),
        (positive_int, "-5", "expected an integer of 1 or more, got -5"),
        (positive_int, "2.5", "expected an integer, got '2.5'"),
        (non_negative_int, "-1", "expected an integer of 0 or more, got -1"),
        (positive_float, "0", "expected a number greater than 0, got 0"),
        (positive_float, "-1", "expected a number greater than 0, got -1"),
        (positive_float, "nan", "expected a number greater than 0, got nan"),
        (positive_float, "inf", "expected a number greater than 0, got inf"),
        (positive_float, "soon", "expected a number, got 'soon'"),
    ],
)
def test_invalid_values_rejected(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as raised:
        parse(text)

    assert str(raised.value) == message


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--limit", "-5"],
        ["get", "k", "--timeout", "0"],
        ["publish", "--timeout", "-1"],
        ["check", "--examples", "0"],
        ["check", "--steps", "0"],
        ["stats", "--top", "-1"],
        ["replay", "--shard", "-1"],
        ["doctor", "--max-apply-lag", "-1"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_commands_reject_invalid_numbers(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)

    assert raised.value.code == 2
    assert "expected" in capsys.readouterr().err
