"""compare and compare_categories on graphs of one model with known answers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from connectome.analysis._toys import random_flow_graph, random_layered_graph, toy_attribution
from connectome.analysis.compare import CategoryCorrelation, Comparison, _nmi, compare, compare_categories
from connectome.errors import ConnectomeError
from connectome.graph import Connectome


@pytest.fixture(scope="module")
def cat() -> Connectome:
    return toy_attribution("cat")


@pytest.fixture(scope="module")
def dog() -> Connectome:
    return toy_attribution("dog")


class _Partition:
    def __init__(self, membership):
        self.membership = np.asarray(membership)


# ---------------------------------------------------------------------- compare
def test_identical_graphs_agree_everywhere(cat):
    c = compare(cat, cat)
    assert isinstance(c, Comparison)
    for r in c.per_layer:
        assert r.jaccard == 1.0
        assert r.weighted_overlap == pytest.approx(1.0)
        assert r.spearman == pytest.approx(1.0)
        assert r.circuit_jaccard == 1.0
        assert r.nmi == pytest.approx(1.0)
        assert r.only_a == r.only_b == ()
    s = c.summary
    assert s["jaccard"] == 1.0 and s["nmi"] == pytest.approx(1.0) and s["circuit_jaccard"] == 1.0
    assert s["spearman"] == pytest.approx(1.0) and s["weighted_overlap"] == pytest.approx(1.0)
    # Every unit with non-zero attribution is shared; logits:1 has none.
    assert set(c.shared_units) == set(cat.node_ids.tolist()) - {"logits:1"}


def test_cat_vs_dog_by_hand(cat, dog):
    c = compare(cat, dog, top=2)
    assert (c.a, c.b, c.importance) == ("cat", "dog", "attribution")
    rows = {r.layer: r for r in c.per_layer}
    # in: cat top-2 {in:1 (5.0), in:0 (4.4)}, dog top-2 {in:1 (5.0), in:2 (4.4)}.
    assert rows["in"].shared == ("in:1",)
    assert rows["in"].only_a == ("in:0",) and rows["in"].only_b == ("in:2",)
    assert rows["in"].jaccard == pytest.approx(1 / 3)
    # Weighted overlap: sum min / sum max of |attribution| = (0.6 + 5 + 0.6) / (4.4 + 5 + 4.4).
    assert rows["in"].weighted_overlap == pytest.approx(6.2 / 13.8)
    assert rows["h1"].jaccard == 0.0 and rows["h1"].only_a == ("h1:0", "h1:1")
    assert rows["h1"].spearman == pytest.approx(-1.0)
    # Circuits: cat keeps in:0, in:1, dog keeps in:1, in:2.
    assert rows["in"].circuit_jaccard == pytest.approx(1 / 3)
    assert rows["h2"].circuit_jaccard == 0.0
    assert c.summary["circuit_jaccard"] == pytest.approx(1 / 13)
    assert c.shared_units == ("in:1",)


def test_top_set_ignores_units_without_importance(cat):
    rows = {r.layer: r for r in compare(cat, cat, top=5).per_layer}
    assert rows["logits"].shared == ("logits:0",)
    assert rows["logits"].top == 2


def test_different_models_are_refused(cat):
    other = random_flow_graph([3, 5, 2])
    with pytest.raises(ConnectomeError, match="different models"):
        compare(cat, other)


def test_same_layers_different_units_are_refused(cat):
    a = cat.subgraph([i for i in cat.node_ids.tolist() if i != "h1:0"])
    b = cat.subgraph([i for i in cat.node_ids.tolist() if i != "h1:1"])
    with pytest.raises(ConnectomeError, match="different units"):
        compare(a, b)


def test_given_partitions_are_used(cat, dog):
    n = cat.num_nodes
    same = _Partition(np.arange(n) % 3)
    c = compare(cat, dog, partitions=(same, same.membership))
    assert c.summary["nmi"] == pytest.approx(1.0)
    assert c.summary["partition"] == "given"
    with pytest.raises(ConnectomeError, match="aligned with node_ids"):
        compare(cat, dog, partitions=(np.zeros(3), np.zeros(n)))


def test_default_partitions_are_the_communities_of_each_graph_computed_once(cat, dog, monkeypatch):
    import sys

    from connectome.analysis.communities import communities

    cmod = sys.modules["connectome.analysis.communities"]
    a, b = cat.with_meta(), dog.with_meta()  # fresh graphs: nothing cached for them yet
    runs = []
    real = cmod._summaries
    monkeypatch.setattr(cmod, "_summaries", lambda g, m: runs.append(g) or real(g, m))  # once per Leiden run
    c = compare(a, b, seed=1)
    assert len(runs) == 2
    pa, pb = communities(a, seed=1), communities(b, seed=1)  # reused, not run again
    assert len(runs) == 2
    assert c.summary["nmi"] == pytest.approx(_nmi(pa.membership, pb.membership), abs=1e-12)
    compare(a, b, seed=1)
    assert len(runs) == 2
    assert communities(a, seed=2) is not pa and len(runs) == 3


def test_compare_progress_bar(cat, dog, capsys):
    quiet = compare(cat, dog, progress=False)
    shown = compare(cat, dog, progress=True)
    assert shown.to_dict() == quiet.to_dict()
    assert "compare" in capsys.readouterr().err


def test_weight_graphs_use_strength_and_skip_circuits():
    g = random_layered_graph([4, 6, 6, 3], p=0.5, seed=2)
    h = g.with_weight(np.asarray(g.weight) * 2.0)
    c = compare(g, h)
    assert c.importance == "strength"
    assert all(r.circuit_jaccard is None for r in c.per_layer)
    assert c.summary["circuit_jaccard"] is None
    # Strength doubles everywhere: same ranking, weighted overlap one half.
    for r in c.per_layer:
        assert r.jaccard == 1.0 and r.spearman == pytest.approx(1.0)
        assert r.weighted_overlap == pytest.approx(0.5)


def test_constant_layers_give_nan_without_warnings():
    layers = [("in", "input", 3), ("out", "output", 2)]
    edges = [("in:0", "out:0", 1.0), ("in:1", "out:0", 1.0), ("in:2", "out:0", 1.0)]
    g = Connectome.from_edges(layers, edges, node_attrs={"attribution": [1.0, 1.0, 1.0, 3.0, 0.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = compare(g, g)
    rows = {r.layer: r for r in c.per_layer}
    assert np.isnan(rows["in"].spearman)
    assert rows["out"].spearman == pytest.approx(1.0)


def test_to_dict_is_json_and_repr_is_a_table(cat, dog):
    c = compare(cat, dog, top=3)
    d = c.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["per_layer"][0]["layer"] == "in" and d["summary"]["top"] == 3
    text = repr(c)
    assert text.startswith("Comparison('cat' vs 'dog'")
    for name in cat.layer_names:
        assert f"  {name}" in text


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 1, 1], [1, 1, 0, 0], 1.0),
        ([0, 0, 1, 1], [0, 1, 0, 1], 0.0),
        ([0, 0, 0, 0], [5, 5, 5, 5], 1.0),
        ([0, 0, 0, 0], [0, 1, 2, 3], 0.0),
    ],
)
def test_nmi_known_values(a, b, expected):
    assert _nmi(np.array(a), np.array(b)) == pytest.approx(expected, abs=1e-12)


def test_nmi_agrees_with_igraph():
    import igraph as ig

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 30), rng.integers(0, 3, 30)
        assert _nmi(a, b) == pytest.approx(ig.compare_communities(a.tolist(), b.tolist(), method="nmi"), abs=1e-9)


# ---------------------------------------------------------------------- compare_categories
def _three_graphs() -> dict[str, Connectome]:
    base = random_flow_graph([5, 7, 6, 3], seed=4)
    rng = np.random.default_rng(1)
    out = {}
    for name in ("c0", "c1", "c2"):
        a = rng.normal(size=base.num_nodes)
        out[name] = base.with_node_attrs(attribution=a, activation_mean=np.abs(a) + 1.0)
    return out


def test_compare_categories_matrices():
    graphs = _three_graphs()
    cc = compare_categories(graphs)
    assert isinstance(cc, CategoryCorrelation)
    assert cc.classes == ("c0", "c1", "c2")
    assert list(cc) == graphs["c0"].layer_names and len(cc) == 4
    for layer in cc:
        classes, m = cc[layer]
        assert classes == cc.classes and m.shape == (3, 3)
        np.testing.assert_allclose(m, m.T)
        np.testing.assert_allclose(np.diag(m), 1.0)
        X = np.vstack([g.node_attr("attribution", layer) for g in graphs.values()])
        np.testing.assert_allclose(m, np.corrcoef(X), atol=1e-12)


def test_compare_categories_activation_mean_and_identical_profiles():
    graphs = _three_graphs()
    cc = compare_categories(graphs, attr="activation_mean")
    assert cc.attr == "activation_mean"
    same = compare_categories({"a": graphs["c0"], "b": graphs["c0"]})
    for layer, (_, m) in same.items():
        np.testing.assert_allclose(m, 1.0)
    assert all(v == pytest.approx(1.0) for v in same.mean_offdiagonal().values())


def test_compare_categories_cat_dog(cat, dog):
    cc = compare_categories({"cat": cat, "dog": dog})
    _, m = cc["logits"]
    assert m[0, 1] == pytest.approx(-1.0)
    json.dumps(cc.to_dict(), allow_nan=False)
    assert "logits" in repr(cc)


def test_compare_categories_constant_profile_is_nan():
    graphs = _three_graphs()
    g = graphs["c2"]
    graphs["c2"] = g.with_node_attrs(attribution=np.zeros(g.num_nodes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, m = compare_categories(graphs)["h1"]
    assert np.isnan(m[2]).all() and np.isnan(m[:, 2]).all()
    assert m[0, 0] == 1.0


def test_compare_categories_errors(cat):
    with pytest.raises(ConnectomeError, match="no node attribute 'activation_mean'"):
        compare_categories({"cat": cat}, attr="activation_mean")
    with pytest.raises(ConnectomeError, match="different models"):
        compare_categories({"cat": cat, "x": random_flow_graph([3, 5, 2])})
    with pytest.raises(ValueError):
        compare_categories({})
    with pytest.raises(KeyError, match="no layer"):
        compare_categories({"cat": cat})["nope"]
