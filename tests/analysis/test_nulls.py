from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectome.analysis.communities import communities
from connectome.analysis.nulls import (
    MOTIFS,
    ROLE_THRESHOLDS,
    Significance,
    hub_roles,
    motif_counts,
    null_models,
    rich_club,
    significance,
)
from connectome.errors import ConnectomeError
from connectome.graph import Connectome, Layer


def layered(sizes=(5, 8, 8, 6, 4), p=0.35, skip=0.1, seed=0) -> Connectome:
    rng = np.random.default_rng(seed)
    off = np.r_[0, np.cumsum(sizes)]
    src, dst = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lj in range(1, len(sizes)):
        for li in range(lj):
            m = rng.random((sizes[li], sizes[lj])) < (p if li == lj - 1 else skip)
            i, j = np.nonzero(m)
            src.append(i + off[li])
            dst.append(j + off[lj])
    src, dst = np.concatenate(src), np.concatenate(dst)
    w = rng.normal(size=src.size)
    layers = tuple(Layer(f"l{i}", "conv", s) for i, s in enumerate(sizes))
    return Connectome(layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]),
                      src=src, dst=dst, weight=w, edge_attrs={"abs_weight": np.abs(w)},
                      node_attrs={"attribution": rng.normal(size=off[-1])}, meta={"model": "toy"})


@pytest.fixture(scope="module")
def g() -> Connectome:
    return layered()


def blocks(g: Connectome) -> np.ndarray:
    return g.node_layer[g.src] * len(g.layers) + g.node_layer[g.dst]


def degrees(g: Connectome):
    n = g.num_nodes
    return np.bincount(g.src, minlength=n), np.bincount(g.dst, minlength=n)


def edge_keys(g: Connectome) -> set:
    return set(zip(g.src.tolist(), g.dst.tolist()))


# ----------------------------------------------------------------------- shuffle
def test_shuffle_keeps_topology_and_each_blocks_weights(g):
    hs = null_models(g, "shuffle", n=3, seed=1)
    assert len(hs) == 3
    for h in hs:
        np.testing.assert_array_equal(h.src, g.src)
        np.testing.assert_array_equal(h.dst, g.dst)
        assert not np.array_equal(h.weight, g.weight)
        for b in np.unique(blocks(g)):
            m = blocks(g) == b
            assert sorted(h.weight[m]) == sorted(g.weight[m])
        np.testing.assert_array_equal(h.edge_attrs["abs_weight"], np.abs(h.weight))  # columns travel together
        np.testing.assert_array_equal(h.node_attrs["attribution"], g.node_attrs["attribution"])
        assert h.meta["model"] == "toy" and h.meta["null_model"]["kind"] == "shuffle"


# ----------------------------------------------------------------------- rewire
def check_rewired(g: Connectome, h: Connectome) -> None:
    for a, b in zip(degrees(g), degrees(h)):
        np.testing.assert_array_equal(a, b)  # every unit keeps in- and out-degree
    assert np.all(g.node_layer[h.src] < g.node_layer[h.dst])  # still forward: a DAG
    assert len(edge_keys(h)) == h.num_edges  # no duplicate edge
    # every edge keeps its source, weight and layer pair
    key = lambda x: Counter(zip(x.src.tolist(), x.weight.tolist(), blocks(x).tolist()))
    assert key(g) == key(h)
    np.testing.assert_array_equal(h.edge_attrs["abs_weight"], np.abs(h.weight))


def test_rewire_keeps_degrees_blocks_and_dag_and_changes_edges(g):
    for h in null_models(g, "rewire", n=3, seed=2):
        check_rewired(g, h)
        changed = 1 - len(edge_keys(g) & edge_keys(h)) / g.num_edges
        assert changed > 0.3
        assert h.meta["null_model"]["kind"] == "rewire"


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    p=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**16),
)
def test_rewire_invariants_on_random_layered_graphs(sizes, p, seed):
    g = layered(tuple(sizes), p=p, skip=p / 2, seed=seed)
    for h in null_models(g, "rewire", n=2, seed=seed, swaps_per_edge=3):
        check_rewired(g, h)


def test_complete_blocks_cannot_rewire():
    g = layered((3, 4), p=1.0)
    (h,) = null_models(g, "rewire", n=1)
    assert edge_keys(h) == edge_keys(g)


def test_null_models_are_seeded_and_prefix_stable(g):
    for kind in ("shuffle", "rewire"):
        a = null_models(g, kind, n=2, seed=5)
        b = null_models(g, kind, n=3, seed=5)
        c = null_models(g, kind, n=1, seed=6)
        for x, y in zip(a, b):
            assert x.equals(y)
        assert not a[0].equals(c[0])


