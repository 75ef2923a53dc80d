from __future__ import annotations

import igraph as ig
import leidenalg as la
import networkx as nx
import numpy as np
import pytest

from connectome.analysis.communities import (
    Community,
    Partition,
    ResolutionSweep,
    _relabel,
    communities,
    resolution_sweep,
)
from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome, Layer


def planted(n_groups=3, n_layers=4, per=6, seed=0, p_cross=0.15, w_cross=0.05, signed=True):
    """Groups of ``per`` units in every layer; dense strong edges inside a group between
    consecutive layers, sparse weak ones across groups. Returns (graph, group of each node)."""
    rng = np.random.default_rng(seed)
    width = n_groups * per
    grp = np.arange(width) // per
    src, dst, w = [], [], []
    for li in range(1, n_layers):
        same = grp[:, None] == grp[None, :]
        cross = ~same & (rng.random((width, width)) < p_cross)
        for mask, strong in ((same, True), (cross, False)):
            i, j = np.nonzero(mask)
            src.append(i + (li - 1) * width)
            dst.append(j + li * width)
            if strong:
                mag = rng.uniform(0.5, 1.5, i.size)
                w.append(mag * (rng.choice([-1.0, 1.0], i.size) if signed else 1.0))
            else:
                w.append(np.full(i.size, w_cross))
    layers = tuple(Layer(f"l{i}", "input" if i == 0 else "conv", width) for i in range(n_layers))
    g = Connectome(layers=layers, node_units=np.tile(np.arange(width), n_layers),
                   src=np.concatenate(src), dst=np.concatenate(dst), weight=np.concatenate(w))
    return g, np.tile(grp, n_layers)


def two_rivals():
    """Two groups A and B, positive inside each, strongly negative between them."""
    edges = []
    for li in range(2):
        for u in range(6):
            for v in range(6):
                same = (u < 3) == (v < 3)
                edges.append((f"l{li}:{u}", f"l{li + 1}:{v}", 1.0 if same else -3.0))
    g = Connectome.from_edges([(f"l{i}", "conv", 6) for i in range(3)], edges)
    return g, np.tile(np.r_[np.zeros(3), np.ones(3)], 3).astype(int)


@pytest.fixture(scope="module")
def plant():
    return planted()


def ari(a, b) -> float:
    return ig.compare_communities(list(a), list(b), method="adjusted_rand")


def ig_graph(g: Connectome) -> ig.Graph:
    return ig.Graph(n=g.num_nodes, edges=list(zip(g.src.tolist(), g.dst.tolist())), directed=True)


# ----------------------------------------------------------------------- recovery
@pytest.mark.parametrize("engine", ["igraph", "leidenalg"])
def test_planted_partition_is_recovered_exactly(plant, engine):
    g, truth = plant
    p = communities(g, engine=engine)
    assert ari(p.membership, truth) == 1.0
    np.testing.assert_array_equal(p.membership, _relabel(truth))
    assert p.n_communities == 3
    assert [c.layers for c in p.communities] == [tuple(g.layer_names)] * 3


def test_planted_partition_with_cpm(plant):
    g, truth = plant
    p = communities(g, method="cpm", resolution=0.05)
    assert ari(p.membership, truth) == 1.0
    assert p.objective == "CPM (directed, leidenalg)"


# ----------------------------------------------------------------------- quality
@pytest.mark.parametrize("engine", ["igraph", "leidenalg"])
@pytest.mark.parametrize("resolution", [0.5, 1.0, 2.0])
def test_modularity_quality_is_recomputed_independently(plant, engine, resolution):
    g, _ = plant
    p = communities(g, resolution=resolution, engine=engine)
    w = np.abs(g.weight)
    G = ig_graph(g)
    assert p.quality == pytest.approx(G.modularity(p.membership.tolist(), weights=w.tolist(),
                                                   resolution=resolution, directed=True), rel=1e-9)
    rb = la.RBConfigurationVertexPartition(G, initial_membership=p.membership.tolist(), weights=w.tolist(),
                                           resolution_parameter=resolution)
    assert p.quality == pytest.approx(rb.quality() / w.sum(), rel=1e-9)
    if resolution == 1.0:
        N = nx.DiGraph()
        N.add_weighted_edges_from(zip(g.src.tolist(), g.dst.tolist(), w.tolist()))
        N.add_nodes_from(range(g.num_nodes))
        groups = [set(np.flatnonzero(p.membership == c).tolist()) for c in range(p.n_communities)]
        assert p.quality == pytest.approx(nx.community.modularity(N, groups, weight="weight"), rel=1e-9)


