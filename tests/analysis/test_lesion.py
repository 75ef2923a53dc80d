"""Lesion curves on a hand-wired model whose one hub carries all the signal.

``hidden:0 = relu(4 x0)`` is the only unit the decision reads (``logit 1 = hidden:0``,
``logit 0 = 0.5``); the labels are the intact model's predictions, so it is 100% accurate
and loses exactly the class-1 images when the hub goes. Every other hidden unit has small
weights and feeds both logits equally: removing it changes no decision.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

import connectome as cn
from connectome import analysis
from connectome.analysis._toys import wired_mlp
from connectome.errors import ConnectomeError


def _hub() -> nn.Module:
    w = torch.full((8, 4), 0.1)
    w[0] = torch.tensor([4.0, 0.0, 0.0, 0.0])
    o = torch.full((2, 8), 0.01)
    o[:, 0] = torch.tensor([0.0, 1.0])
    return wired_mlp(w, [0.0] + [1.0] * 7, o, [0.5, 0.0])


def _data(n: int = 200):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    model = _hub()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_removing_the_hub_by_strength_drops_accuracy_at_step_1_and_random_does_not_on_average():
    model, x, y = _data()
    frac0 = float((y == 0).float().mean())
    assert 0.3 < frac0 < 0.7
    hub = analysis.lesion_curve(model, (x, y), "strength", steps=8, device="cpu")
    assert hub.removed[0] == "hidden:0"
    assert hub.n_removed.tolist() == list(range(9))
    assert hub.accuracy[0, 0] == 1.0
    assert hub.accuracy[0, 1] == pytest.approx(frac0)  # only the class-0 images stay right
    pr = analysis.lesion_curve(model, (x, y), "pagerank", steps=8, device="cpu")
    assert pr.accuracy[0, 1] < 1.0
    rnd = analysis.lesion_curve(model, (x, y), "random", steps=8, seeds=16, device="cpu")
    assert rnd.accuracy.shape == (16, 9)
    hit = np.array([1.0 if a < 1 else 0.0 for a in rnd.accuracy[:, 1]])
    assert hit.mean() < 0.5  # the hub is the first of a random order only now and then
    assert rnd.accuracy_mean[1] > hub.accuracy[0, 1]
    assert rnd.auc_accuracy > hub.auc_accuracy
    lo, hi = rnd.band()
    assert np.all(lo <= rnd.accuracy_mean + 1e-12) and np.all(rnd.accuracy_mean <= hi + 1e-12)
    np.testing.assert_allclose(rnd.accuracy[:, -1], frac0)  # everything removed: the same for all


def test_removing_nothing_changes_nothing():
    model, x, y = _data(50)
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)[torch.arange(50), y].mean().item()
    c = analysis.lesion_curve(model, (x, y), "strength", steps=2, fraction=0.1, device="cpu")
    assert c.n_removed[0] == 0
    assert c.accuracy[0, 0] == 1.0 and c.prob[0, 0] == pytest.approx(p, abs=1e-7)
    e = analysis.lesion_edges(model, cn.extract.weights(model, (4,)), (x, y), steps=2, device="cpu")
    assert e.accuracy[0, 0] == 1.0 and e.prob[0, 0] == pytest.approx(p, abs=1e-7)
    for name, v in _hub().state_dict().items():  # the caller's model is untouched
        torch.testing.assert_close(model.state_dict()[name], v)


def test_each_step_equals_ablating_its_units():
    model, x, y = _data(60)
    g = cn.extract.weights(model, (4,))
    scores = np.arange(g.num_nodes, dtype=np.float64)[::-1].copy()  # earlier nodes first
    c = analysis.lesion_curve(model, (x, y), scores, graph=g, steps=4, fraction=0.5, scope="layer", device="cpu")
    assert c.order == "scores"
    assert c.n_removed.tolist() == [0, 1, 2, 3, 4]  # round(8 * k / 8)
    for k in range(1, 5):
        units = [f"hidden:{u}" for u in range(k)]
        r = analysis.ablate(model, units, (x, y), device="cpu")
        assert c.prob[0, k] == pytest.approx(r.prob_after, abs=1e-12)
        assert c.accuracy[0, k] == pytest.approx(r.acc_after)
    # a mapping of node ids to scores: unscored units come last
    m = analysis.lesion_curve(model, (x, y), {"hidden:3": 2.0, "hidden:0": 1.0}, steps=8, device="cpu")
    assert m.removed[:2] == ("hidden:3", "hidden:0")
    assert m.accuracy[0, 1] == 1.0 and m.accuracy[0, 2] < 1.0
    # ... and are removed too: the last step takes all 8 hidden units, as n_removed says
    assert m.n_removed[-1] == len(m.removed) == 8
    assert m.removed[2:] == tuple(f"hidden:{u}" for u in (1, 2, 4, 5, 6, 7))
    everything = analysis.ablate(model, [f"hidden:{u}" for u in range(8)], (x, y), device="cpu")
    assert m.prob[0, -1] == pytest.approx(everything.prob_after, abs=1e-12)


def test_edge_lesions_zero_the_strongest_weights_first():
    model, x, y = _data(80)
    g = cn.extract.weights(model, (4,))
    e = analysis.lesion_edges(model, g, (x, y), steps=g.num_edges, device="cpu")
    assert e.removed[0] == "input:0->hidden:0"  # |w| = 4, the strongest
    frac0 = float((y == 0).float().mean())
    assert e.accuracy[0, 1] == pytest.approx(frac0)
    # the same by hand: zero W[0, 0] of a copy
    m2 = _hub()
    with torch.no_grad():
        m2.hidden.weight[0, 0] = 0.0
        want = torch.softmax(m2(x).double(), 1)[torch.arange(80), y].mean().item()
    assert e.prob[0, 1] == pytest.approx(want, abs=1e-7)
    r = analysis.lesion_edges(model, g, (x, y), "random", steps=4, seeds=[3, 4], device="cpu")
    assert r.seeds == (3, 4) and r.accuracy.shape == (2, 5)



def test_edge_lesions_into_a_linear_layer_zero_all_columns_of_the_source_channel():
    """conv(3 channels of 4 x 4) -> flatten -> fc: the edge ``conv:i -> logits:j`` is the 16
    columns ``fc.weight[j, 16 i : 16 (i + 1)]``; ``input:0 -> conv:j`` is ``conv.weight[j, 0]``."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 3, 3, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
                                      fc=nn.Linear(48, 2))).eval()
    x = torch.randn(30, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    g = cn.extract.weights(model, (1, 4, 4))
    e = analysis.lesion_edges(model, g, (x, y), steps=g.num_edges, device="cpu")
    assert e.n_removed.tolist() == list(range(10)) and len(e.removed) == 9
    by_hand = copy.deepcopy(model)
    for k, edge in enumerate(e.removed, start=1):
        (src, i), (dst, j) = (n.split(":") for n in edge.split("->"))
        with torch.no_grad():
            if dst == "logits":
                by_hand.fc.weight[int(j), 16 * int(i):16 * (int(i) + 1)] = 0.0
            else:
                by_hand.conv.weight[int(j), int(i)] = 0.0
            want = torch.softmax(by_hand(x).double(), 1)[torch.arange(30), y].mean().item()
        assert e.prob[0, k] == pytest.approx(want, abs=1e-6), edge

def test_bad_arguments_are_refused():
    model, x, y = _data(10)
    with pytest.raises(ConnectomeError, match="order must be one of"):
        analysis.lesion_curve(model, (x, y), "degree", device="cpu")
    with pytest.raises(ConnectomeError, match="scope"):
        analysis.lesion_curve(model, (x, y), scope="net", device="cpu")
    with pytest.raises(ConnectomeError, match="steps"):
        analysis.lesion_curve(model, (x, y), steps=0, device="cpu")
    with pytest.raises(ConnectomeError, match="needs the graph"):
        analysis.lesion_curve(model, (x, y), np.ones(14), device="cpu")
    g = cn.extract.weights(model, (4,))
    with pytest.raises(ConnectomeError, match="scores for a graph"):
        analysis.lesion_curve(model, (x, y), np.ones(3), graph=g, device="cpu")
    with pytest.raises(ConnectomeError, match="needs an attribution graph"):
        analysis.lesion_curve(model, (x, y), "attribution", graph=g, device="cpu")
    with pytest.raises(ConnectomeError, match="seeds"):
        analysis.lesion_curve(model, (x, y), "random", seeds=[], device="cpu")


def test_attack_plot_draws_each_order_and_the_random_band():
    from matplotlib.collections import PolyCollection

    from connectome.viz.connectivity import plot_attack

    model, x, y = _data(40)
    hub = analysis.lesion_curve(model, (x, y), "strength", steps=4, device="cpu")
    rnd = analysis.lesion_curve(model, (x, y), "random", steps=4, seeds=3, device="cpu")
    fig = plot_attack({"strength": hub, "random": rnd})
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[1].get_ydata(), rnd.accuracy_mean)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # the band of the random orders
    assert "AUC" in ax.get_legend().get_texts()[0].get_text()


