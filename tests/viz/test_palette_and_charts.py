"""One colour per community in every figure; fidelity and comparison charts; readable reports."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from connectome import viz
from connectome.analysis import circuit, communities, compare, find_analogous
from connectome.analysis._toys import random_flow_graph, toy_attribution
from connectome.palette import COMMUNITY_COLOURS, NO_COMMUNITY, OTHER_COMMUNITY, community_legend, community_rgb


def test_community_rgb_is_fixed_per_label():
    k = len(COMMUNITY_COLOURS)
    rgb = community_rgb([0, 3, k - 1, k, k + 7, -1, np.nan])
    np.testing.assert_allclose(rgb[0], to_rgb(COMMUNITY_COLOURS[0]))
    np.testing.assert_allclose(rgb[1], to_rgb(COMMUNITY_COLOURS[3]))
    np.testing.assert_allclose(rgb[2], to_rgb(COMMUNITY_COLOURS[k - 1]))
    np.testing.assert_allclose(rgb[3], to_rgb(OTHER_COMMUNITY))
    np.testing.assert_allclose(rgb[4], to_rgb(OTHER_COMMUNITY))
    np.testing.assert_allclose(rgb[5:], [to_rgb(NO_COMMUNITY)] * 2)
    assert len({tuple(c) for c in community_rgb(np.arange(k))}) == k  # all distinct
    texts = [t for t, _ in community_legend([2, 0, 0, k + 3, -1])]
    assert texts == ["community 0", "community 2", f"1 smaller community (communities {k}+)", "no community"]


def _bar_colours(fig):
    """(unit label, rgb) of every bar of a plot_hubs figure."""
    out = {}
    for ax in fig.axes:
        if not ax.get_visible() or not ax.patches:
            continue
        names = {round(t.get_position()[1]): t.get_text() for t in ax.get_yticklabels()}
        layer = ax.get_title().split(" ")[0]
        for p in ax.patches:
            y = round(p.get_y() + p.get_height() / 2)
            out[f"{layer}:{names[y].replace('unit ', '')}"] = tuple(np.round(p.get_facecolor()[:3], 6))
    return out


def test_a_community_has_one_colour_in_hubs_and_circuit():
    g = random_flow_graph([6, 8, 8, 3], seed=1)
    g = communities(g, seed=0).to_node_attr(g)
    fig_h = viz.plot_hubs(g, np.abs(g.node_attr("attribution")), k=4)
    bars = _bar_colours(fig_h)
    assert bars
    circ = circuit(g, mass=0.5)  # holds communities 0, 2 and 4 only: colours must not shift to fill gaps
    assert set(np.unique(circ.node_attr("community")).tolist()) == {0, 2, 4}
    fig_c = viz.plot_circuit(circ)
    dots = fig_c.axes[0].collections[-1]  # the scatter of units, drawn last
    rgb = {nid: tuple(np.round(c[:3], 6)) for nid, c in zip(circ.node_ids.tolist(), dots.get_facecolors())}
    shared = set(bars) & set(rgb)
    assert shared
    membership = dict(zip(g.node_ids.tolist(), g.node_attr("community").tolist()))
    for nid in shared:
        expected = tuple(np.round(community_rgb([membership[nid]])[0], 6))
        assert bars[nid] == rgb[nid] == expected
    # the hub chart says what its colours mean
    legend = fig_h.legends[0]
    assert "community" in legend.get_title().get_text().lower() or "community" in legend.texts[0].get_text()


def test_plot_hubs_leaves_layers_without_scores_out():
    g = toy_attribution("cat")
    s = np.abs(g.node_attr("attribution"))
    s[g.layer_slice("in")] = np.nan  # what the report passes for input/output units
    titles = [a.get_title() for a in viz.plot_hubs(g, s).axes if a.get_visible()]
    assert not any(t.startswith("in ") for t in titles)


def test_plot_fidelity_shows_circuit_and_random_baseline():
    from types import SimpleNamespace

    res = {"cat": SimpleNamespace(circuit_drop=0.9, random_mean=0.3, random_std=0.1, random_drops=np.array([.2, .3, .4])),
           "dog": (0.8, 0.4, 0.05)}
    fig = viz.plot_fidelity(res)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [0.3, 0.4, 0.8, 0.9]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "circuit ablated" and labels[1].startswith("random units")


def test_plot_comparison_panels():
    cat, dog = toy_attribution("cat"), toy_attribution("dog")
    cmp = compare(cat, dog, top=2)
    fig = viz.plot_comparison(cmp)
    assert len(fig.axes) == 2
    hits = find_analogous(circuit(cat, mass=0.8), dog)
    fig = viz.plot_comparison(cmp, hits)
    assert len(fig.axes) == 3
    placed = sum(p.get_height() for p in fig.axes[2].patches)
    assert placed == len(hits[0].mapping)


def test_matching_mean_is_not_drawn_like_a_unit():
    fig = viz.plot_matching({("conv1", "conv1"): np.linspace(0, 1, 9)})
    ax = fig.axes[0]
    handles = ax.get_legend().legend_handles
    mean = next(h for h, t in zip(handles, ax.get_legend().get_texts()) if t.get_text() == "mean")
    assert mean.get_marker() in ("None", None, "") and mean.get_linewidth() > 1


@pytest.mark.parametrize("n_layers", [5, 71])
def test_circuit_labels_stay_readable(n_layers):
    from connectome.graph import Connectome, Layer

    sizes = [2] * n_layers
    off = np.r_[0, np.cumsum(sizes)]
    src = np.concatenate([np.repeat(np.arange(off[i], off[i + 1]), 2) for i in range(n_layers - 1)])
    dst = np.concatenate([np.tile(np.arange(off[i + 1], off[i + 2]), 2) for i in range(n_layers - 1)])
    layers = tuple(Layer(f"layer{i}.conv", "conv", 2) for i in range(n_layers))
    g = Connectome(layers=layers, node_units=np.tile([100, 250], n_layers), src=src, dst=dst,
                   weight=np.ones(src.size))
    fig = viz.plot_circuit(g)
    ax = fig.axes[0]
    sizes_pt = [t.get_fontsize() for t in ax.texts] + [t.get_fontsize() for t in ax.get_xticklabels()]
    assert min(sizes_pt) >= 7.5
    assert fig.get_figwidth() <= 14.0
    # unit labels only where they fit between columns: none for 71 columns in 14 inches
    assert (len(ax.texts) > 0) == (n_layers == 5)