def test_cpm_quality_is_leidenalg_quality(plant):
    g, _ = plant
    p = communities(g, method="cpm", resolution=0.2, seed=3)
    w = np.abs(g.weight)
    ref = la.CPMVertexPartition(ig_graph(g), initial_membership=p.membership.tolist(), weights=w.tolist(),
                                resolution_parameter=0.2)
    assert p.quality == pytest.approx(ref.quality(), rel=1e-9)
    # CPM by hand: internal weight minus resolution * n_c (n_c - 1)
    inside = p.membership[g.src] == p.membership[g.dst]
    n_c = p.sizes()
    assert p.quality == pytest.approx(w[inside].sum() - 0.2 * (n_c * (n_c - 1)).sum(), rel=1e-9)


@pytest.mark.parametrize("method", ["modularity", "cpm"])
def test_signed_quality_is_the_multiplex_objective(method):
    g, _ = planted(seed=2)
    res = 1.0 if method == "modularity" else 0.05
    p = communities(g, method=method, resolution=res, weights="signed", seed=1)
    assert p.weights == "signed" and p.objective.startswith("signed")
    G = ig_graph(g)
    pos, neg = g.weight > 0, g.weight < 0
    Gp = G.subgraph_edges(np.flatnonzero(pos).tolist(), delete_vertices=False)
    Gn = G.subgraph_edges(np.flatnonzero(neg).tolist(), delete_vertices=False)
    Part = la.RBConfigurationVertexPartition if method == "modularity" else la.CPMVertexPartition
    m = p.membership.tolist()
    qp = Part(Gp, initial_membership=m, weights=g.weight[pos].tolist(), resolution_parameter=res).quality()
    qn = Part(Gn, initial_membership=m, weights=(-g.weight[neg]).tolist(),
              resolution_parameter=res if method == "modularity" else 0.0).quality()
    expected = (qp - qn) / np.abs(g.weight).sum() if method == "modularity" else qp - qn
    assert p.quality == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------- signed, weights
@pytest.mark.parametrize("method,res", [("modularity", 1.0), ("cpm", 0.1)])
def test_signed_mode_keeps_rivals_apart(method, res):
    g, truth = two_rivals()
    p = communities(g, method=method, resolution=res, weights="signed")
    assert ari(p.membership, truth) == 1.0
    # with |w| the strong negative edges read as strong ties and the rivals mix
    q = communities(g, method=method, resolution=res, weights="abs", engine="leidenalg")
    assert ari(q.membership, truth) < 1.0


def test_positive_weights_drop_negative_edges():
    g, _ = two_rivals()
    p = communities(g, weights="positive")
    kept = g.weight > 0
    h = Connectome(layers=g.layers, node_units=g.node_units, src=g.src[kept], dst=g.dst[kept], weight=g.weight[kept])
    np.testing.assert_array_equal(p.membership, communities(h).membership)


def test_weights_column_and_array():
    g, truth = planted(signed=False)
    a = communities(g.with_edge_attrs(strength=g.weight * 2), weights="strength")
    b = communities(g, weights=np.abs(g.weight))
    np.testing.assert_array_equal(a.membership, b.membership)
    assert ari(a.membership, truth) == 1.0


# ----------------------------------------------------------------------- determinism, labels
def test_same_seed_same_partition_and_seeds_matter():
    rng = np.random.default_rng(0)
    n = 40
    layers = [(f"l{i}", "conv", n) for i in range(3)]
    edges = [(f"l{li}:{u}", f"l{li + 1}:{v}", float(rng.uniform(0.1, 1)))
             for li in range(2) for u in range(n) for v in range(n) if rng.random() < 0.1]
    g = Connectome.from_edges(layers, edges)  # no structure: partitions depend on the seed
    for engine in ("igraph", "leidenalg"):
        runs = [communities(g, seed=s, engine=engine).membership for s in (0, 0, 1, 2, 3)]
        np.testing.assert_array_equal(runs[0], runs[1])
        assert any(not np.array_equal(runs[0], r) for r in runs[2:]), engine


