"""The viewer's slider levels (issue 24, item 10): distinct and increasing, ending at the mass
asked for, also when that mass is itself one of the standard levels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch.nn as nn

import connectome as cn
from connectome.viz.viewer import LEVELS, circuit_levels, viewer_html


@pytest.fixture(scope="module")
def graph() -> cn.Connectome:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4, 3))
    return cn.extract.weights(m, (3, 6, 6))


# every standard level (the default 0.9 among them), masses between levels, and the smallest
MASSES = sorted({*LEVELS, 0.9, 0.33, 0.97, 0.01})


@pytest.mark.parametrize("mass", MASSES)
def test_slider_levels_are_distinct_and_end_at_the_mass(graph, mass):
    levels, member = circuit_levels(graph, mass=mass)
    want = sorted({v for v in LEVELS if v < mass} | {mass})
    assert levels == want
    assert len(set(levels)) == len(levels) and np.all(np.diff(levels) > 0)
    assert member.shape == (len(levels), graph.num_nodes)


def test_default_mass_appears_once_on_the_page(graph):
    page = viewer_html(graph)
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    levels = json.loads(raw.replace("<\\/", "</"))["categories"][0]["levels"]
    assert levels.count(0.9) == 1 and levels[-1] == 0.9
    assert len(set(levels)) == len(levels)
