from __future__ import annotations

import importlib

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectome.analysis.centrality import MEASURES, ZERO_DISTANCE, centrality, strength, top_nodes
from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome, Layer


def layered(sizes=(4, 6, 6, 5, 3), p=0.6, skip=0.2, seed=0, attribution=False) -> Connectome:
    """Random layered DAG: consecutive layers wired with prob ``p``, skips with ``skip``."""
    rng = np.random.default_rng(seed)
    off = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for lj in range(1, len(sizes)):
        for li in range(lj):
            prob = p if li == lj - 1 else skip
            m = rng.random((sizes[li], sizes[lj])) < prob
            i, j = np.nonzero(m)
            src.append(i + off[li])
            dst.append(j + off[lj])
    src, dst = np.concatenate(src), np.concatenate(dst)
    w = rng.normal(size=src.size) * rng.uniform(0.2, 2.0, size=src.size)
    kinds = ["input"] + ["conv"] * (len(sizes) - 2) + ["output"]
    layers = tuple(Layer(f"l{i}", k, s) for i, (k, s) in enumerate(zip(kinds, sizes)))
    attrs = {"attribution": rng.normal(size=off[-1])} if attribution else {}
    return Connectome(layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]),
                      src=src, dst=dst, weight=w, node_attrs=attrs)


def nx_graph(g: Connectome) -> nx.DiGraph:
    a = np.abs(g.weight)
    dist = np.maximum(-np.log(a / a.max()), ZERO_DISTANCE)
    G = nx.DiGraph()
    G.add_nodes_from(range(g.num_nodes))
    for s, d, aw, sw, dd in zip(g.src.tolist(), g.dst.tolist(), a.tolist(), g.weight.tolist(), dist.tolist()):
        G.add_edge(s, d, weight=aw, signed=sw, dist=dd)
    return G


def as_array(d: dict, n: int) -> np.ndarray:
    return np.array([d[i] for i in range(n)], dtype=np.float64)


@pytest.fixture(scope="module", params=[0, 1, 2])
def g(request) -> Connectome:
    return layered(seed=request.param)


@pytest.fixture(scope="module")
def G(g) -> nx.DiGraph:
    return nx_graph(g)


# ----------------------------------------------------------------------- against networkx
def test_strengths_match_networkx(g, G):
    n = g.num_nodes
    c = centrality(g, MEASURES[:6])
    np.testing.assert_allclose(c["in_strength"], as_array(dict(G.in_degree(weight="weight")), n), rtol=1e-12)
    np.testing.assert_allclose(c["out_strength"], as_array(dict(G.out_degree(weight="weight")), n), rtol=1e-12)
    np.testing.assert_allclose(c["strength"], as_array(dict(G.degree(weight="weight")), n), rtol=1e-12)
    np.testing.assert_allclose(c["signed_in_strength"], as_array(dict(G.in_degree(weight="signed")), n), atol=1e-12)
    np.testing.assert_allclose(c["signed_out_strength"], as_array(dict(G.out_degree(weight="signed")), n), atol=1e-12)
    np.testing.assert_allclose(c["signed_strength"], as_array(dict(G.degree(weight="signed")), n), atol=1e-12)


def test_pagerank_matches_networkx(g, G):
    ours = centrality(g, ["pagerank"])["pagerank"]
    ref = as_array(nx.pagerank(G, weight="weight", tol=1e-12, max_iter=1000), g.num_nodes)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    assert ours.sum() == pytest.approx(1.0, abs=1e-9)


def test_betweenness_matches_networkx_with_log_distances(g, G):
    ours = centrality(g, ["betweenness"])["betweenness"]
    ref = as_array(nx.betweenness_centrality(G, weight="dist", normalized=False), g.num_nodes)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
    assert ours.max() > 0


def test_sampled_betweenness_is_networkx_estimate_for_the_same_sources(g, G):
    n, k, seed = g.num_nodes, 7, 3
    ours = centrality(g, ["betweenness"], betweenness_samples=k, seed=seed)["betweenness"]
    # the documented sample: k sources drawn without replacement by default_rng(seed)
    sources = np.random.default_rng(seed).choice(n, size=k, replace=False)
    raw = as_array(nx.betweenness_centrality_subset(G, sources.tolist(), list(G), normalized=False, weight="dist"), n)
    scale = np.full(n, (n - 1) / k)
    scale[sources] = (n - 1) / (k - 1)
    np.testing.assert_allclose(ours, raw * scale, rtol=1e-9, atol=1e-9)