def test_relabel_rule():
    assert _relabel([5, 5, 2, 2, 2, 9, 7, 7]).tolist() == [1, 1, 0, 0, 0, 3, 2, 2]
    assert _relabel([3, 1, 1, 3]).tolist() == [0, 1, 1, 0]  # equal sizes: smaller first index first


def test_labels_ordered_by_size_then_first_node(plant):
    g, _ = plant
    p = communities(g, method="cpm", resolution=0.5)
    sizes = p.sizes()
    assert np.all(np.diff(sizes) <= 0)
    first = np.array([np.flatnonzero(p.membership == c)[0] for c in range(p.n_communities)])
    for c in range(p.n_communities - 1):
        if sizes[c] == sizes[c + 1]:
            assert first[c] < first[c + 1]


def test_isolated_units_are_singletons_with_the_last_labels():
    edges = [(f"a:{i}", f"b:{j}", 1.0) for i in range(2) for j in range(2)]
    edges += [(f"a:{i}", f"b:{j}", 1.0) for i in range(2, 4) for j in range(2, 4)]
    g = Connectome.from_edges([("a", "input", 5), ("b", "output", 5)], edges)
    p = communities(g)
    assert p.sizes().tolist() == [4, 4, 1, 1]
    assert p.membership[[g.index_of("a:4"), g.index_of("b:4")]].tolist() == [2, 3]
    assert p.membership[[g.index_of("a:0"), g.index_of("a:2")]].tolist() == [0, 1]
    q = communities(g, method="cpm", resolution=0.1)  # leidenalg
    iso = q.membership[[g.index_of("a:4"), g.index_of("b:4")]].tolist()
    assert iso == [q.n_communities - 2, q.n_communities - 1]


# ----------------------------------------------------------------------- summaries, attrs, repr
def test_community_summaries_by_hand():
    g = Connectome.from_edges(
        [("a", "input", 2), ("b", "conv", 2), ("c", "output", 2)],
        [("a:0", "b:0", 2.0), ("b:0", "c:0", -1.0), ("a:0", "c:0", 0.5),
         ("a:1", "b:1", 3.0), ("b:1", "c:1", 1.0), ("b:0", "c:1", 0.01)],
        node_attrs={"attribution": [0.1, 5.0, -3.0, 0.2, 1.0, 0.0]},
    )
    p = communities(g)
    m = dict(zip(g.node_ids.tolist(), p.membership.tolist()))
    assert m["a:0"] == m["b:0"] == m["c:0"] != m["a:1"] == m["b:1"] == m["c:1"]
    ca, cb = p.communities[m["a:0"]], p.communities[m["a:1"]]
    assert isinstance(ca, Community)
    assert ca.size == cb.size == 3
    assert ca.layers == ("a", "b", "c")
    assert ca.internal_flow == pytest.approx(1.5)
    assert cb.internal_flow == pytest.approx(4.0)
    assert ca.top_units == ("b:0", "c:0", "a:0")  # |attribution| 3.0, 1.0, 0.1
    assert cb.top_units == ("a:1", "b:1", "c:1")  # 5.0, 0.2, 0.0
    # the same graph without attribution: ranked by |w| strength instead
    h = Connectome(layers=g.layers, node_units=g.node_units, src=g.src, dst=g.dst, weight=g.weight)
    plain = communities(h)
    assert plain.communities[m["a:0"]].top_units == ("b:0", "a:0", "c:0")  # 3.01, 2.5, 1.5


def test_to_node_attr_and_repr(plant):
    g, _ = plant
    p = communities(g)
    h = p.to_node_attr(g)
    np.testing.assert_array_equal(h.node_attrs["community"], p.membership)
    assert "community" not in g.node_attrs
    with pytest.raises(ConnectomeError, match="covers"):
        p.to_node_attr(two_rivals()[0])
    r = repr(p)
    assert "3 communities of 72 units" in r and "modularity (directed, igraph Leiden)" in r
    assert "l0..l3 (4 layers)" in r
    assert isinstance(p, Partition) and not p.membership.flags.writeable


