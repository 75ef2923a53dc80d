"""faithfulness, ablation values and the global selector on hand-wired models (known answers)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from connectome import analysis
from connectome.analysis._toys import toy_attribution, wired_mlp
from connectome.analysis.ablation import partners, reference_pass
from connectome.analysis.faithfulness import CategoryFaithfulness, FaithfulnessResult, _verdict
from connectome.errors import ConnectomeError, DataError
from connectome.extract import attribution
from connectome.extract.probe import traced

faithfulness = partial(analysis.faithfulness, device="cpu")
ablate = partial(analysis.ablate, device="cpu")

DEAD = 7  # hidden unit that never fires


def _wired() -> nn.Module:
    """input(4) -> hidden(8) -> ReLU -> logits(2).

    Hidden units are ``relu(small weights . x + 3)``, but unit 7 has bias -100 and is dead.
    Logit 0 is ``hidden:0 + 0.5 * hidden:1 + hidden:7 + 0.5``; logit 1 reads hidden:2..6 with
    small weights, plus 2.0. All the flow into logit 0 goes through hidden:0 and hidden:1.
    """
    bias = torch.full((8,), 3.0)
    bias[DEAD] = -100.0
    w = torch.zeros(2, 8)
    w[0, 0], w[0, 1], w[0, DEAD] = 1.0, 0.5, 1.0
    w[1, 2:7] = 0.1
    return wired_mlp(0.5 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), bias, w, [0.5, 2.0])


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _wired()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(1))
    return x, torch.zeros(24, dtype=torch.long)


@pytest.fixture(scope="module")
def graph(model, data):
    return attribution(model, data, target=0, device="cpu", progress=False)


def _hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.relu(model.hidden(x))


def _prob0(model: nn.Module, h: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model.out(h), dim=1)[:, 0].double().numpy()


def _only(graph, units: list[str]):
    """A circuit of the given hidden units (plus the target), measured at its own size."""
    return graph.subgraph([*units, "logits:0"]).with_meta(circuit={"mass": None})


# ---------------------------------------------------------------------- known answers
def test_circuit_carrying_all_flow_is_fully_necessary_and_sufficient(model, data, graph):
    c = analysis.circuit(graph, top_k=2)
    assert sorted(u for u in c.node_ids.tolist() if u.startswith("hidden")) == ["hidden:0", "hidden:1"]
    f = faithfulness(model, {"zero": c}, data, value="zero", metric="logit", n_boot=50, n_random=4)
    r = f["zero"]
    assert isinstance(f, FaithfulnessResult) and isinstance(r, CategoryFaithfulness)
    assert f.value == "zero" and f.metric == "logit"
    assert r.n_units.tolist() == [2] and r.levels.tolist() == [1.0]
    assert r.necessity["circuit"][0] == pytest.approx(1.0, abs=1e-6)
    assert r.sufficiency["circuit"][0] == pytest.approx(1.0, abs=1e-6)
    # a random pair of the 8 units holds both carriers only by chance: less necessary
    assert r.auc_necessity["random"] < 1.0


def test_dead_unit_is_neither_necessary_nor_sufficient(model, data, graph):
    f = faithfulness(model, {"dead": _only(graph, [f"hidden:{DEAD}"])}, data, value="zero", metric="logit",
                     n_boot=0, n_random=3, baselines=())
    r = f["dead"]
    assert r.necessity["circuit"][0] == pytest.approx(0.0, abs=1e-6)
    assert r.sufficiency["circuit"][0] == pytest.approx(0.0, abs=1e-6)
    assert r.verdict == "not faithful"


def test_batched_curves_equal_one_ablation_at_a_time(model, data, graph):
    """Every point is an independent ``ablate`` call: necessity of the circuit, and
    sufficiency as ablating every other unit of its layer, with mean ablation."""
    c = analysis.circuit(graph, top_k=2)
    r = faithfulness(model, {"c": c}, data, n_boot=0, n_random=2)["c"]
    nec = ablate(model, ["hidden:0", "hidden:1"], data, target=0, value="mean")
    suf = ablate(model, [f"hidden:{i}" for i in range(2, 8)], data, target=0, value="mean")
    assert r.necessity["circuit"][0] == pytest.approx(nec.prob_drop / nec.prob_before, rel=1e-5)
    assert r.sufficiency["circuit"][0] == pytest.approx(suf.prob_after / suf.prob_before, rel=1e-5)


# ---------------------------------------------------------------------- ablation values
def test_mean_ablation_passes_the_per_unit_mean_over_the_data(model, data):
    x, _ = data
    h = _hidden(model, x)
    with traced(model, x, "cpu") as t:
        li = t.index("hidden")
        fill, mags = reference_pass(t, x, [li], "mean", batch_size=5, abs_mean=True)  # batches of 5: sums across them
    assert fill[li].shape == (1, 8)
    np.testing.assert_allclose(fill[li][0].numpy(), h.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(mags[li], h.abs().numpy(), rtol=1e-6)
    # end to end: ablated hidden:1 passes its mean, the probability follows through the softmax
    r = ablate(model, "hidden:1", data, target=0, value="mean")
    h2 = h.clone()
    h2[:, 1] = h[:, 1].mean()
    assert r.prob_after == pytest.approx(float(_prob0(model, h2).mean()), rel=1e-5)
    assert r.prob_after != pytest.approx(float(_prob0(model, h).mean()), rel=1e-3)  # it did change


def test_resample_ablation_uses_the_other_images_values(model, data):
    x, y = data[0][:2], data[1][:2]  # two images: each must take the other's value
    h = _hidden(model, x)
    r = ablate(model, "hidden:0", (x, y), target=0, value="resample", seed=3)
    h2 = h.clone()
    h2[0, 0], h2[1, 0] = h[1, 0], h[0, 0]
    assert r.prob_after == pytest.approx(float(_prob0(model, h2).mean()), rel=1e-5)
    # many images: never the image itself, every other image possible
    own = np.arange(50)
    p = np.stack([partners(own, 50, 50, s) for s in range(40)])
    assert not np.any(p == own) and set(np.unique(p)) == set(range(50))
    with pytest.raises(ConnectomeError, match="at least two"):
        ablate(model, "hidden:0", (x[:1], y[:1]), target=0, value="resample")
    with pytest.raises(ValueError, match="value must be one of"):
        ablate(model, "hidden:0", data, target=0, value="median")


# ---------------------------------------------------------------------- verdicts and CIs
def test_verdict_logic():
    beats = {"random": True, "activation": True, "weight": True, "gradxact": True, "other": True}
    assert _verdict(3.0, 2.5, beats, 2.0)[0] == "faithful"
    v, why = _verdict(3.0, 2.5, {**beats, "gradxact": False}, 2.0)
    assert v == "partial" and "not above gradxact" in why
    v, why = _verdict(3.0, 1.0, beats, 2.0)
    assert v == "partial" and "sufficiency" in why
    v, why = _verdict(1.5, 9.0, {**beats, "random": False}, 2.0)
    assert v == "not faithful" and "1.5 sd" in why
    assert _verdict(math.nan, 9.0, beats, 2.0)[0] == "not faithful"


@pytest.fixture(scope="module")
def two(model, data, graph) -> FaithfulnessResult:
    """Two categories on one model: the graph of class 0 and of class 1, labels 0 and 1.

    Zero ablation: the labels of this toy are arbitrary, so replacing a unit by its mean (or
    another image's value) costs nothing on average; zeroing hidden:0 silences logit 0.
    """
    x, _ = data
    y = torch.tensor([0, 1] * 12)
    g1 = attribution(model, (x, y), target=1, device="cpu", progress=False)
    return faithfulness(model, {"a": graph, "b": g1}, (x, y), levels=(0.3, 0.6, 0.9), n_random=5, n_boot=200,
                        value="zero")


def test_curves_over_levels_baselines_and_bootstrap_interval(two):
    f = two
    r = f["a"]
    assert r.n_images == 12 and r.levels.tolist() == [0.3, 0.6, 0.9]
    assert np.all(np.diff(r.n_units) >= 0)
    assert set(r.necessity) == {"circuit", "random", "activation", "weight", "gradxact", "other", "other:b"}
    assert r.random_necessity.shape == (5, 3)
    assert len({tuple(np.round(row, 9)) for row in r.random_necessity}) > 1  # 5 independent draws, not 1
    np.testing.assert_allclose(r.necessity["random"], r.random_necessity.mean(0))
    lo, hi = r.ci_necessity
    assert lo <= r.auc_necessity["circuit"] <= hi
    lo, hi = r.ci_sufficiency
    assert lo <= r.auc_sufficiency["circuit"] <= hi
    # the AUC is the trapezoid over the levels scaled to [0, 1]
    yv = r.necessity["circuit"]
    assert r.auc_necessity["circuit"] == pytest.approx((yv[0] + yv[1]) / 4 + (yv[1] + yv[2]) / 4)
    # hidden:0 and hidden:1 carry class 0: its circuit beats class 1's in necessity
    assert r.auc_necessity["circuit"] > r.auc_necessity["other:b"] and r.specificity == 1.0
    assert f.to_dict()["categories"]["a"]["verdict"] == r.verdict
    assert "a" in repr(f)


def test_bad_input_is_refused(model, data, graph):
    with pytest.raises(ConnectomeError, match="mapping category"):
        faithfulness(model, [graph], data)
    with pytest.raises(ValueError, match="levels"):
        faithfulness(model, graph, data, levels=(0.5, 0.2))
    with pytest.raises(ValueError, match="n_random"):
        faithfulness(model, graph, data, n_random=1)
    with pytest.raises(DataError, match="no image labelled 0"):
        faithfulness(model, graph, (data[0], torch.ones(24, dtype=torch.long)), n_boot=0)


# ---------------------------------------------------------------------- global selector
def test_flow_share_conserves_per_layer_and_global_circuit_is_wired():
    g = toy_attribution("cat")
    s = analysis.flow_share(g)
    for name in ("in", "h1", "h2"):  # a chain: every layer carries the whole target
        assert s[g.layer_slice(name)].sum() == pytest.approx(1.0)
    assert s[g.index_of("h2:0")] == pytest.approx(6.0 / 10.0)
    c = analysis.circuit(g, mass=0.5, select="global")
    assert c.node_ids.tolist() == ["in:0", "in:1", "h1:0", "h2:0", "logits:0"]
    assert c.meta["circuit"]["select"] == "global"
    # every kept unit sends flow into the rest of the circuit
    for i in range(c.num_nodes - 1):
        assert np.any(c.src == i)
    with pytest.raises(ValueError, match="select"):
        analysis.circuit(g, select="greedy")


# ---------------------------------------------------------------------- report and demo summary
def test_report_section_draws_circuit_and_every_baseline(two, tmp_path):
    from connectome.viz.report import Report, add_faithfulness, plot_faithfulness

    fig = plot_faithfulness(two, categories=["a"])
    axes = fig.axes
    assert len(axes) == 2  # necessity, sufficiency
    for ax, curves in zip(axes, (two["a"].necessity, two["a"].sufficiency)):
        lines = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
        assert set(lines) == {"circuit", "random", "activation", "weight", "gradxact", "other"}
        np.testing.assert_allclose(lines["circuit"], curves["circuit"])
    assert two["a"].verdict in axes[0].get_title()
    with pytest.raises(KeyError, match="no category 'zebra'"):
        plot_faithfulness(two, categories=["zebra"])
    rep = Report("t")
    add_faithfulness(rep, {"wired": two})
    html = rep.to_html()
    assert 'data-file="faithfulness_wired.png"' in html
    for c, r in two.categories.items():
        assert f"<td>{r.verdict}</td>" in html


def test_demo_summary_names_categories_that_do_not_beat_the_baselines():
    from connectome.demo import _summary_text

    s = {"seconds": 1.0, "circuits": {"a": {"units": 3}}, "category_pairs": [], "matching": {},
         "analogous_circle_in_ring": 0, "analogous_across_models": 0, "completeness_relative_max": 0.0,
         "viewer": "viewer.html", "fidelity": [["a", 0.9, 0.5, 0.2, 0.1]],
         "faithfulness": {"a": {"verdict": "faithful", "reason": "fine"},
                          "b": {"verdict": "not faithful", "reason": "necessity only 1.2 sd above random"},
                          "c": {"verdict": "partial", "reason": "necessity not above gradxact"}}}
    text = _summary_text(s, "out/report.html")
    assert "  faithful: a" in text and "  partial: c" in text and "  not faithful: b" in text
    assert "b: necessity only 1.2 sd above random" in text and "c: necessity not above gradxact" in text
    assert "a 0.90 vs 0.50+-0.20" in text  # the random spread is printed, not only its mean


def test_export_is_the_function_and_importing_analysis_loads_no_torch():
    import subprocess
    import sys

    mod = sys.modules["connectome.analysis.faithfulness"]
    assert analysis.faithfulness is mod.faithfulness  # the submodule does not shadow the function
    code = "import sys, connectome.analysis as an; an.faithfulness; an.flow_share; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
