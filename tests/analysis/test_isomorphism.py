"""find_analogous: planted circuits are found, networkx agrees, searches end."""

from __future__ import annotations

import json
import time

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectome.analysis._toys import random_layered_graph, toy_attribution
from connectome.analysis.circuits import circuit
from connectome.analysis.isomorphism import Match, MatchList, _hard_deadline, _Timeout, find_analogous
from connectome.errors import ConnectomeError
from connectome.graph import Connectome

METHODS = ["lad", "vf2"]


def _plant(host: Connectome, pattern: Connectome, mapping: dict[str, str]) -> Connectome:
    """The host with the pattern's edges (and weights) written onto the mapped units."""
    edges = {(s, d): w for s, d, w in zip(host.node_ids[host.src].tolist(), host.node_ids[host.dst].tolist(), host.weight.tolist())}
    for s, d, w in zip(pattern.node_ids[pattern.src].tolist(), pattern.node_ids[pattern.dst].tolist(), pattern.weight.tolist()):
        edges[(mapping[s], mapping[d])] = w
    return Connectome.from_edges(host.layers, [(s, d, w) for (s, d), w in edges.items()], meta=host.meta)


def _planted_case(seed: int, rename: bool):
    """A 3-units-per-layer pattern planted at random units of a 5 x 12 random host."""
    rng = np.random.default_rng(seed)
    sizes = [12, 12, 12, 12, 4]
    host = random_layered_graph(sizes, p=0.12, seed=seed)
    p_sizes = [3, 3, 3, 3, 1]
    names = ["a", "b", "c", "d", "e"] if rename else host.layer_names
    pattern = random_layered_graph(p_sizes, p=0.7, seed=seed + 1000, names=names)
    # Every pattern unit wired, so the mapping is pinned down by edges and weights.
    mapping = {}
    for pl, hl, k, n in zip(names, host.layer_names, p_sizes, sizes):
        units = rng.permutation(n)[:k]
        mapping.update({f"{pl}:{u}": f"{hl}:{h}" for u, h in enumerate(units)})
    return pattern, _plant(host, pattern, mapping), mapping


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rename", [False, True], ids=["same-model", "other-model"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_circuit_is_found_with_its_mapping(method, rename, seed):
    pattern, host, mapping = _planted_case(seed, rename)
    matches = find_analogous(pattern, host, method=method, max_matches=None, time_budget=20)
    assert matches.complete and matches.stopped_by is None
    assert matches[0].mapping == mapping
    assert matches[0].score == pytest.approx(1.0, abs=1e-12)
    assert all(m.score < 1 - 1e-9 for m in matches[1:])


def test_lad_and_vf2_find_the_same_matches():
    pattern, host, _ = _planted_case(5, rename=True)
    a = find_analogous(pattern, host, method="lad", max_matches=None)
    b = find_analogous(pattern, host, method="vf2", max_matches=None)
    assert [(m.mapping, m.score) for m in a] == [(m.mapping, m.score) for m in b]