# ----------------------------------------------------------------------- sweep
def test_resolution_sweep(plant):
    g, _ = plant
    sweep = resolution_sweep(g, [0.5, 1.0, 3.0], seeds=(0, 1, 2))
    assert isinstance(sweep, ResolutionSweep) and len(sweep) == 3
    r1 = sweep[1]
    assert (r1.resolution, r1.n_communities, r1.nmi, r1.ari) == (1.0, 3.0, 1.0, 1.0)
    assert sweep.column("n_communities")[-1] > 3
    assert [len(ps) for ps in sweep.partitions] == [3, 3, 3]
    assert "NMI" in repr(sweep)
    single = resolution_sweep(g, [1.0], seeds=(0,))
    assert np.isnan(single[0].nmi) and np.isnan(single[0].ari)
    with pytest.raises(ValueError):
        resolution_sweep(g, [])


# ----------------------------------------------------------------------- errors
def test_errors(plant):
    g, _ = plant
    with pytest.raises(ValueError, match="method"):
        communities(g, method="louvain")
    with pytest.raises(ValueError, match="engine"):
        communities(g, engine="networkx")
    with pytest.raises(ValueError, match="weights"):
        communities(g, weights="nope")
    with pytest.raises(ValueError, match="leidenalg"):
        communities(g, method="cpm", engine="igraph")
    with pytest.raises(ValueError, match="leidenalg"):
        communities(g, weights="signed", engine="igraph")
    with pytest.raises(ConnectomeError, match="weights='abs'.*'positive'.*'signed'"):
        communities(g, weights="weight")
    with pytest.raises(ConnectomeError, match="negative"):
        communities(g, weights=g.weight)
    with pytest.raises(ConnectomeError, match="negative"):
        communities(g.with_edge_attrs(w2=g.weight), weights="w2")
    with pytest.raises(EmptyGraphError, match="positive"):
        communities(g.with_weight(-np.abs(g.weight)), weights="positive")
    with pytest.raises(EmptyGraphError):
        communities(Connectome.from_edges([("a", "input", 3)]))
    with pytest.raises(ValueError, match="resolution"):
        communities(g, resolution=-1)
    with pytest.raises(ValueError, match="seed"):
        communities(g, seed=-1)


def test_annotate_carries_results_to_graphml(tmp_path):
    import networkx as nx

    import connectome as cn
    from connectome import analysis as an

    g = cn.Connectome.from_edges(
        [("in", "input", 2), ("h", "conv", 3), ("out", "output", 1)],
        [("in:0", "h:0", 1.0), ("in:1", "h:1", 2.0), ("in:1", "h:2", 0.5), ("h:0", "out:0", 1.0), ("h:1", "out:0", -1.0)],
    )
    c = an.centrality(g, ["pagerank"])
    p = an.communities(g, seed=0)
    g2 = an.annotate(g, centrality=c, partition=p, circuit=g.subgraph(["h:1", "out:0"]))
    np.testing.assert_array_equal(g2.node_attr("centrality_pagerank"), c["pagerank"])
    np.testing.assert_array_equal(g2.node_attr("community"), p.membership)
    np.testing.assert_array_equal(g2.node_attr("in_circuit"), [0, 0, 0, 1, 0, 1])
    cn.io.write_graphml(g2, tmp_path / "g.graphml")
    G = nx.read_graphml(tmp_path / "g.graphml")
    assert G.nodes["h:1"]["in_circuit"] == 1.0 and "centrality_pagerank" in G.nodes["h:1"]


def test_annotate_records_how_betweenness_was_computed():
    from connectome import analysis as an
    from connectome.analysis._toys import toy_attribution

    g = toy_attribution("cat")
    sampled = an.centrality(g, ["betweenness"], betweenness_samples=3)
    assert an.annotate(g, centrality=sampled).meta["centrality"] == {"betweenness_samples": 3}
    assert an.annotate(g, centrality=an.centrality(g, ["betweenness"])).meta["centrality"] == {"betweenness_samples": None}
    assert "centrality" not in an.annotate(g, centrality=an.centrality(g, ["pagerank"])).meta
