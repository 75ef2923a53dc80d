"""circuit, top_contributors, neuron_groups on graphs whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectome.analysis._toys import flow_graph, random_flow_graph, random_layered_graph, toy_attribution, toy_two_groups
from connectome.analysis.circuits import GroupGraph, circuit, neuron_groups, relative_depth, top_contributors
from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome

CAT_CIRCUIT = ["in:0", "in:1", "h1:0", "h1:1", "h2:0", "h2:1", "logits:0"]


@pytest.fixture
def cat() -> Connectome:
    return toy_attribution("cat")


# ---------------------------------------------------------------------- circuit
def test_toy_is_conserved(cat):
    a = cat.node_attrs["attribution"]
    # Completeness: input attribution plus bias terms is the logit total.
    assert a[cat.layer_slice("in")].sum() + cat.node_attrs["bias_attribution"].sum() == pytest.approx(10.0, rel=1e-12)
    assert a[cat.index_of("logits:0")] == pytest.approx(10.0, rel=1e-12)


def test_circuit_keeps_exactly_the_hand_worked_units(cat):
    c = circuit(cat, mass=0.8)
    assert c.node_ids.tolist() == CAT_CIRCUIT
    info = c.meta["circuit"]
    assert info["target"] == "logits:0" and info["target_label"] == "cat"
    assert info["sizes"] == {"in": 2, "h1": 2, "h2": 2, "logits": 1}
    assert info["mass"] == 0.8 and info["top_k"] is None
    assert info["coverage"] == pytest.approx({"h2": 0.9, "h1": 8 / 9, "in": 8.5 / 9}, rel=1e-12)
    assert info["depth"] == pytest.approx({"in": 0.0, "h1": 1 / 3, "h2": 2 / 3, "logits": 1.0})


def test_circuit_flow_into_target_holds_the_mass(cat):
    c = circuit(cat, mass=0.8)
    t = c.index_of("logits:0")
    kept_in = c.weight[c.dst == t].sum()
    total_in = cat.weight[cat.dst == cat.index_of("logits:0")].sum()
    assert kept_in >= 0.8 * total_in
    assert c.node_attrs["circuit_flow"][t] == pytest.approx(10.0)
    assert c.node_attrs["circuit_flow"][c.index_of("h1:0")] == pytest.approx(4.5)


def test_circuit_keeps_ids_edges_and_attributes(cat):
    c = circuit(cat)
    for s, d, w in zip(c.src, c.dst, c.weight):
        src, dst = c.node_ids[s], c.node_ids[d]
        m = (cat.src == cat.index_of(src)) & (cat.dst == cat.index_of(dst))
        assert cat.weight[m].tolist() == [w]
    np.testing.assert_array_equal(
        c.node_attrs["attribution"], cat.node_attrs["attribution"][cat.index_of(c.node_ids.tolist())]
    )
    assert c.meta["category"] == "cat"
    assert c.layer("logits").labels == ("cat",)


@pytest.mark.parametrize("target", [None, "logits:0", "cat", 0])
def test_target_forms_agree(cat, target):
    assert circuit(cat, target=target).node_ids.tolist() == CAT_CIRCUIT


def test_target_class_is_used_without_category():
    g = toy_attribution("dog")
    g = g._replace(meta={k: v for k, v in g.meta.items() if k != "category"})
    assert circuit(g).meta["circuit"]["target"] == "logits:1"


@pytest.mark.parametrize("tc", [float("inf"), float("-inf"), [1], "x", {"a": 1}])
def test_a_target_class_that_is_no_unit_number_falls_back_to_the_category(tc):
    """meta comes from files: inf there raised OverflowError out of report and compare."""
    g = toy_attribution("dog")
    assert circuit(g.with_meta(target_class=tc)).meta["circuit"]["target"] == "logits:1"  # 'dog' is unit 1
    from connectome.analysis.circuits import target_node

    assert target_node(g.with_meta(target_class=tc, category="cat"), None) == g.index_of("logits:0")


def test_mirror_category():
    c = circuit(toy_attribution("dog"), mass=0.8)
    assert c.node_ids.tolist() == ["in:1", "in:2", "h1:2", "h1:3", "h2:2", "h2:3", "logits:1"]


def test_unknown_target_names_examples(cat):
    with pytest.raises(ConnectomeError, match="logits:0"):
        circuit(cat, target="bird")
    with pytest.raises(ConnectomeError, match="output layer"):
        circuit(cat, target=7)


def test_no_default_target_asks_for_one():
    g = random_layered_graph([3, 4, 2])
    with pytest.raises(ConnectomeError, match="target="):
        circuit(g)


def test_target_without_flow_is_empty(cat):
    with pytest.raises(EmptyGraphError, match="logits:1"):
        circuit(cat, target="dog")


def test_top_k_per_layer(cat):
    c = circuit(cat, top_k=1)
    assert c.node_ids.tolist() == ["in:0", "h1:0", "h2:0", "logits:0"]
    assert c.meta["circuit"]["top_k"] == 1 and c.meta["circuit"]["mass"] is None


def test_mass_one_keeps_every_unit_with_flow(cat):
    c = circuit(cat, mass=1.0)
    assert set(c.node_ids.tolist()) == set(cat.node_ids.tolist()) - {"logits:1"}


def test_small_mass_keeps_the_strongest_only(cat):
    assert circuit(cat, mass=0.5).node_ids.tolist() == ["in:0", "h1:0", "h2:0", "logits:0"]


@pytest.mark.parametrize("kw", [{"mass": 0.0}, {"mass": 1.5}, {"top_k": 0}, {"top_k": 1.5}])
def test_bad_mass_or_top_k(cat, kw):
    with pytest.raises(ValueError):
        circuit(cat, **kw)


def test_skip_connections_are_followed():
    # in:2 feeds the logit directly (a residual path) with most of the flow.
    g = flow_graph(
        [("in", "input", 3), ("h", "linear", 2), ("logits", "output", 1)],
        [("in:2", "logits:0", 7.0), ("h:0", "logits:0", 3.0), ("in:0", "h:0", 3.0), ("in:1", "h:1", 1.0),
         ("h:1", "logits:0", 0.1)],
        meta={"target_class": 0},
    )
    c = circuit(g, mass=0.7)
    # h: h:0 holds 3 / 3.1 of the hidden flow; in: in:2 holds 7 / 10 of the input flow.
    assert c.node_ids.tolist() == ["in:2", "h:0", "logits:0"]
    c = circuit(g, mass=0.8)
    assert c.node_ids.tolist() == ["in:0", "in:2", "h:0", "logits:0"]


def test_weight_graph_uses_abs_weights():
    g = Connectome.from_edges(
        [("in", "input", 3), ("out", "output", 1)],
        [("in:0", "out:0", -5.0), ("in:1", "out:0", 1.0), ("in:2", "out:0", 0.5)],
        meta={"method": "weights"},
    )
    c = circuit(g, target="out:0", mass=0.75)  # 5 of 6.5
    assert c.node_ids.tolist() == ["in:0", "out:0"]
    assert c.weight.tolist() == [-5.0]


def test_relative_depth_of_a_circuit_is_the_source_graphs():
    g = flow_graph(
        [("in", "input", 2), ("h", "linear", 1), ("logits", "output", 2)],
        [("in:0", "logits:0", 5.0), ("in:1", "h:0", 0.1), ("h:0", "logits:1", 0.1)],
        meta={"target_class": 0},
    )
    c = circuit(g)
    assert c.layer_names == ["in", "logits"]  # no flow from the hidden layer into logits:0
    assert relative_depth(c) == {"in": 0.0, "logits": 1.0}
    assert c.meta["circuit"]["depth"] == {"in": 0.0, "logits": 1.0}
    d = relative_depth(circuit(g, target="logits:1"))
    assert d == {"in": 0.0, "h": 0.5, "logits": 1.0}
    # A graph without circuit meta: its own layer positions.
    assert relative_depth(c.with_meta(circuit=None)) == {"in": 0.0, "logits": 1.0}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4).map(lambda s: [*s, 3]),
    skip=st.sampled_from([0.0, 0.3]),
    mass=st.floats(0.05, 1.0),
)
def test_each_layer_keeps_the_smallest_set_holding_the_mass(seed, sizes, skip, mass):
    g = random_flow_graph(sizes, seed=seed, skip=skip)
    c = circuit(g, mass=mass)
    kept = np.zeros(g.num_nodes, dtype=bool)
    kept[g.index_of(c.node_ids.tolist())] = True
    flow = np.abs(g.weight)
    for li in range(len(g.layers) - 2, -1, -1):
        e = (g.node_layer[g.src] == li) & kept[g.dst]
        s = np.bincount(g.src[e], weights=flow[e], minlength=g.num_nodes)
        in_layer = g.node_layer == li
        total = s[in_layer].sum()
        held = s[in_layer & kept].sum()
        if total == 0:
            assert not (in_layer & kept).any()
            continue
        assert held >= mass * total * (1 - 1e-9)
        # Minimal: without its weakest kept unit the layer would fall short of the mass.
        weakest = s[in_layer & kept].min()
        assert held - weakest < mass * total * (1 + 1e-9)
        # Strongest first: no dropped candidate beats a kept one.
        dropped = s[in_layer & ~kept]
        assert dropped.max(initial=0.0) <= weakest
    if skip:
        return
    # Without skip connections the target keeps at least `mass` of its incoming flow (with
    # them, a skip input competes with the layer it skips over, see circuit's docstring).
    t = g.index_of("logits:0")
    into = g.dst == t
    assert flow[into & kept[g.src]].sum() >= mass * flow[into].sum() * (1 - 1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 8), min_size=2, max_size=4).map(lambda s: [*s, 3]),
    mass=st.floats(0.3, 1.0),
    budget=st.integers(2, 12),
)
def test_unit_budget_keeps_each_layers_strongest_within_the_cap(seed, sizes, mass, budget):
    g = random_flow_graph(sizes, seed=seed, skip=0.3)
    free, capped = circuit(g, mass=mass), circuit(g, mass=mass, max_units=budget)
    per_layer = max(1, (budget - 1) // (len(sizes) - 1))
    info = capped.meta["circuit"]
    assert info["max_units"] == budget
    for l in capped.layers[:-1]:
        assert l.size <= per_layer
    for name, wanted in info["capped"].items():
        assert capped.layer(name).size == per_layer < wanted
    if not info["capped"]:  # the budget trimmed nothing: the very same circuit
        assert capped.node_ids.tolist() == free.node_ids.tolist()
    # every kept unit is among the strongest candidates of its layer given the later kept units
    kept = np.zeros(g.num_nodes, dtype=bool)
    kept[g.index_of(capped.node_ids.tolist())] = True
    flow = np.abs(g.weight)
    for li in range(len(g.layers) - 2, -1, -1):
        e = (g.node_layer[g.src] == li) & kept[g.dst]
        sc = np.bincount(g.src[e], weights=flow[e], minlength=g.num_nodes)
        in_layer = g.node_layer == li
        if (in_layer & kept).any():
            assert sc[in_layer & ~kept].max(initial=0.0) <= sc[in_layer & kept].min()


def test_unit_budget_bad_values(cat):
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_units"):
            circuit(cat, max_units=bad)


# ---------------------------------------------------------------------- top_contributors
def test_top_contributors_default_is_top_class(cat):
    assert top_contributors(cat, k=3) == [("h2:0", 6.0), ("h2:1", 3.0), ("h2:2", 0.5)]
    assert top_contributors(toy_attribution("dog"), k=1) == [("h2:3", 6.0)]


def test_top_contributors_keeps_sign_and_orders_by_abs(cat):
    assert top_contributors(cat, "h1:1") == [("in:1", 4.0), ("in:2", -0.5)]


def test_top_contributors_is_circuits_first_step(cat):
    top = top_contributors(cat, "logits:0", k=2)
    assert [u for u, _ in top] == circuit(cat, top_k=2).node_ids[circuit(cat, top_k=2).layer_slice("h2")].tolist()


def test_top_contributors_negative_logit_and_skip():
    g = flow_graph(
        [("in", "input", 2), ("h", "linear", 1), ("logits", "output", 2)],
        [("in:0", "logits:1", -2.0), ("h:0", "logits:1", -1.0), ("in:1", "h:0", -1.0)],
    )
    # Only logits:1 carries attribution (-3): it is the top class although negative.
    assert top_contributors(g) == [("in:0", -2.0), ("h:0", -1.0)]


def test_top_contributors_bad_k(cat):
    with pytest.raises(ValueError):
        top_contributors(cat, k=0)


# ---------------------------------------------------------------------- neuron_groups
def test_neuron_groups_finds_the_two_pathways():
    g = toy_two_groups()
    gg = neuron_groups(g)
    assert isinstance(gg, GroupGraph)
    assert gg.graph.layer_names == g.layer_names
    assert [l.size for l in gg.graph.layers] == [2, 2, 2, 1]
    assert all(l.kind == "group" for l in gg.graph.layers)
    assert gg.members["h1:0"] == ["h1:0", "h1:1", "h1:2"]
    assert gg.members["h1:1"] == ["h1:3", "h1:4", "h1:5"]
    assert gg.members["h2:0"] == ["h2:0", "h2:1", "h2:2"]
    assert gg.members["in:1"] == ["in:2", "in:3"]
    # Groups are wired by summed flow: the pathways stay apart until the logit.
    w = {(gg.graph.node_ids[s], gg.graph.node_ids[d]): x for s, d, x in zip(gg.graph.src, gg.graph.dst, gg.graph.weight)}
    assert set(w) == {("in:0", "h1:0"), ("in:1", "h1:1"), ("h1:0", "h2:0"), ("h1:1", "h2:1"),
                      ("h2:0", "logits:0"), ("h2:1", "logits:0")}
    assert w[("h1:0", "h2:0")] == pytest.approx(9 * 1.1)


def test_group_graph_conserves_flow_and_attribution():
    c = circuit(random_flow_graph([5, 8, 8, 3], seed=3, skip=0.2), mass=0.9)
    gg = neuron_groups(c, max_groups_per_layer=3)
    assert gg.graph.weight.sum() == pytest.approx(c.weight.sum(), rel=1e-9)
    assert gg.graph.edge_attrs["abs_weight"].sum() == pytest.approx(np.abs(c.weight).sum(), rel=1e-9)
    assert gg.graph.node_attrs["attribution"].sum() == pytest.approx(c.node_attrs["attribution"].sum(), rel=1e-9)
    assert gg.graph.node_attrs["size"].sum() == c.num_nodes
    assert sorted(u for m in gg.members.values() for u in m) == sorted(c.node_ids.tolist())
    assert gg.membership.shape == (c.num_nodes,)
    for gi, uid in zip(gg.membership, c.node_ids):
        assert uid in gg.members[gg.graph.node_ids[gi]]
    assert max(l.size for l in gg.graph.layers) <= 3


def test_neuron_groups_fixed_number_and_homogeneous_layers(cat):
    gg = neuron_groups(toy_two_groups(), n_groups=1)
    assert [l.size for l in gg.graph.layers] == [1, 1, 1, 1]
    # The cat circuit's layers have two units whose profiles are alike: one group each.
    gg = neuron_groups(circuit(cat))
    assert [l.size for l in gg.graph.layers] == [1, 1, 1, 1]
    # At most n_groups: units with identical profiles are never split.
    gg = neuron_groups(toy_two_groups(), n_groups=3)
    assert [l.size for l in gg.graph.layers] == [2, 2, 2, 1]
    gg = neuron_groups(circuit(random_flow_graph([6, 8, 8, 2], seed=1), mass=1.0), n_groups=3)
    assert [l.size for l in gg.graph.layers][:-1] == [3, 3, 3]


def test_group_graph_repr():
    text = repr(neuron_groups(toy_two_groups()))
    assert text.startswith("GroupGraph(7 groups of 17 units in 4 layers")
    assert "h1" in text and "sizes 3, 3" in text


def test_neuron_groups_bad_arguments(cat):
    with pytest.raises(ValueError):
        neuron_groups(cat, n_groups=0)
    with pytest.raises(ValueError):
        neuron_groups(cat, max_groups_per_layer=0)


def test_top_k_keeps_no_unit_without_flow():
    # h:2 sends 0 to the target, h:3 only feeds the other logit; in:2 only feeds h:2 and h:3.
    g = flow_graph(
        [("in", "input", 3), ("h", "linear", 4), ("logits", "output", 2)],
        [("in:0", "h:0", 2.0), ("in:1", "h:1", -1.0), ("in:2", "h:2", 1.0), ("in:2", "h:3", 1.0),
         ("h:0", "logits:0", 2.0), ("h:1", "logits:0", -1.0), ("h:2", "logits:0", 0.0), ("h:3", "logits:1", 1.0)],
        meta={"target_class": 0},
    )
    assert g.weight[(g.src == g.index_of("h:2")) & (g.dst == g.index_of("logits:0"))].tolist() == [0.0]
    c = circuit(g, top_k=4)
    assert c.node_ids.tolist() == ["in:0", "in:1", "h:0", "h:1", "logits:0"]
    assert c.meta["circuit"]["sizes"] == {"in": 2, "h": 2, "logits": 1}
    assert (c.node_attr("circuit_flow") > 0).all()
    assert c.node_ids.tolist() == circuit(g, mass=1.0).node_ids.tolist()
