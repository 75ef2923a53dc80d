"""The hypothesis profile of tests/conftest.py is in force (in every xdist worker too)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def test_profile_is_derandomised_unless_random_is_asked_for():
    random = os.environ.get("CONNECTOME_HYPOTHESIS") == "random"
    assert settings().derandomize is not random
    assert settings().print_blob is True
    assert settings().database is None  # no example files left behind: a failure prints its reproduce blob


_drawn: list[list[int]] = []


@settings(max_examples=5)
@given(st.lists(st.integers(), min_size=3, max_size=3))
def _draw(xs: list[int]) -> None:
    _drawn[-1].append(xs)


def test_derandomised_runs_draw_the_same_examples():
    if os.environ.get("CONNECTOME_HYPOTHESIS") == "random":
        pytest.skip("the random profile draws new examples on purpose")
    for _ in range(2):
        _drawn.append([])
        _draw()
    assert _drawn[0] == _drawn[1] and len(_drawn[0]) >= 2