def test_sampled_betweenness_with_all_sources_is_exact_and_seeded(g):
    exact = centrality(g, ["betweenness"])["betweenness"]
    full = centrality(g, ["betweenness"], betweenness_samples=g.num_nodes)["betweenness"]
    np.testing.assert_array_equal(exact, full)
    a = centrality(g, ["betweenness"], betweenness_samples=5, seed=1)["betweenness"]
    b = centrality(g, ["betweenness"], betweenness_samples=5, seed=1)["betweenness"]
    np.testing.assert_array_equal(a, b)


def test_sampled_betweenness_is_unbiased_on_average():
    g = layered(sizes=(3, 4, 4, 3), seed=5)
    exact = centrality(g, ["betweenness"])["betweenness"]
    est = np.mean([centrality(g, ["betweenness"], betweenness_samples=4, seed=s)["betweenness"] for s in range(400)], axis=0)
    top = exact > 0.3 * exact.max()
    np.testing.assert_allclose(est[top], exact[top], rtol=0.2)


def test_default_betweenness_is_exact_on_small_graphs(g):
    c = centrality(g, ["betweenness"])
    assert c.betweenness_samples is None
    np.testing.assert_array_equal(c["betweenness"], centrality(g, ["betweenness"], betweenness_samples=None)["betweenness"])
    assert centrality(g, ["pagerank"]).betweenness_samples is None


def test_default_betweenness_samples_above_the_work_budget(g, monkeypatch):
    import sys

    cmod = sys.modules["connectome.analysis.centrality"]  # the module; the package re-exports the function
    # a budget of 3 Dijkstra passes: the graph counts as large, the sample is the minimum
    monkeypatch.setattr(cmod, "BETWEENNESS_WORK", 3 * g.num_edges)
    monkeypatch.setattr(cmod, "MIN_BETWEENNESS_SAMPLES", 5)
    c = centrality(g, ["betweenness"], seed=2)
    assert c.betweenness_samples == 5
    np.testing.assert_array_equal(c["betweenness"], centrality(g, ["betweenness"], betweenness_samples=5, seed=2)["betweenness"])
    assert "5 sampled sources" in repr(c)
    # a budget that buys more passes than the minimum samples that many
    monkeypatch.setattr(cmod, "BETWEENNESS_WORK", 8 * g.num_edges)
    assert cmod.auto_betweenness_samples(g.num_nodes, g.num_edges) == 8


@pytest.mark.parametrize("samples", [None, 6])
def test_betweenness_progress_in_chunks_gives_the_same_values(g, samples, capsys):
    quiet = centrality(g, ["betweenness"], betweenness_samples=samples, seed=4, progress=False)["betweenness"]
    shown = centrality(g, ["betweenness"], betweenness_samples=samples, seed=4, progress=True)["betweenness"]
    np.testing.assert_allclose(shown, quiet, rtol=1e-12, atol=1e-12)
    assert "betweenness" in capsys.readouterr().err


@pytest.mark.parametrize("measure", ["pagerank", "eigenvector", "hub", "authority", "betweenness"])
def test_zero_weight_edges_change_nothing(measure):
    # attribution graphs have many exact zeros (dead units); igraph never sees them
    g = layered(seed=4)
    w = np.where(np.arange(g.num_edges) % 4 == 0, 0.0, g.weight)
    with_zeros = g.with_weight(w)
    without = with_zeros.prune(threshold=1e-300)  # the same graph without the zero edges
    assert without.num_edges < with_zeros.num_edges
    a = centrality(with_zeros, [measure])[measure]
    b = centrality(without, [measure])[measure]
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    if measure == "pagerank":  # and networkx, zero edges and all, agrees
        with np.errstate(divide="ignore"):  # nx_graph's -log distance of a zero edge
            G0 = nx_graph(with_zeros)
        ref = nx.pagerank(G0, weight="weight", tol=1e-13, max_iter=10000)
        np.testing.assert_allclose(a, as_array(ref, g.num_nodes), rtol=1e-6)


