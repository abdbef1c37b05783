"""The benchmarks' round order: a balanced Latin square (Williams' design)."""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _common import balanced_order


def _rounds(order: list[str]) -> list[list[str]]:
    count = len(order) * (2 if len(order) % 2 else 1)
    return [balanced_order(order, n) for n in range(1, count + 1)]


@pytest.mark.parametrize("order", [list("AB"), list("ABC"), list("ABCD"), list("RFMPA")])
def test_every_round_runs_every_method_once(order: list[str]) -> None:
    for methods in _rounds(order):
        assert sorted(methods) == sorted(order)


@pytest.mark.parametrize("order", [list("AB"), list("ABC"), list("ABCD"), list("RFMPA")])
def test_every_method_runs_in_every_position_equally_often(order: list[str]) -> None:
    rounds = _rounds(order)
    for position in range(len(order)):
        counts = Counter(methods[position] for methods in rounds)
        assert set(counts.values()) == {len(rounds) // len(order)}


@pytest.mark.parametrize("order", [list("AB"), list("ABC"), list("ABCD"), list("RFMPA")])
def test_every_method_follows_every_other_equally_often(order: list[str]) -> None:
    pairs = Counter((a, b) for methods in _rounds(order)
                    for a, b in itertools.pairwise(methods))
    assert len(pairs) == len(order) * (len(order) - 1)  # each ordered pair occurs
    assert len(set(pairs.values())) == 1


def test_the_first_round_interleaves_from_both_ends_and_the_square_repeats() -> None:
    assert balanced_order(list("ABCD"), 1) == list("ABDC")
    assert balanced_order(list("ABCD"), 5) == balanced_order(list("ABCD"), 1)


def test_one_method_stays_as_it_is() -> None:
    assert balanced_order(["A"], 3) == ["A"]