def _nx_mappings(pattern: Connectome, host: Connectome, induced: bool, signed: bool) -> set:
    H, P = host.to_networkx(), pattern.to_networkx()

    def node_match(h, p):
        return h["layer"] == p["layer"] and h["kind"] == p["kind"]

    def edge_match(h, p):
        return not signed or np.sign(h["signed_weight"]) == np.sign(p["signed_weight"])

    gm = nx.algorithms.isomorphism.DiGraphMatcher(H, P, node_match=node_match, edge_match=edge_match)
    it = gm.subgraph_isomorphisms_iter() if induced else gm.subgraph_monomorphisms_iter()
    return {frozenset((p, h) for h, p in m.items()) for m in it}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("induced", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_all_matches_agree_with_networkx(seed, induced, signed):
    host = random_layered_graph([5, 5, 5, 3], p=0.45, seed=seed)
    pattern = random_layered_graph([2, 2, 2, 1], p=0.6, seed=seed + 50)
    expected = _nx_mappings(pattern, host, induced, signed)
    for method in METHODS:
        found = find_analogous(pattern, host, method=method, max_matches=None, time_budget=30,
                               require_sign=signed, induced=induced)
        assert found.complete
        got = {frozenset(m.mapping.items()) for m in found}
        assert got == expected, method
        assert len(found) == len(got)  # no duplicates


def test_sign_constraint_blocks_flipped_weights():
    cat = toy_attribution("cat")
    flipped = circuit(cat).with_weight(-np.asarray(circuit(cat).weight))
    for method in METHODS:
        assert find_analogous(flipped, cat, method=method) == []
        unsigned = find_analogous(flipped, cat, method=method, require_sign=False)
        assert len(unsigned) > 0
        # The same units, with opposite weights: cosine -1.
        assert unsigned[-1].score == pytest.approx(-1.0)
        assert unsigned[-1].n_same == 7


def test_the_same_circuit_maps_onto_itself():
    cat = toy_attribution("cat")
    c = circuit(cat)
    for method in METHODS:
        best = find_analogous(c, cat, method=method)[0]
        assert best.n_same == c.num_nodes and best.score == pytest.approx(1.0)


def test_mirrored_category_is_an_analogous_circuit():
    best = find_analogous(circuit(toy_attribution("cat")), toy_attribution("dog"))[0]
    assert best.mapping == {"in:0": "in:2", "in:1": "in:1", "h1:0": "h1:3", "h1:1": "h1:2",
                            "h2:0": "h2:3", "h2:1": "h2:2", "logits:0": "logits:1"}
    assert best.n_same == 1


def _dense_case(width: int = 12, depth: int = 6):
    """Complete layered host (width^depth paths) and a one-unit-per-layer path pattern."""
    host = random_layered_graph([width] * depth, p=1.0, seed=0)
    host = host.with_weight(np.abs(host.weight) + 0.1)
    pattern = random_layered_graph([1] * depth, p=1.0, seed=1)
    pattern = pattern.with_weight(np.abs(pattern.weight) + 0.1)
    return pattern, host


@pytest.mark.parametrize("method", METHODS)
def test_max_matches_ends_the_search(method):
    pattern, host = _dense_case()
    found = find_analogous(pattern, host, method=method, max_matches=5, time_budget=None)
    assert isinstance(found, MatchList) and len(found) == 5
    assert not found.complete and found.stopped_by == "max_matches"
    scores = [m.score for m in found]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("method", METHODS)
def test_max_candidates_ranks_more_embeddings(method):
    pattern, host = _dense_case(width=6, depth=4)
    everything = find_analogous(pattern, host, method=method, max_matches=None)
    assert everything.complete and len(everything) == 6**4
    few = find_analogous(pattern, host, method=method, max_matches=3)
    many = find_analogous(pattern, host, method=method, max_matches=3, max_candidates=6**4)
    assert many.complete and many.stopped_by is None
    assert [m.mapping for m in many] == [m.mapping for m in everything[:3]]
    assert few.stopped_by == "max_matches" and few[0].score <= many[0].score
    part = find_analogous(pattern, host, method=method, max_matches=3, max_candidates=20)
    assert len(part) == 3 and part.stopped_by == "max_candidates" and not part.complete
    with pytest.raises(ValueError, match="at least max_matches"):
        find_analogous(pattern, host, method=method, max_matches=3, max_candidates=2)


@pytest.mark.parametrize("method", METHODS)
def test_time_budget_ends_the_search_with_a_warning(method):
    pattern, host = _dense_case()
    with pytest.warns(RuntimeWarning, match="time budget"):
        found = find_analogous(pattern, host, method=method, max_matches=5, max_candidates=10**9, time_budget=0.3)
    assert not found.complete and found.stopped_by == "time_budget"  # (no timed assertion: speed is benchmarked)
    assert 1 <= len(found) <= 5  # as many as the budget allowed, at most max_matches


@pytest.mark.parametrize("method", METHODS)
def test_a_deep_pattern_without_placement_is_refuted_not_timed_out(method):
    # A 12-layer path in a complete host of width 8 whose edges into layer h9 are all
    # negative: VF2 alone tries the 8^8 partial placements that reach h8 before giving up.
    # Narrowing each unit's candidates to those that can carry its edges proves at once
    # that no placement exists.
    pattern, host = _dense_case(width=8, depth=12)
    into9 = host.node_layer[host.dst] == host.layer_position("h9")
    host = host.with_weight(np.where(into9, -host.weight, host.weight))
    found = find_analogous(pattern, host, method=method, max_matches=5, time_budget=3.0)
    assert found.complete and found.stopped_by is None and len(found) == 0
    # one edge of the right sign: every placement goes through it
    one = into9 & (host.src == host.index_of("h8:2")) & (host.dst == host.index_of("h9:4"))
    found = find_analogous(pattern, host.with_weight(np.where(one, -host.weight, host.weight)), method=method,
                           max_matches=5, time_budget=3.0)
    assert len(found) == 5 and all(m.mapping["h8:0"] == "h8:2" and m.mapping["h9:0"] == "h9:4" for m in found)


def test_hard_deadline_interrupts_igraph():
    pattern, host = _dense_case(width=20)
    H, P = host.to_igraph(), pattern.to_igraph()
    with pytest.raises(_Timeout):
        with _hard_deadline(time.monotonic() + 0.2):
            H.get_subisomorphisms_lad(P)  # 20^6 embeddings: would run for minutes


def test_pattern_larger_than_host_errors():
    small = random_layered_graph([2, 2, 1], p=1.0, seed=0)
    big = random_layered_graph([4, 4, 2], p=1.0, seed=0)
    with pytest.raises(ConnectomeError, match="larger than the host"):
        find_analogous(big, small)


def test_depth_correspondence_across_models():
    # A 3-layer pattern in a 5-layer host: its middle layer sits at depth 0.5 = host h2.
    host = random_layered_graph([4, 4, 4, 4, 2], p=0.0, seed=0)
    pattern = Connectome.from_edges(
        [("x", "input", 1), ("y", "linear", 1), ("z", "output", 1)], [("x:0", "y:0", 1.0), ("y:0", "z:0", 2.0)]
    )
    mapping = {"x:0": "in:3", "y:0": "h2:1", "z:0": "out:0"}
    host = _plant(host, pattern, mapping)
    found = find_analogous(pattern, host, max_matches=None)
    assert [m.mapping for m in found] == [mapping]
    # Layer kinds must agree unless told otherwise.
    other_kind = Connectome.from_edges(
        [("x", "input", 1), ("y", "conv", 1), ("z", "output", 1)], [("x:0", "y:0", 1.0), ("y:0", "z:0", 2.0)]
    )
    with pytest.warns(UserWarning, match="no corresponding host layer"):
        assert find_analogous(other_kind, host) == []
    assert [m.mapping for m in find_analogous(other_kind, host, same_kind=False)] == [mapping]


def test_match_repr_and_dict():
    found = find_analogous(circuit(toy_attribution("cat")), toy_attribution("dog"))
    assert repr(found).startswith("MatchList(4 matches, vf2, complete search")
    m = found[0]
    assert isinstance(m, Match)
    assert repr(m).startswith("Match(score=1.000, 7 units: in:0->in:2")
    json.dumps(m.to_dict(), allow_nan=False)


@pytest.mark.parametrize("kw", [{"method": "ullmann"}, {"max_matches": 0}, {"time_budget": 0}, {"layer_match": "x"}])
def test_bad_arguments(kw):
    g = toy_attribution("cat")
    with pytest.raises(ValueError):
        find_analogous(circuit(g), g, **kw)


def _relabel(g: Connectome, perms: dict[str, np.ndarray]) -> tuple[Connectome, dict[str, str]]:
    """The same graph with the units of each layer renumbered by ``perms``."""
    new_id = {}
    for l in g.layers:
        for u in range(l.size):
            new_id[f"{l.name}:{u}"] = f"{l.name}:{int(perms[l.name][u])}"
    ids = g.node_ids.tolist()
    edges = [(new_id[ids[s]], new_id[ids[d]], w) for s, d, w in zip(g.src.tolist(), g.dst.tolist(), g.weight.tolist())]
    return Connectome.from_edges(g.layers, edges, meta=g.meta), new_id


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(METHODS))
def test_matches_are_permutation_equivariant(seed, method):
    rng = np.random.default_rng(seed)
    host = random_layered_graph([4, 5, 4, 2], p=0.5, seed=seed)
    pattern = random_layered_graph([2, 2, 2, 1], p=0.7, seed=seed + 1)
    moved, new_id = _relabel(host, {l.name: rng.permutation(l.size) for l in host.layers})
    before = find_analogous(pattern, host, method=method, max_matches=None)
    after = find_analogous(pattern, moved, method=method, max_matches=None)
    assert before.complete and after.complete
    expected = {frozenset((p, new_id[h]) for p, h in m.mapping.items()) for m in before}
    assert {frozenset(m.mapping.items()) for m in after} == expected
    assert sorted(m.score for m in after) == pytest.approx(sorted(m.score for m in before))
