"""to_networkx / to_igraph as other libraries use them: non-negative weights, writable graph
attributes, equal to graphs built through the libraries' own public APIs."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest

import connectome._igraph as igraph_cache
import connectome.graph as graph_mod
from connectome.analysis import centrality
from connectome.graph import Connectome, Layer


def random_layered(rng: np.random.Generator, sizes, p: float = 0.6, skip: float = 0.2) -> Connectome:
    """A random layered DAG with signed weights (edges to the next layer with prob p, skips with prob skip)."""
    off = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for lj in range(1, len(sizes)):
        for li in range(lj):
            i, j = np.nonzero(rng.random((sizes[li], sizes[lj])) < (p if li == lj - 1 else skip))
            src.append(i + off[li])
            dst.append(j + off[lj])
    src, dst = np.concatenate(src), np.concatenate(dst)
    kinds = ["input"] + ["conv"] * (len(sizes) - 2) + ["output"]
    layers = tuple(Layer(f"l{i}", k, int(s)) for i, (k, s) in enumerate(zip(kinds, sizes)))
    return Connectome(layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]), src=src, dst=dst,
                      weight=rng.normal(size=src.size), node_attrs={"attribution": rng.normal(size=off[-1])})


@pytest.fixture
def signed() -> Connectome:
    rng = np.random.default_rng(7)
    g = random_layered(rng, [4, 6, 6, 3])
    g = g.with_edge_attrs(abs_weight=np.abs(g.weight) * 1.5)
    g = g.with_node_attrs(community=np.arange(g.num_nodes) % 3, flag=np.arange(g.num_nodes) % 2 == 0)
    return g.with_labels("l3", ["cat", "dog", "<&>"]).with_meta(model="m", nested={"a": [1, 2]})


def _public_networkx(g: Connectome) -> nx.DiGraph:
    """The same graph built only through networkx's public API (the reference)."""
    G = nx.DiGraph()
    ids = g.node_ids.tolist()
    for i, nid in enumerate(ids):
        l = g.layers[g.node_layer[i]]
        d = {"layer": l.name, "index": int(g.node_units[i]), "kind": l.kind, "label": str(g.node_labels[i])}
        d.update({k: v[i].item() for k, v in g.node_attrs.items()})
        G.add_node(nid, **d)
    for e in range(g.num_edges):
        d = {"weight": abs(float(g.weight[e])), "signed_weight": float(g.weight[e])}
        d.update({k: v[e].item() for k, v in g.edge_attrs.items()})
        G.add_edge(ids[g.src[e]], ids[g.dst[e]], **d)
    return G


def test_to_networkx_equals_the_public_api_build(signed):
    G = signed.to_networkx()
    ref = _public_networkx(signed)
    assert list(G.nodes) == list(ref.nodes)
    assert dict(G.nodes(data=True)) == dict(ref.nodes(data=True))
    assert {(u, v): d for u, v, d in G.edges(data=True)} == {(u, v): d for u, v, d in ref.edges(data=True)}
    # succ and pred share one attribute dict per edge, as networkx's own graphs do
    u, v = next(iter(G.edges))
    assert G.succ[u][v] is G.pred[v][u]
    assert G.in_degree(v) == ref.in_degree(v) and G.out_degree(u) == ref.out_degree(u)


def test_to_networkx_weights_work_in_networkx_algorithms(signed):
    G = signed.to_networkx()
    assert all(d["weight"] >= 0 for _, _, d in G.edges(data=True))
    ours = centrality(signed, ["pagerank"])["pagerank"]
    theirs = nx.pagerank(G, weight="weight", tol=1e-12, max_iter=1000)
    np.testing.assert_allclose([theirs[i] for i in signed.node_ids], ours, rtol=1e-6)


def test_to_networkx_round_trips_through_networkx_writers(signed, tmp_path):
    G = signed.to_networkx()
    assert all(isinstance(v, str) for v in G.graph.values())  # what write_graphml accepts
    nx.write_graphml(G, tmp_path / "g.graphml")
    back = Connectome.from_networkx(nx.read_graphml(tmp_path / "g.graphml"))
    assert back.equals(signed)
    nx.write_gexf(G, tmp_path / "g.gexf")
    H = nx.read_gexf(tmp_path / "g.gexf")
    assert H.number_of_edges() == signed.num_edges
    assert Connectome.from_networkx(G).equals(signed)


def test_to_networkx_warns_before_a_huge_graph(signed, monkeypatch):
    monkeypatch.setattr(graph_mod, "NX_WARN_EDGES", signed.num_edges - 1)
    with pytest.warns(ResourceWarning, match=r"prune first"):
        signed.to_networkx()


def test_signed_weight_column_collides(signed):
    g = signed.with_edge_attrs(signed_weight=signed.weight)
    with pytest.raises(Exception, match="signed_weight"):
        g.to_networkx()
    with pytest.raises(Exception, match="signed_weight"):
        g.to_igraph()


def test_from_networkx_of_a_plain_signed_graph_keeps_the_sign():
    G = nx.DiGraph()
    G.add_edge("in:0", "out:0", weight=-2.0)
    assert Connectome.from_networkx(G).weight.tolist() == [-2.0]


def test_to_igraph_shares_one_topology_per_edge_structure(signed):
    igraph_cache.clear()
    other = signed.with_weight(signed.weight * 2)  # same edges, new weights: same topology
    a, b = signed.to_igraph(), other.to_igraph()
    assert len(igraph_cache._cache) == 1
    assert a.get_edgelist() == b.get_edgelist() == list(zip(signed.src.tolist(), signed.dst.tolist()))
    np.testing.assert_array_equal(b.es["signed_weight"], other.weight)
    a.add_edge(0, 1)  # the caller's copy; the cache stays as it was
    assert igraph_cache.topology(signed).ecount() == signed.num_edges
    assert json.loads(a["meta"]) == signed.meta


def test_igraph_weights_work_in_igraph_algorithms(signed):
    G = signed.to_igraph()
    pr = np.array(G.pagerank(weights="weight"))
    np.testing.assert_allclose(pr, centrality(signed, ["pagerank"])["pagerank"], rtol=1e-9)


def test_edge_topology_holds_the_kept_edges_in_order(signed):
    igraph_cache.clear()
    keep = np.arange(signed.num_edges) % 3 != 0
    G = igraph_cache.edge_topology(signed, keep)
    assert G.vcount() == signed.num_nodes
    assert G.get_edgelist() == list(zip(signed.src[keep].tolist(), signed.dst[keep].tolist()))
    assert igraph_cache.edge_topology(signed, keep.copy()) is G  # same graph, same mask: remembered
    other = igraph_cache.edge_topology(signed, ~keep)
    assert other is not G and other.ecount() == int((~keep).sum())
    assert igraph_cache.edge_topology(signed, np.ones(signed.num_edges, bool)) is igraph_cache.topology(signed)


def test_topology_is_built_in_chunks_without_changing_it(signed, monkeypatch):
    igraph_cache.clear()
    monkeypatch.setattr(igraph_cache, "CHUNK", 5)  # many chunks for a small graph
    G = igraph_cache.topology(signed)
    assert G.get_edgelist() == list(zip(signed.src.tolist(), signed.dst.tolist()))
    igraph_cache.clear()