def test_hub_authority_match_networkx(g, G):
    c = centrality(g, ["hub", "authority"])
    h, a = nx.hits(G, max_iter=100000, tol=1e-14)
    h, a = as_array(h, g.num_nodes), as_array(a, g.num_nodes)
    np.testing.assert_allclose(c["hub"], h / h.max(), atol=1e-6)
    np.testing.assert_allclose(c["authority"], a / a.max(), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Some eigenvector centralities are nearly zero")
def test_degenerate_hits_is_reproducible():
    # two identical disconnected blocks: the leading eigenvalue is double
    edges = [("a:0", "b:0", 1.0), ("a:0", "b:1", 2.0), ("a:1", "b:1", 1.0),
             ("a:2", "b:2", 1.0), ("a:2", "b:3", 2.0), ("a:3", "b:3", 1.0)]
    g = Connectome.from_edges([("a", "input", 4), ("b", "output", 4)], edges)
    runs = [centrality(g, ["hub", "authority", "eigenvector"], seed=7) for _ in range(3)]
    for name in runs[0]:
        for r in runs[1:]:
            np.testing.assert_array_equal(runs[0][name], r[name])


def test_eigenvector_is_the_undirected_one(g, G):
    ours = centrality(g, ["eigenvector"])["eigenvector"]
    ref = as_array(nx.eigenvector_centrality_numpy(G.to_undirected(), weight="weight"), g.num_nodes)
    np.testing.assert_allclose(ours / ours.max(), np.abs(ref) / np.abs(ref).max(), atol=1e-6)


# ----------------------------------------------------------------------- known answers
@pytest.fixture(scope="module")
def star() -> Connectome:
    edges = [(f"in:{i}", "hub:0", 1.0 + i) for i in range(4)]
    edges += [("hub:0", f"out:{j}", -2.0) for j in range(3)]
    edges += [("in:0", "out:0", 0.01)]  # a weak shortcut: never shortest
    return Connectome.from_edges([("in", "input", 4), ("hub", "conv", 1), ("out", "output", 3)], edges)


def test_star_centre_has_all_betweenness(star):
    b = centrality(star, ["betweenness"])["betweenness"]
    hub = star.index_of("hub:0")
    assert b[hub] == pytest.approx(12.0)  # 4 inputs x 3 outputs, all through the hub
    assert np.delete(b, hub).max() == 0.0
    assert top_nodes(star, b, k=1) == [("hub:0", 12.0)]


def test_star_strengths_by_hand(star):
    c = centrality(star, ["in_strength", "out_strength", "strength", "signed_strength"])
    hub = star.index_of("hub:0")
    assert c["in_strength"][hub] == pytest.approx(10.0)
    assert c["out_strength"][hub] == pytest.approx(6.0)
    assert c["strength"][hub] == pytest.approx(16.0)
    assert c["signed_strength"][hub] == pytest.approx(4.0)
    np.testing.assert_allclose(strength(star, "out", absolute=False)[:4], [1.01, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(strength(star), c["strength"])


def test_star_pagerank_and_hits_rank_the_expected_units(star):
    c = centrality(star, ["pagerank", "hub", "authority", "eigenvector"])
    hub = star.index_of("hub:0")
    assert c["authority"].argmax() == hub  # fed by every input
    assert c["eigenvector"].argmax() == hub
    pr = c["pagerank"]
    assert pr[star.layer_slice("out")].min() > pr[star.layer_slice("in")].max()  # rank flows forward


def test_zero_weight_edges_carry_no_paths():
    g = Connectome.from_edges(
        [("a", "input", 1), ("b", "conv", 2), ("c", "output", 1)],
        [("a:0", "b:0", 0.0), ("a:0", "b:1", 0.5), ("b:0", "c:0", 1.0), ("b:1", "c:0", 1.0)],
    )
    b = centrality(g, ["betweenness"])["betweenness"]
    assert b.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_flow_is_attribution_and_default_measures():
    g = layered(seed=4, attribution=True)
    c = centrality(g)
    assert list(c) == ["strength", "pagerank", "betweenness", "flow"]
    np.testing.assert_array_equal(c["flow"], g.node_attrs["attribution"])
    assert list(centrality(layered(seed=4))) == ["strength", "pagerank", "betweenness"]


def test_one_default_list_for_the_library_the_cli_and_reports(monkeypatch):
    """The CLI's export and the report asked for their own copies of the list; now all read
    default_measures, leaving out only betweenness (a changed DEFAULT_MEASURES reaches all)."""
    from connectome import analysis as an
    from connectome import cli, reporting

    g = layered(seed=4, attribution=True)
    assert an.default_measures(g) == list(centrality(g))
    assert an.default_measures(g, betweenness=False) == ["strength", "pagerank", "flow"]
    assert an.default_measures(layered(seed=4), betweenness=False) == ["strength", "pagerank"]
    asked = []
    real = an.centrality
    monkeypatch.setattr(an, "centrality", lambda g, measures=None, **kw: asked.append(list(measures)) or real(g, measures, **kw))
    module = importlib.import_module("connectome.analysis.centrality")  # the package's `centrality` is the function
    monkeypatch.setattr(module, "DEFAULT_MEASURES", ("pagerank", "flow", "strength"))
    cli._annotated(g)
    reporting.graph_sections(g, max_cards=0)
    assert asked[0] == ["pagerank", "flow", "strength"]
    assert asked[1][:3] == ["pagerank", "flow", "strength"]


def test_every_measure_has_the_right_shape_and_is_finite(g):
    c = centrality(g.with_node_attrs(attribution=np.ones(g.num_nodes)), MEASURES, normalized_by_layer=True)
    assert list(c) == list(MEASURES)
    for name, v in c.items():
        assert v.shape == (g.num_nodes,), name
        assert np.all(np.isfinite(v)), name


def test_edgeless_graph():
    g = Connectome.from_edges([("a", "input", 2), ("b", "output", 2)])
    c = centrality(g, MEASURES[:-1])
    np.testing.assert_allclose(c["pagerank"], 0.25)
    for name in MEASURES[:-1]:
        if name != "pagerank":
            assert not c[name].any(), name


# ----------------------------------------------------------------------- normalisation
def test_normalized_by_layer(g):
    raw = centrality(g, ["pagerank", "signed_strength"])
    norm = centrality(g, ["pagerank", "signed_strength"], normalized_by_layer=True)
    for name in raw:
        for l in g.layer_names:
            s = g.layer_slice(l)
            r, v = raw[name][s], norm[name][s]
            if np.abs(r).max() == 0:
                assert not v.any()
                continue
            assert np.abs(v).max() == pytest.approx(1.0)
            np.testing.assert_allclose(v * np.abs(r).max(), r, rtol=1e-12, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_normalized_centralities_ignore_a_global_weight_scale(seed, scale):
    g = layered(sizes=(3, 4, 3), seed=seed)
    h = g.with_weight(g.weight * scale)
    names = ["strength", "pagerank", "betweenness"]  # HITS may be degenerate on a random draw
    a = centrality(g, names, normalized_by_layer=True)
    b = centrality(h, names, normalized_by_layer=True)
    for name in names:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-9, err_msg=name)


# ----------------------------------------------------------------------- top_nodes
def test_top_nodes_order_ties_and_layer():
    g = Connectome.from_edges([("a", "input", 3), ("b", "output", 3)])
    s = np.array([1.0, 3.0, 1.0, np.nan, 3.0, 2.0])
    assert top_nodes(g, s, k=4) == [("a:1", 3.0), ("b:1", 3.0), ("b:2", 2.0), ("a:0", 1.0)]
    assert top_nodes(g, s, k=10, layer="b") == [("b:1", 3.0), ("b:2", 2.0)]  # NaN never ranked
    assert top_nodes(g.with_node_attrs(x=s), "x", k=1) == [("a:1", 3.0)]


# ----------------------------------------------------------------------- bad inputs
def test_unknown_measure_lists_valid_ones(g):
    with pytest.raises(ValueError, match="pagerank"):
        centrality(g, ["pagerank", "closeness"])


def test_flow_without_attribution_says_what_to_do(g):
    with pytest.raises(ConnectomeError, match="attribution"):
        centrality(g, ["flow"])


@pytest.mark.parametrize("samples", [0, 1, 2.5, "many", True])
def test_bad_sample_count(g, samples):
    with pytest.raises(ValueError, match="betweenness_samples"):
        centrality(g, ["betweenness"], betweenness_samples=samples)


def test_bad_inputs_elsewhere(g):
    with pytest.raises(ConnectomeError, match="non-finite"):
        centrality(g.with_weight(np.where(np.arange(g.num_edges) == 2, np.nan, g.weight)), ["strength"])
    with pytest.raises(ConnectomeError, match="no edge attribute"):
        centrality(g, ["strength"], weight="nope")
    with pytest.raises(ValueError, match="direction"):
        strength(g, "both")
    with pytest.raises(ValueError, match="one value per node"):
        top_nodes(g, [1.0, 2.0])
    with pytest.raises(ValueError, match="k must be"):
        top_nodes(g, np.zeros(g.num_nodes), k=0)
    with pytest.raises(ConnectomeError, match="no layer"):
        top_nodes(g, np.zeros(g.num_nodes), layer="nope")
    with pytest.raises(EmptyGraphError):
        centrality(Connectome.from_edges([]))
    with pytest.raises(TypeError):
        centrality(nx.DiGraph())