def test_report_section_lists_the_areas():
    from connectome.viz.report import Report, lesion_section

    model, x, y = _data(30)
    rep = Report("r")
    c = analysis.lesion_curve(model, (x, y), "strength", steps=2, device="cpu")
    lesion_section(rep, {"strength": c})
    html = rep.to_html()
    assert 'data-file="lesion.png"' in html and f"{c.auc_accuracy:.4g}" in html


def test_cli_lesion_writes_curves_and_the_attack_plot(tmp_path, capsys):
    import json

    from connectome.cli import main

    out, png = tmp_path / "l.json", tmp_path / "a.png"
    assert main(["lesion", "zoo:simplecnn_a", "zoo:shapes:2", "--steps", "2", "--random", "2", "--fraction", "0.5",
                 "--device", "cpu", "--out", str(out), "--plot", str(png)]) == 0
    d = json.loads(out.read_text())
    assert list(d["curves"]) == ["strength (targeted)", "random"]
    assert len(d["curves"]["random"]["accuracy"]) == 2 and d["curves"]["random"]["x"] == [0.0, 0.25, 0.5]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lesion", "zoo:simplecnn_a", "zoo:shapes:2", "--steps", "0", "--out", str(out)]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err


def test_layer_scope_removes_the_same_share_of_every_layer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    g = cn.extract.weights(model, (4,))
    c = analysis.lesion_curve(model, (x, y), "strength", steps=2, fraction=0.5, scope="layer", device="cpu")
    assert c.n_removed.tolist() == [0, 2 + 2, 4 + 3]  # round(0.25 * 8) + round(0.25 * 6), then 4 + 3
    s = analysis.strength(g)
    hidden = [n for n in g.layer_names if n not in ("input", "logits")]
    for k, frac in ((1, 0.25), (2, 0.5)):
        units = []
        for layer in hidden:
            sl = g.layer_slice(layer)
            order = np.lexsort((np.arange(sl.stop - sl.start), -s[sl]))
            units += [f"{layer}:{u}" for u in order[: int(round(frac * (sl.stop - sl.start)))]]
        r = analysis.ablate(model, units, (x, y), device="cpu")
        assert c.prob[0, k] == pytest.approx(r.prob_after, abs=1e-12)