def test_null_model_errors(g):
    with pytest.raises(ValueError, match="kind"):
        null_models(g, "erdos")
    with pytest.raises(ValueError, match="n must"):
        null_models(g, n=0)
    with pytest.raises(ValueError, match="at least|n >= 2"):
        significance(g, n=1)
    with pytest.raises(ValueError, match="valid measures"):
        significance(g, n=2, measures=["assortativity"])


# ----------------------------------------------------------------------- motifs, rich club
def closed_form_motifs(g: Connectome) -> dict[str, int]:
    """Induced 3-unit motif counts of a DAG from degrees and matrix products."""
    from scipy import sparse

    n = g.num_nodes
    A = sparse.csr_matrix((np.ones(g.num_edges), (g.src, g.dst)), shape=(n, n))
    two_paths = A @ A
    ffl = int(two_paths.multiply(A).sum())
    out_d, in_d = degrees(g)
    return {
        "fan_in": int((in_d * (in_d - 1) // 2).sum()) - ffl,
        "fan_out": int((out_d * (out_d - 1) // 2).sum()) - ffl,
        "chain": int(two_paths.sum()) - ffl,
        "feed_forward_loop": ffl,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motif_counts_match_closed_form(seed):
    g = layered(seed=seed)
    counts = motif_counts(g)
    assert list(counts) == list(MOTIFS)
    assert counts == closed_form_motifs(g)


def test_motif_counts_by_hand():
    g = Connectome.from_edges(
        [("a", "input", 1), ("b", "conv", 2), ("c", "output", 1)],
        [("a:0", "b:0", 1.0), ("a:0", "b:1", 1.0), ("b:0", "c:0", 1.0), ("b:1", "c:0", 1.0), ("a:0", "c:0", 1.0)],
    )
    # diamond a -> b0, b1 -> c plus the shortcut a -> c: triples {a, b0, b1} fan out,
    # {b0, b1, c} fan in, {a, b0, c} and {a, b1, c} are feed-forward loops
    assert motif_counts(g) == {"fan_in": 1, "fan_out": 1, "chain": 0, "feed_forward_loop": 2}
    assert motif_counts(Connectome.from_edges([("a", "input", 2)])) == dict.fromkeys(MOTIFS, 0)


def test_rich_club_by_hand():
    g = Connectome.from_edges(
        [("a", "input", 2), ("b", "conv", 2), ("c", "output", 2)],
        [("a:0", "b:0", 4.0), ("a:0", "b:1", 1.0), ("a:1", "b:0", 2.0), ("b:0", "c:0", -3.0), ("b:0", "c:1", 0.5)],
    )
    # degrees a0 2, a1 1, b0 4, b1 1, c0 1, c1 1 -> rich (> 1): a0, b0, one edge of |w| 4 = the strongest
    assert rich_club(g, k=1) == 1.0
    assert rich_club(g, k=1, weighted=False) == 1.0
    # > 0: all six units; 5 edges of 15 pairs, and every edge counts
    assert rich_club(g, k=0, weighted=False) == pytest.approx(5 / 15)
    assert rich_club(g, k=0) == 1.0
    assert np.isnan(rich_club(g, k=3))  # a single rich unit


def test_rich_club_weighted_ratio():
    g = Connectome.from_edges(
        [("a", "input", 2), ("b", "output", 3)],
        [("a:0", "b:0", 1.0), ("a:0", "b:1", 1.0), ("a:1", "b:1", 5.0), ("a:1", "b:2", 1.0), ("a:0", "b:2", 2.0)],
    )
    # degrees a0 3, a1 2, b0 1, b1 2, b2 2: rich (> 1) = a0, a1, b1, b2 with edges |w| 1, 5, 1, 2 (sum 9);
    # the 4 strongest in the graph are 5, 2, 1, 1 (sum 9)
    assert rich_club(g, k=1) == pytest.approx(1.0)
    assert rich_club(g.with_weight([1.0, 1.0, 5.0, 1.0, 0.5]), k=1) == pytest.approx(7.5 / 8.0)


# ----------------------------------------------------------------------- significance
def test_significance_against_rewired_nulls(g):
    s = significance(g, n=6, kind="rewire", seed=0)
    assert isinstance(s, Significance)
    assert [x.name for x in s] == ["modularity", "rich_club", *MOTIFS]
    for x in s:
        assert np.isfinite([x.observed, x.null_mean, x.null_std, x.z]).all(), x
        assert x.null_values.shape == (6,)
        if x.null_std > 0:
            assert x.z == pytest.approx((x.observed - x.null_mean) / x.null_std)
    assert s["modularity"].observed == pytest.approx(communities(g).quality)
    assert s["fan_in"].observed == motif_counts(g)["fan_in"]
    r = repr(s)
    assert "rewire" in r and "feed_forward_loop" in r


def test_shuffle_keeps_motifs_exactly(g):
    s = significance(g, n=3, kind="shuffle", measures=["motifs", "rich_club"])
    for name in MOTIFS:
        assert s[name].null_std == 0 and s[name].z == 0.0
    assert np.isfinite(s.z["rich_club"])
    with pytest.raises(KeyError):
        s["modularity"]


# ----------------------------------------------------------------------- hub roles
def test_participation_zero_when_all_edges_stay_home():
    g = Connectome.from_edges(
        [("a", "input", 2), ("b", "output", 2)],
        [("a:0", "b:0", 1.0), ("a:1", "b:1", 2.0), ("a:1", "b:0", -0.5)],
    )
    r = hub_roles(g, [0, 1, 0, 1])
    assert r["participation"][0] == 0.0  # a:0 -> b:0 only, both community 0
    assert r["participation"][3] == 0.0  # b:1 <- a:1 only, both community 1
    assert r["participation"][2] > 0  # b:0 is fed from both communities


def test_hub_roles_by_hand():
    # community 0: a:0 wired to b:0..b:8; community 1: a:1 -> b:9, plus a:1 -> b:0 across
    edges = [("a:0", f"b:{j}", 1.0) for j in range(9)] + [("a:1", "b:9", 1.0), ("a:1", "b:0", 1.0)]
    g = Connectome.from_edges([("a", "input", 2), ("b", "output", 10)], edges)
    memb = np.array([0, 1] + [0] * 9 + [1])
    r = hub_roles(g, memb)
    own = np.array([9, 1] + [1] * 9 + [1.0])
    np.testing.assert_allclose(r["within_module_strength"], own)
    # community 0 = a:0 and b:0..b:8 with kappa 9, 1 x 9: mean 1.8, std 2.4
    assert r["within_module_z"][0] == pytest.approx((9 - 1.8) / 2.4)
    assert r["within_module_z"][2] == pytest.approx((1 - 1.8) / 2.4)
    assert r["within_module_z"][1] == 0.0  # community 1: a:1 has 1 inside, b:9 has 1: no spread
    # participation: a:1 has one edge home (b:9) and one out (b:0): 1 - (1/2^2 + 1/2^2)
    assert r["participation"][1] == pytest.approx(0.5)
    assert r["participation"][2] == pytest.approx(1 - (1 / 2) ** 2 - (1 / 2) ** 2)  # b:0
    assert r["participation"][0] == 0.0
    assert r["role"][0] == "provincial hub"  # z = 3 >= 2.5, P = 0
    assert set(r["role"][1:]) == {"peripheral"}
    assert ROLE_THRESHOLDS["hub_z"] == 2.5


def test_hub_roles_accept_a_partition_and_label_every_unit(g):
    p = communities(g)
    r = hub_roles(g, p)
    for k in ("within_module_strength", "within_module_z", "participation", "role"):
        assert r[k].shape == (g.num_nodes,)
    assert np.all((r["participation"] >= 0) & (r["participation"] <= 1))
    assert np.isfinite(r["within_module_z"]).all()
    assert set(r["role"]) <= {"connector hub", "provincial hub", "connector", "peripheral"}
    with pytest.raises(ConnectomeError, match="shape"):
        hub_roles(g, p.membership[:-1])


def test_significance_z_against_the_null_values_themselves(g):
    s = significance(g, n=5, kind="rewire", seed=3, measures=["rich_club", "motifs"])
    nulls = null_models(g, "rewire", n=5, seed=3)
    spread = 0
    for x in s:
        # the null values are the measure on the null models (not derived from the summary)
        expect = [rich_club(h, s.rich_club_k) if x.name == "rich_club" else motif_counts(h)[x.name] for h in nulls]
        np.testing.assert_allclose(x.null_values, expect, rtol=1e-12, err_msg=x.name)
        assert x.null_mean == pytest.approx(np.mean(expect), rel=1e-12)
        assert x.null_std == pytest.approx(np.std(expect, ddof=1), rel=1e-12)  # the sample std, as documented
        if x.null_std > 0:
            spread += 1
            assert x.z == pytest.approx((x.observed - np.mean(expect)) / np.std(expect, ddof=1), rel=1e-12)
    assert spread >= 2  # else ddof would not matter
