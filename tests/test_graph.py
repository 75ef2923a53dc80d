"""The Connectome object: construction, views, prune/subgraph/contract, converters, immutability."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome, Layer

LAYERS = [("input", "input", 2), ("h", "conv", 3), ("logits", "output", 2, ("cat", "dog"))]
EDGES = [
    ("input:0", "h:0", 1.0),
    ("input:1", "h:0", -2.0),
    ("input:1", "h:2", 0.5),
    ("h:0", "logits:0", 3.0),
    ("h:2", "logits:0", -1.5),
    ("h:1", "logits:1", 0.25),
    ("input:0", "logits:1", 4.0),  # a skip edge
]


@pytest.fixture
def toy() -> Connectome:
    return Connectome.from_edges(
        LAYERS, EDGES, meta={"model": "toy", "method": "hand"},
        node_attrs={"attribution": np.arange(7, dtype=np.float64) / 2},
    )


def random_layered(rng: np.random.Generator, sizes, p=0.6, skip=0.2, positive=False, attrs=True) -> Connectome:
    """A random layered DAG (edges between consecutive layers with prob p, skips with prob skip)."""
    off = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for lj in range(1, len(sizes)):
        for li in range(lj):
            m = rng.random((sizes[li], sizes[lj])) < (p if li == lj - 1 else skip)
            i, j = np.nonzero(m)
            src.append(i + off[li])
            dst.append(j + off[lj])
    src = np.concatenate(src) if src else np.zeros(0, np.int64)
    dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    w = rng.uniform(0.1, 2.0, src.size) if positive else rng.normal(size=src.size)
    kinds = ["input"] + ["conv"] * (len(sizes) - 2) + ["output"]
    layers = tuple(Layer(f"l{i}", k, int(s)) for i, (k, s) in enumerate(zip(kinds, sizes)))
    node_attrs = {"attribution": rng.normal(size=off[-1])} if attrs else {}
    return Connectome(layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]),
                      src=src, dst=dst, weight=w, node_attrs=node_attrs, meta={"seed": 1})


def edge_dict(g: Connectome, attr: str = "weight") -> dict[tuple[str, str], float]:
    ids = g.node_ids
    return {(ids[s], ids[d]): float(v) for s, d, v in zip(g.src, g.dst, g.edge_attr(attr))}


# ---------------------------------------------------------------------- construction and views
def test_from_edges_builds_ids_and_canonical_order(toy):
    assert toy.num_nodes == 7 and toy.num_edges == 7 and len(toy) == 7
    assert toy.node_ids.tolist() == ["input:0", "input:1", "h:0", "h:1", "h:2", "logits:0", "logits:1"]
    assert toy.layer_names == ["input", "h", "logits"]
    # Edges are sorted by (dst, src) whatever order they were given in.
    key = toy.dst * toy.num_nodes + toy.src
    assert np.all(np.diff(key) > 0)
    assert edge_dict(toy) == {(s, d): w for s, d, w in EDGES}
    assert toy.meta == {"model": "toy", "method": "hand"}
    assert toy.layer("logits").labels == ("cat", "dog")
    assert toy.node_labels.tolist()[-2:] == ["cat", "dog"]


def test_edge_order_does_not_matter(toy):
    rev = Connectome.from_edges(LAYERS, EDGES[::-1], meta=toy.meta, node_attrs=toy.node_attrs)
    assert rev.equals(toy)


def test_layer_of_and_index_of(toy):
    assert toy.layer_of("h:2") == Layer("h", "conv", 3)
    assert toy.layer_of("logits:1").kind == "output"
    assert toy.index_of("h:1") == 3
    np.testing.assert_array_equal(toy.index_of(["logits:1", "input:0"]), [6, 0])
    assert toy.has_node("h:2") and not toy.has_node("h:3") and not toy.has_node("nope:0")


@pytest.mark.parametrize("bad, phrase", [("h:7", "layer 'h' has units"), ("conv9:0", "node ids are '<layer>:<unit>'")])
def test_unknown_node_message(toy, bad, phrase):
    with pytest.raises(ConnectomeError, match=phrase):
        toy.index_of(bad)


def test_edge_arrays_are_the_edges(toy):
    src, dst, w = toy.edge_arrays()
    assert src.dtype == np.int64 and dst.dtype == np.int64 and w.shape == (7,)
    ids = toy.node_ids
    assert {(ids[s], ids[d]): float(x) for s, d, x in zip(src, dst, w)} == {(s, d): w for s, d, w in EDGES}
    for arr in (src, dst, w):
        assert not arr.flags.writeable


def test_node_attr_whole_and_by_layer(toy):
    np.testing.assert_array_equal(toy.node_attr("attribution"), np.arange(7) / 2)
    np.testing.assert_array_equal(toy.node_attr("attribution", layer="h"), [1.0, 1.5, 2.0])
    with pytest.raises(ConnectomeError, match="no node attribute 'nope'"):
        toy.node_attr("nope")
    with pytest.raises(ConnectomeError, match="no layer 'zzz'"):
        toy.node_attr("attribution", layer="zzz")


def test_edge_block_local_positions(toy):
    i, j, w = toy.edge_block("input", "h")
    assert sorted(zip(i.tolist(), j.tolist(), w.tolist())) == [(0, 0, 1.0), (1, 0, -2.0), (1, 2, 0.5)]
    assert toy.layer_pairs() == [("input", "h"), ("input", "logits"), ("h", "logits")]


def test_with_node_attrs_returns_new_graph(toy):
    col = np.ones(7)
    g2 = toy.with_node_attrs(community=col, attribution=np.zeros(7))
    assert g2 is not toy
    assert set(toy.node_attrs) == {"attribution"}
    np.testing.assert_array_equal(toy.node_attr("attribution"), np.arange(7) / 2)
    np.testing.assert_array_equal(g2.node_attr("attribution"), np.zeros(7))
    col[0] = 99.0  # the new graph holds a copy
    assert g2.node_attr("community")[0] == 1.0
    with pytest.raises(ConnectomeError, match="node attribute 'bad' has 3 values for 7 nodes"):
        toy.with_node_attrs(bad=np.ones(3))


def test_with_meta_and_labels_return_new_graphs(toy):
    g2 = toy.with_meta(category="cat").with_labels("h", ["a", "b", "c"])
    assert "category" not in toy.meta and g2.meta["category"] == "cat"
    assert toy.layer("h").labels is None and g2.layer("h").labels == ("a", "b", "c")


# ---------------------------------------------------------------------- bad construction
def test_edge_going_backwards_is_an_error():
    with pytest.raises(ConnectomeError, match="forward in layer order.*'h' to 'input'"):
        Connectome.from_edges(LAYERS, [("h:0", "input:1", 1.0)])


def test_edge_within_a_layer_is_an_error():
    with pytest.raises(ConnectomeError, match="forward in layer order"):
        Connectome.from_edges(LAYERS, [("h:0", "h:1", 1.0)])


def test_duplicate_edge_is_an_error():
    with pytest.raises(ConnectomeError, match="duplicate edge input:1 -> h:0"):
        Connectome.from_edges(LAYERS, [("input:1", "h:0", 1.0), ("input:0", "h:2", 1.0), ("input:1", "h:0", 2.0)])


def test_duplicate_layer_names_are_an_error():
    with pytest.raises(ConnectomeError, match="layer names must be unique.*'h'"):
        Connectome.from_edges([("input", "input", 1), ("h", "conv", 1), ("h", "conv", 2)])


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(node_units=[0, 1]), "node_units has 2 entries for 3 nodes"),
        (dict(src=[0], dst=[2], weight=[1.0, 2.0]), "one length"),
        (dict(src=[0], dst=[5], weight=[1.0]), r"node indices in \[0, 3\)"),
        (dict(weight=np.array(["a"])), "numeric"),
        (dict(meta={"f": object()}), "JSON-serialisable"),
        (dict(edge_attrs={"abs_weight": [1.0, 2.0]}), "'abs_weight' has 2 values for 1 edges"),
    ],
)
def test_inconsistent_arrays_are_errors(kwargs, phrase):
    base = dict(layers=[("input", "input", 2), ("fc", "linear", 1)], node_units=[0, 1, 0], src=[0], dst=[2], weight=[1.0])
    with pytest.raises(ConnectomeError, match=phrase):
        Connectome(**{**base, **kwargs})


def test_bad_layer_specs():
    with pytest.raises(ValueError, match="without ':'"):
        Layer("a:b", "conv", 1)
    with pytest.raises(ValueError, match="2 labels for 3 units"):
        Layer("out", "output", 3, labels=("a", "b"))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_edges_in_canonical_order_are_checked_like_any_other(data):
    """Edge arrays already sorted by (dst, src) skip the sort: they must still be refused for
    backward, out-of-range and duplicate edges, exactly when the same edges in another order are."""
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    n = sum(sizes)
    m = data.draw(st.integers(0, 12))
    src = np.array(data.draw(st.lists(st.integers(-1, n), min_size=m, max_size=m)), dtype=np.int64)
    dst = np.array(data.draw(st.lists(st.integers(-1, n), min_size=m, max_size=m)), dtype=np.int64)
    order = np.lexsort((src, dst))
    layers = [(f"l{i}", "conv", s) for i, s in enumerate(sizes)]
    units = np.concatenate([np.arange(s) for s in sizes])

    def build(idx):
        try:
            g = Connectome(layers=layers, node_units=units, src=src[idx], dst=dst[idx], weight=np.arange(m)[idx] * 1.0)
        except ConnectomeError as exc:
            return type(exc), str(exc).split(";")[0].split(" edge ")[0]
        return g.src.tolist(), g.dst.tolist(), g.weight.tolist()

    assert build(order) == build(order[::-1])


def test_canonical_edge_arrays_are_adopted_without_temporaries():
    """A graph handed read-only arrays in canonical order (as extraction and loading give)
    neither copies nor sorts them: no allocation the size of the edge arrays."""
    import tracemalloc

    a, b = 1000, 1000
    dst = np.repeat(np.arange(a, a + b, dtype=np.int64), a)
    src = np.tile(np.arange(a, dtype=np.int64), b)
    w = np.ones(a * b, dtype=np.float32)
    for arr in (src, dst, w):
        arr.setflags(write=False)
    tracemalloc.start()
    try:
        g = Connectome(layers=[("input", "input", a), ("fc", "linear", b)], node_units=np.r_[np.arange(a), np.arange(b)],
                       src=src, dst=dst, weight=w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert g.src is src or np.shares_memory(g.src, src)
    assert peak < 0.25 * src.nbytes, f"building the graph allocated {peak / src.nbytes:.2f}x the src array"


# ---------------------------------------------------------------------- immutability
def test_arrays_are_read_only(toy):
    g = toy.with_edge_attrs(abs_weight=np.abs(toy.weight))
    arrays = [g.node_units, g.src, g.dst, g.weight, g.node_ids, *g.node_attrs.values(), *g.edge_attrs.values()]
    for arr in arrays:
        assert not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.weight = np.zeros(7)  # type: ignore[misc]


def test_operations_leave_the_graph_unchanged(toy):
    before = Connectome.from_edges(LAYERS, EDGES, meta=toy.meta, node_attrs=toy.node_attrs)
    toy.prune(top_k=1)
    toy.subgraph(["h:0", "logits:0"])
    toy.contract(["input", "logits"])
    toy.with_meta(x=1)
    toy.to_networkx()
    assert toy.equals(before)


def test_graph_does_not_alias_caller_arrays():
    col = np.zeros(3)
    w = np.array([1.0, 2.0])
    g = Connectome(layers=[("input", "input", 2), ("fc", "linear", 1)], node_units=np.array([0, 1, 0]),
                   src=np.array([0, 1]), dst=np.array([2, 2]), weight=w, node_attrs={"x": col})
    col[0] = 7.0
    w[0] = 99.0
    assert g.node_attr("x")[0] == 0.0 and g.weight[0] == 1.0


# ---------------------------------------------------------------------- prune
def reference_prune(g: Connectome, top_k, threshold, mass, by="weight") -> dict[int, list[float]]:
    """Plain-Python prune: per target, the sorted |value|s of the kept incoming edges."""
    a = [abs(float(v)) for v in g.edge_attr(by)]
    incoming: dict[int, list[int]] = {}
    for e, d in enumerate(g.dst.tolist()):
        incoming.setdefault(d, []).append(e)
    kept: dict[int, list[float]] = {}
    for d, es in incoming.items():
        es = sorted(es, key=lambda e: -a[e])
        total = sum(a[e] for e in es)
        before = 0.0
        for rank, e in enumerate(es):
            ok = True
            if top_k is not None:
                ok &= rank < top_k
            if mass is not None:
                ok &= total > 0 and before < mass * total
            if threshold is not None:
                ok &= a[e] >= threshold
            before += a[e]
            if ok:
                kept.setdefault(d, []).append(a[e])
    return {d: sorted(v) for d, v in kept.items()}


def kept_by_target(g: Connectome, by="weight") -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for d, v in zip(g.dst.tolist(), np.abs(g.edge_attr(by)).tolist()):
        out.setdefault(d, []).append(v)
    return {d: sorted(v) for d, v in out.items()}


@st.composite
def integer_graphs(draw):
    # Integer weights and masses in eighths make every sum exact: no float ties at the mass boundary.
    sizes = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = random_layered(rng, sizes, p=0.7, skip=0.3, attrs=False)
    w = draw(st.lists(st.integers(-6, 6), min_size=g.num_edges, max_size=g.num_edges))
    return g.with_weight(np.asarray(w, dtype=np.float64)).with_edge_attrs(other=rng.integers(-3, 4, g.num_edges).astype(float))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    g=integer_graphs(),
    top_k=st.none() | st.integers(1, 4),
    threshold=st.none() | st.integers(0, 6).map(float),
    mass=st.none() | st.integers(1, 8).map(lambda k: k / 8),
    by=st.sampled_from(["weight", "other"]),
)
def test_prune_matches_reference(g, top_k, threshold, mass, by):
    if top_k is None and threshold is None and mass is None:
        top_k = 1
    p = g.prune(top_k=top_k, threshold=threshold, mass=mass, by=by)
    assert kept_by_target(p, by) == reference_prune(g, top_k, threshold, mass, by)
    # Same nodes; kept edges keep their values; meta records the criteria.
    assert p.node_ids.tolist() == g.node_ids.tolist()
    full = edge_dict(g)
    assert all(full[k] == v for k, v in edge_dict(p).items())
    assert p.meta["pruned"]["kept_edges"] == p.num_edges and p.meta["pruned"]["of_edges"] == g.num_edges
    assert p.meta["pruned"]["by"] == by


def test_prune_hand_example(toy):
    assert set(edge_dict(toy.prune(top_k=1))) == {("input:1", "h:0"), ("input:1", "h:2"), ("h:0", "logits:0"), ("input:0", "logits:1")}
    assert set(edge_dict(toy.prune(threshold=3.0))) == {("h:0", "logits:0"), ("input:0", "logits:1")}
    # logits:0 has |3| + |-1.5|: 0.6 of the mass needs only the first edge; 0.7 needs both.
    assert ("h:2", "logits:0") not in edge_dict(toy.prune(mass=0.6))
    assert ("h:2", "logits:0") in edge_dict(toy.prune(mass=0.7))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 0}, {"top_k": 1.5}, {"mass": 0.0}, {"mass": 1.5}])
def test_prune_bad_arguments(toy, kwargs):
    with pytest.raises(ValueError):
        toy.prune(**kwargs)


# ---------------------------------------------------------------------- subgraph
def test_subgraph_keeps_ids_attrs_and_labels(toy):
    ids = ["logits:1", "input:0", "h:1", "h:0"]
    s = toy.subgraph(ids)
    assert s.node_ids.tolist() == ["input:0", "h:0", "h:1", "logits:1"]
    assert s.layer_names == ["input", "h", "logits"]
    assert s.layer("logits").labels == ("dog",) and s.layer("h").size == 2
    assert edge_dict(s) == {k: v for k, v in edge_dict(toy).items() if k[0] in ids and k[1] in ids}
    np.testing.assert_array_equal(s.node_attr("attribution"), toy.node_attr("attribution")[toy.index_of(s.node_ids.tolist())])
    assert s.meta == toy.meta


def test_subgraph_drops_empty_layers(toy):
    s = toy.subgraph(["input:0", "logits:1"])
    assert s.layer_names == ["input", "logits"]
    assert edge_dict(s) == {("input:0", "logits:1"): 4.0}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), frac=st.floats(0.05, 1.0))
def test_subgraph_is_induced(seed, frac):
    rng = np.random.default_rng(seed)
    g = random_layered(rng, rng.integers(1, 6, size=4))
    ids = [i for i in g.node_ids.tolist() if rng.random() < frac] or [g.node_ids[0]]
    s = g.subgraph(ids)
    assert sorted(s.node_ids.tolist()) == sorted(ids)
    keep = set(ids)
    assert edge_dict(s) == {k: v for k, v in edge_dict(g).items() if k[0] in keep and k[1] in keep}


def test_subgraph_errors(toy):
    with pytest.raises(EmptyGraphError):
        toy.subgraph([])
    with pytest.raises(ConnectomeError, match="no node 'h:9'"):
        toy.subgraph(["h:9"])


def test_layer_subgraph(toy):
    s = toy.layer_subgraph(["logits", "input"])
    assert s.layer_names == ["input", "logits"]
    assert edge_dict(s) == {("input:0", "logits:1"): 4.0}
    with pytest.raises(ConnectomeError, match="no layer 'nope'"):
        toy.layer_subgraph(["nope"])
    with pytest.raises(EmptyGraphError):
        toy.layer_subgraph([])


# ---------------------------------------------------------------------- contract
def test_contract_chain_by_hand():
    # in(2) -> h(2) -> out(2), plus a skip in:0 -> out:0. Each h unit splits its flow over its
    # outputs in proportion to its outgoing edges.
    a, b, c = 1.0, 2.0, -0.5
    d0, d1, e0, e1, f = 3.0, 1.0, 0.5, 1.5, 0.7
    bias_h = np.array([0.4, -0.2])
    layers = [("input", "input", 2), ("h", "conv", 2), ("out", "output", 2)]
    edges = [("input:0", "h:0", a), ("input:1", "h:0", b), ("input:0", "h:1", c),
             ("h:0", "out:0", d0), ("h:0", "out:1", d1), ("h:1", "out:0", e0), ("h:1", "out:1", e1),
             ("input:0", "out:0", f)]
    bias = np.r_[0.0, 0.0, bias_h, 0.1, 0.2]
    g = Connectome.from_edges(layers, edges, node_attrs={"bias_attribution": bias})
    c_ = g.contract(["input", "out"])
    assert c_.layer_names == ["input", "out"]
    assert c_.meta["contracted_to"] == ["input", "out"]
    s0, s1 = d0 + d1, e0 + e1
    expected = {
        ("input:0", "out:0"): a * d0 / s0 + c * e0 / s1 + f,
        ("input:1", "out:0"): b * d0 / s0,
        ("input:0", "out:1"): a * d1 / s0 + c * e1 / s1,
        ("input:1", "out:1"): b * d1 / s0,
    }
    got = edge_dict(c_)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    # Bias of dropped units reaches the outputs in the same proportions.
    exp_bias = [0.1 + bias_h[0] * d0 / s0 + bias_h[1] * e0 / s1, 0.2 + bias_h[0] * d1 / s0 + bias_h[1] * e1 / s1]
    np.testing.assert_allclose(c_.node_attr("bias_attribution", "out"), exp_bias, rtol=1e-12)


def conserving(g: Connectome, rng: np.random.Generator) -> Connectome:
    """Give a layered graph the node attributes of an exact attribution graph."""
    n = g.num_nodes
    inflow = np.bincount(g.dst, g.weight, n)
    outflow = np.bincount(g.src, g.weight, n)
    last = g.layer_slice(g.layers[-1].name)
    bias = outflow - inflow
    bias[g.layer_slice(g.layers[0].name)] = 0.0
    bias[last] = rng.normal(size=last.stop - last.start)
    attribution = outflow.copy()
    attribution[last] = inflow[last] + bias[last]
    return g.with_node_attrs(attribution=attribution, bias_attribution=bias)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_layers=st.integers(3, 6), data=st.data())
def test_contract_conserves_flow(seed, n_layers, data):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n_layers)
    g = random_layered(rng, sizes, p=0.8, skip=0.2, positive=True, attrs=False)
    # Every hidden unit needs an outgoing edge to split its flow over.
    n = g.num_nodes
    out_deg = np.bincount(g.src, minlength=n)
    hidden = (g.node_layer > 0) & (g.node_layer < n_layers - 1)
    if np.any(out_deg[hidden] == 0) or np.any(out_deg[g.layer_slice("l0")] == 0):
        extra = [(g.node_ids[i], f"l{n_layers - 1}:0", 1.0) for i in np.flatnonzero(out_deg == 0) if g.node_layer[i] < n_layers - 1]
        have = edge_dict(g)
        edges = list(have.items())
        g = Connectome.from_edges([l for l in g.layers], [(s, d, w) for (s, d), w in edges] + extra)
    g = conserving(g, rng)
    inner = [f"l{i}" for i in range(1, n_layers - 1)]
    keep = data.draw(st.lists(st.sampled_from(inner), unique=True)) if inner else []
    c = g.contract(keep)
    assert c.layer_names == [l.name for l in g.layers if l.name in {"l0", f"l{n_layers - 1}", *keep}]
    n2 = c.num_nodes
    A, B = c.node_attr("attribution"), c.node_attr("bias_attribution")
    inflow = np.bincount(c.dst, c.weight, n2)
    outflow = np.bincount(c.src, c.weight, n2)
    scale = max(1.0, np.abs(g.weight).sum())
    first, last = c.layer_slice("l0"), c.layer_slice(f"l{n_layers - 1}")
    not_first = np.ones(n2, bool)
    not_first[first] = False
    not_last = np.ones(n2, bool)
    not_last[last] = False
    # Kept units keep their attribution; flow in (+ bias) and flow out both still equal it.
    np.testing.assert_array_equal(A, g.node_attr("attribution")[g.index_of(c.node_ids.tolist())])
    np.testing.assert_allclose((inflow + B)[not_first], A[not_first], atol=1e-9 * scale)
    np.testing.assert_allclose(outflow[not_last], A[not_last], atol=1e-9 * scale)
    # What reaches the last layer is unchanged, unit by unit, and so is the total of biases.
    old_in = np.bincount(g.dst, g.weight, g.num_nodes)[g.layer_slice(f"l{n_layers - 1}")]
    old_b = g.node_attr("bias_attribution", f"l{n_layers - 1}")
    np.testing.assert_allclose(inflow[last] + B[last], old_in + old_b, atol=1e-9 * scale)
    assert B.sum() == pytest.approx(g.node_attr("bias_attribution").sum(), abs=1e-9 * scale)


def test_contract_keeps_first_and_last_layers(toy):
    c = toy.contract([])
    assert c.layer_names == ["input", "logits"]
    with pytest.raises(ConnectomeError, match="no layer 'nope'"):
        toy.contract(["nope"])


# ---------------------------------------------------------------------- converters
@pytest.fixture
def rich() -> Connectome:
    rng = np.random.default_rng(3)
    g = random_layered(rng, [3, 4, 4, 2])
    g = g.with_edge_attrs(abs_weight=np.abs(g.weight) * 2)
    g = g.with_node_attrs(activation_mean=rng.normal(size=g.num_nodes), score=np.full(g.num_nodes, np.nan))
    return g.with_labels("l3", ["cat & <dog>", "ünï"]).with_meta(model="rand", n_images=3, nested={"a": [1, 2]})


def test_networkx_round_trip_is_exact(rich):
    G = rich.to_networkx()
    assert isinstance(G, nx.DiGraph)
    assert list(G.nodes) == rich.node_ids.tolist()
    assert G.number_of_edges() == rich.num_edges
    d = G.nodes["l3:0"]
    assert d["layer"] == "l3" and d["index"] == 0 and d["kind"] == "output" and d["label"] == "cat & <dog>"
    assert Connectome.from_networkx(G).equals(rich)


def test_networkx_round_trip_ignores_node_insertion_order(rich):
    G = rich.to_networkx()
    H = nx.DiGraph()
    H.graph.update(G.graph)
    nodes = list(G.nodes(data=True))
    for i in np.random.default_rng(0).permutation(len(nodes)):
        H.add_node(nodes[i][0], **nodes[i][1])
    H.add_edges_from(G.edges(data=True))
    assert Connectome.from_networkx(H).equals(rich)


def test_from_networkx_without_layer_spec():
    G = nx.DiGraph()
    G.add_edge("in:1", "out:0", weight=2.0)
    G.add_edge("in:0", "out:0", weight=-1.0)
    g = Connectome.from_networkx(G)
    assert g.layer_names == ["in", "out"]
    assert edge_dict(g) == {("in:1", "out:0"): 2.0, ("in:0", "out:0"): -1.0}
    G.add_node("bad")
    with pytest.raises(ConnectomeError, match="'<layer>:<unit>'"):
        Connectome.from_networkx(G)


@pytest.mark.parametrize("change", ["float32_weight", "int_attr", "bool_attr"])
def test_networkx_round_trip_keeps_dtypes(rich, change):
    if change == "float32_weight":
        g = rich.with_weight(rich.weight.astype(np.float32))
    elif change == "int_attr":
        g = rich.with_node_attrs(community=np.arange(rich.num_nodes) % 3)
    else:
        g = rich.with_node_attrs(flag=np.arange(rich.num_nodes) % 2 == 0)
    assert Connectome.from_networkx(g.to_networkx()).equals(g)


def test_to_igraph_order_and_attributes(rich):
    import json

    G = rich.to_igraph()
    assert G.is_directed() and G.vcount() == rich.num_nodes and G.ecount() == rich.num_edges
    assert G.vs["name"] == rich.node_ids.tolist()
    assert G.vs["layer"] == [rich.layers[i].name for i in rich.node_layer]
    assert G.vs["index"] == rich.node_units.tolist()
    assert G.vs["label"] == rich.node_labels.tolist()
    np.testing.assert_array_equal(G.vs["activation_mean"], rich.node_attr("activation_mean"))
    assert [e.tuple for e in G.es] == list(zip(rich.src.tolist(), rich.dst.tolist()))
    np.testing.assert_array_equal(G.es["weight"], np.abs(rich.weight))  # igraph wants weights >= 0
    np.testing.assert_array_equal(G.es["signed_weight"], rich.weight)
    np.testing.assert_array_equal(G.es["abs_weight"], rich.edge_attr("abs_weight"))
    assert json.loads(G["meta"]) == rich.meta
    assert [d["name"] for d in json.loads(G["layers"])] == rich.layer_names


def test_to_scipy(toy):
    m = toy.to_scipy()
    assert m.shape == (7, 7)
    assert m[toy.index_of("input:1"), toy.index_of("h:0")] == -2.0
    assert toy.to_scipy(absolute=True)[toy.index_of("input:1"), toy.index_of("h:0")] == 2.0


# ---------------------------------------------------------------------- repr, equals
def test_repr_content(toy):
    r = repr(toy.with_meta(n_images=5).with_edge_attrs(abs_weight=np.ones(7)))
    assert r.startswith("Connectome(7 units in 3 layers, 7 edges)")
    for piece in ("input", "conv", "output", "     3 units", "node attributes: attribution",
                  "edge attributes: abs_weight", "model=toy", "method=hand", "n_images=5"):
        assert piece in r


def test_repr_elides_long_layer_lists():
    layers = [("input", "input", 1)] + [(f"c{i}", "conv", 1) for i in range(20)]
    r = repr(Connectome.from_edges(layers))
    assert "... 10 more layers ..." in r
    assert "c0" in r and "c19" in r and "c10 " not in r


def test_equals(toy):
    assert toy.equals(toy)
    assert not toy.equals(toy.with_meta(x=1))
    assert not toy.equals(toy.with_weight(toy.weight + 1e-9))
    assert toy.equals(toy.with_weight(toy.weight + 1e-12), exact=False)
    assert not toy.equals("toy")


def _contract_by_paths(g: Connectome, keep: set[str]) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """Contraction by walking every path: a dropped unit passes each amount on as ``E_out / sum E_out``."""
    ids, layer_of = g.node_ids.tolist(), [g.layers[i].name for i in g.node_layer]
    out: dict[int, list[tuple[int, float]]] = {}
    for s, d, w in zip(g.src.tolist(), g.dst.tolist(), g.weight.tolist()):
        out.setdefault(s, []).append((d, w))
    total = {u: sum(w for _, w in es) for u, es in out.items()}
    edges: dict[tuple[str, str], float] = {}
    bias = {ids[i]: float(b) for i, b in enumerate(g.node_attr("bias_attribution")) if layer_of[i] in keep}

    def spread(u: int, amount: float, add) -> None:
        for d, w in out[u]:
            if layer_of[d] in keep:
                add(ids[d], amount * w / total[u])
            else:
                spread(d, amount * w / total[u], add)

    def to_edge(src: str):
        return lambda dst, v: edges.__setitem__((src, dst), edges.get((src, dst), 0.0) + v)

    for s, d, w in zip(g.src.tolist(), g.dst.tolist(), g.weight.tolist()):
        if layer_of[s] not in keep:
            continue
        if layer_of[d] in keep:
            to_edge(ids[s])(ids[d], w)
        else:
            spread(d, w, to_edge(ids[s]))
    for i, b in enumerate(g.node_attr("bias_attribution")):
        if layer_of[i] not in keep:
            spread(i, float(b), lambda dst, v: bias.__setitem__(dst, bias[dst] + v))
    return edges, bias


@pytest.mark.parametrize("keep", [["in", "out"], ["in", "h2", "out"], ["in", "h1", "out"]])
def test_contract_signed_flows_by_hand(keep):
    # Signed flows: h1:0 and h2:* send a negative total on, h1:0 and h2:* split it over edges of both signs.
    layers = [("in", "input", 2), ("h1", "conv", 2), ("h2", "conv", 2), ("out", "output", 2)]
    edges = [("in:0", "h1:0", 1.5), ("in:1", "h1:0", -2.0), ("in:1", "h1:1", 0.5),
             ("h1:0", "h2:0", 2.0), ("h1:0", "h2:1", -3.0), ("h1:1", "h2:1", -0.5), ("h1:1", "out:1", 1.5),
             ("h2:0", "out:0", -1.0), ("h2:0", "out:1", 0.25), ("h2:1", "out:0", 0.5), ("h2:1", "out:1", -2.0),
             ("in:0", "out:1", -0.7)]
    bias = np.array([0.0, 0.0, 0.3, -0.2, 0.1, 0.4, 0.05, -0.05])
    g = Connectome.from_edges(layers, edges, node_attrs={"bias_attribution": bias})
    c = g.contract(keep)
    expect, expect_bias = _contract_by_paths(g, set(keep))
    got = edge_dict(c)
    assert got.keys() == expect.keys()
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-14), k
    np.testing.assert_allclose(c.node_attr("bias_attribution"), [expect_bias[i] for i in c.node_ids], rtol=1e-12)
    if keep == ["in", "out"]:
        # one path sum written out: in:0 -> h1:0 (total -1) -> h2:0 (total -0.75) / h2:1 (total -1.5) -> out:0
        hand = 1.5 * (2.0 / -1.0 * (-1.0 / -0.75) + -3.0 / -1.0 * (0.5 / -1.5))
        assert got[("in:0", "out:0")] == pytest.approx(hand, rel=1e-12)


class _CountingName(str):
    """A layer name that counts its comparisons (to see how the duplicate check scales)."""

    compared = 0

    def __eq__(self, other):
        type(self).compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_duplicate_layer_check_is_linear():
    n = 2000
    layers = [Layer(_CountingName(f"l{i % (n // 2)}"), "conv", 0) for i in range(n)]
    _CountingName.compared = 0
    with pytest.raises(ConnectomeError, match="repeated: .*'l0'"):
        Connectome(layers=tuple(layers), node_units=[], src=[], dst=[], weight=[])
    assert _CountingName.compared < 10 * n  # names.count in a loop made it n**2 = 4,000,000


def test_sorted_duplicate_edges_are_refused():
    """Edges already in (dst, src) order skip the sort, not the duplicate check."""
    with pytest.raises(ConnectomeError, match="duplicate edge"):
        Connectome(layers=[("a", "input", 1), ("b", "conv", 1)], node_units=[0, 0], src=np.array([0, 0]),
                   dst=np.array([1, 1]), weight=np.array([1.0, 2.0]))


def test_shared_order_check_is_not_fooled_by_a_writeable_base():
    """Edge arrays found canonical are remembered by identity, so graphs that share them skip
    the check; a read-only view of memory the caller can still write must not be remembered:
    after the caller reorders the memory, a new graph on the same view is checked again."""
    layers = [Layer("input", "input", 2), Layer("h", "conv", 2)]
    src_mem = np.array([0, 1, 0], dtype=np.int64)
    dst_mem = np.array([2, 2, 3], dtype=np.int64)
    src, dst = src_mem.view(), dst_mem.view()
    src.setflags(write=False)
    dst.setflags(write=False)
    w = np.array([1.0, 2.0, 3.0])
    w.setflags(write=False)
    g1 = Connectome(layers=layers, node_units=np.array([0, 1, 0, 1]), src=src, dst=dst, weight=w)
    assert edge_dict(g1) == {("input:0", "h:0"): 1.0, ("input:1", "h:0"): 2.0, ("input:0", "h:1"): 3.0}
    from connectome.graph import is_canonical

    offsets = np.array([0, 2, 4])
    assert is_canonical(src, dst, offsets, remember=True)  # what extraction's skeleton asks
    src_mem[:] = [0, 0, 1]  # now (dst, src) order is broken: (2,0), (3,0), (2,1)
    dst_mem[:] = [2, 3, 2]
    assert not is_canonical(src, dst, offsets), "a view of writable memory must not be remembered"
    g2 = Connectome(layers=layers, node_units=np.array([0, 1, 0, 1]), src=src, dst=dst, weight=w)
    assert list(zip(g2.dst.tolist(), g2.src.tolist())) == [(2, 0), (2, 1), (3, 0)], "edges must be sorted again"
    assert edge_dict(g2) == {("input:0", "h:0"): 1.0, ("input:1", "h:0"): 3.0, ("input:0", "h:1"): 2.0}


def test_order_check_is_not_remembered_for_arrays_the_caller_owns():
    """Review finding: the owner of a read-only array can turn writing back on; a graph built
    on the caller's own arrays must check them again next time (only the library's own
    copies and skeletons are remembered)."""
    layers = [Layer("input", "input", 2), Layer("h", "conv", 1)]
    src = np.array([0, 1], dtype=np.int64)
    dst = np.array([2, 2], dtype=np.int64)
    w = np.array([1.0, 2.0])
    for a in (src, dst, w):
        a.setflags(write=False)
    Connectome(layers=layers, node_units=np.array([0, 1, 0]), src=src, dst=dst, weight=w)
    src.setflags(write=True)
    src[:] = [1, 0]
    src.setflags(write=False)
    g = Connectome(layers=layers, node_units=np.array([0, 1, 0]), src=src, dst=dst, weight=w)
    assert g.src.tolist() == [0, 1] and g.weight.tolist() == [2.0, 1.0], "the edges must be sorted again"


def test_graphs_sharing_edge_arrays_do_not_pile_up_finalizers():
    """Review finding: each graph sharing remembered arrays registered one more finalizer."""
    import weakref

    from connectome import graph as graph_mod

    g = random_layered(np.random.default_rng(0), [3, 4, 2])
    g.with_meta(a=0)
    before = len(weakref.finalize._registry)
    for i in range(200):
        g = g.with_meta(a=i)
        graph_mod._remember_canonical(g.src, g.dst, g._offsets)  # what every skeleton user does
    assert len(weakref.finalize._registry) - before < 5
