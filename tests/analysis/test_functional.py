"""Functional connectivity and structure-function coupling: known answers.

Copies correlate 1, independent noise stays inside the 99% interval of 0, the streaming
moments equal ``numpy.corrcoef`` (and ``scipy.stats.spearmanr``) on stored activations,
partial correlation matches the 3-variable formula, processes give the result of one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from scipy.stats import spearmanr

import connectome as cn
from connectome import analysis
from connectome.analysis.functional import coupling, functional_connectivity
from connectome.errors import ConnectomeError, DataError


class Copies(nn.Module):
    """input(6) -> hidden(4) -> logits(2), linear: hidden:0 and hidden:1 are both x0 + x1,
    hidden:2 is x2 and hidden:3 is x5, a noise input that nothing else reads."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 4)
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            w = torch.zeros(4, 6)
            w[0, :2] = 1.0
            w[1, :2] = 1.0
            w[2, 2] = 1.0
            w[3, 5] = 1.0
            self.hidden.weight.copy_(w)
            self.hidden.bias.zero_()
            self.out.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


class Tiny(nn.Module):
    """conv-BN-ReLU, a residual conv, max pooling, linear (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.conv2(h))
        return self.fc(torch.flatten(self.pool(h), 1))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = Tiny().double().eval()
    with torch.no_grad():
        m.bn1.running_mean.normal_()
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def _stored(m: Tiny, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each layer's pooled activations, computed by hand in float64 and stored (a unit's value
    is the one it passes on, as in ``cn.extract.activations``: conv2's after the max pool)."""
    with torch.no_grad():
        h1 = m.relu(m.bn1(m.conv1(x)))
        h2 = m.relu(m.conv2(h1))
        out = m.fc(torch.flatten(m.pool(h2), 1))
    return {"input": x.mean((2, 3)).numpy(), "conv1": h1.mean((2, 3)).numpy(), "conv2": m.pool(h2).mean((2, 3)).numpy(),
            "logits": out.numpy()}


def _images(n: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _fc(model, data, **kw):
    return functional_connectivity(model, data, device="cpu", **kw)


# ----------------------------------------------------------------------------- known answers
def test_copies_correlate_one_and_noise_stays_in_the_99_percent_interval():
    n = 400
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(3))
    fc = _fc(Copies().eval(), x, fdr=None, batch_size=32)
    h = fc.matrix("hidden")
    assert h[0, 1] == pytest.approx(1.0, abs=1e-6)
    # hidden:3 reads only the noise input: each of its correlations inside the 99% interval of 0
    bound = math.tanh(2.5758 / math.sqrt(n - 3))
    assert np.all(np.abs(h[3, :3]) < bound)
    assert np.all(np.abs(fc.matrix("hidden", "logits")[3]) < bound)
    # logits:0 = hidden:0 + hidden:2; logits:1 = hidden:1 (a copy of hidden:0)
    assert fc.matrix("hidden", "logits")[1, 1] == pytest.approx(1.0, abs=1e-6)
    # with the FDR threshold the copy pair stays; the noise unit's pairs go
    kept = _fc(Copies().eval(), x, fdr=0.01, batch_size=32)
    w = kept.within["hidden"]
    pairs = set(zip(w["src"].tolist(), w["dst"].tolist()))
    assert (0, 1) in pairs
    assert not any(3 in p for p in pairs)


def test_streaming_moments_equal_numpy_corrcoef_on_stored_activations():
    model, x = _tiny(), _images()
    fc = _fc(model, x, fdr=None, batch_size=5)  # 8 batches, the last of 2 images
    acts = _stored(model, x)
    names = list(acts)
    assert fc.graph.layer_names == names
    for a, b in [(l, l) for l in names] + list(zip(names[:-1], names[1:])):
        A, B = acts[a], acts[b]
        want = np.corrcoef(np.concatenate([A, B], 1), rowvar=False)[: A.shape[1], A.shape[1]:]
        live = np.outer(A.std(0) > 0, B.std(0) > 0)
        np.testing.assert_allclose(fc.matrix(a, b)[live], want[live], rtol=1e-10, atol=1e-12)
        assert np.all(np.isnan(fc.matrix(a, b)[~live]))
    # the graph's edges are the between-layer entries, node ids those of the weight graph
    g = fc.graph
    w = cn.extract.weights(model, (3, 8, 8))
    assert set(g.node_ids.tolist()) <= set(w.node_ids.tolist())
    for a, b in zip(names[:-1], names[1:]):
        s, d, r = g.edge_block(a, b)
        np.testing.assert_allclose(r, fc.matrix(a, b)[s, d], rtol=0, atol=0)
    # one batch of everything gives the same moments
    whole = _fc(model, x, fdr=None, batch_size=64)
    for k, m in fc.blocks.items():
        np.testing.assert_allclose(whole.blocks[k], m, rtol=1e-10, atol=1e-13)


def test_spearman_equals_scipy_on_stored_activations():
    model, x = _tiny(), _images(29)
    fc = _fc(model, x, method="spearman", fdr=None, batch_size=4)
    acts = _stored(model, x)
    a, b = "conv1", "conv2"
    want = spearmanr(np.concatenate([acts[a], acts[b]], 1)).statistic[:4, 4:]
    np.testing.assert_allclose(fc.matrix(a, b), want, rtol=1e-10, atol=1e-12)


def test_partial_correlation_matches_the_hand_formula_on_3_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3, dtype=torch.float64))
        model[0].bias.zero_()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(200, 3, generator=g, dtype=torch.float64)
    x = torch.stack([z[:, 0], z[:, 0] + z[:, 1], z[:, 1] + 0.5 * z[:, 2]], 1)  # correlated units
    fc = _fc(model, x, method="partial", fdr=None, between="none")
    layer = fc.graph.layer_names[1]
    R = np.corrcoef(x.numpy(), rowvar=False)

    def hand(i, j, k):
        return (R[i, j] - R[i, k] * R[j, k]) / math.sqrt((1 - R[i, k] ** 2) * (1 - R[j, k] ** 2))

    P = fc.matrix(layer)
    assert P[0, 1] == pytest.approx(hand(0, 1, 2), abs=1e-10)
    assert P[0, 2] == pytest.approx(hand(0, 2, 1), abs=1e-10)
    assert P[1, 2] == pytest.approx(hand(1, 2, 0), abs=1e-10)
    # p-value: Fisher z with one conditioning unit, df = n - 3 - 1
    w = fc.within[layer]
    i = int(np.flatnonzero((w["src"] == 0) & (w["dst"] == 2))[0])
    from scipy.stats import norm

    assert w["p"][i] == pytest.approx(2 * norm.sf(abs(math.atanh(hand(0, 2, 1))) * math.sqrt(200 - 4)), rel=1e-9)


def test_bh_adjust_equals_scipy():
    from scipy.stats import false_discovery_control

    from connectome.analysis.functional import bh_adjust

    p = np.random.default_rng(0).uniform(size=500) ** 3
    p[:5] = p[5]  # ties
    np.testing.assert_allclose(bh_adjust(p), false_discovery_control(p, method="bh"), rtol=1e-12)


def test_fdr_is_benjamini_hochberg_and_top_k_keeps_each_units_strongest():
    model, x = _tiny(), _images(60)
    full = _fc(model, x, fdr=None, between="all")
    g = full.graph
    p = np.concatenate([g.edge_attr("p")] + [w["p"] for w in full.within.values()])
    q = np.concatenate([g.edge_attr("q")] + [w["q"] for w in full.within.values()])
    # BH by hand: q_(i) = min_{j >= i} p_(j) m / j
    m = g.meta["n_tested"]
    assert m >= p.size
    o = np.argsort(p)
    # untested (NaN) pairs are not kept with fdr=None, and they have p = 1: BH of all m p-values
    all_p = np.concatenate([p, np.ones(m - p.size)])
    oa = np.argsort(all_p, kind="stable")
    qa = np.minimum.accumulate((all_p[oa] * m / np.arange(1, m + 1))[::-1])[::-1]
    back = np.empty(m)
    back[oa] = np.minimum(qa, 1.0)
    np.testing.assert_allclose(np.sort(q), np.sort(back[: p.size]), rtol=1e-12)
    assert o.size == p.size
    thr = _fc(model, x, fdr=0.05, between="all")
    assert thr.graph.num_edges == int((g.edge_attr("q") <= 0.05).sum())
    assert np.all(thr.graph.edge_attr("q") <= 0.05)

    def edges(fc):  # every kept edge, within and between layers, as (global u, global v, r)
        g = fc.graph
        us, vs, rs = [g.src], [g.dst], [g.weight]
        for layer, w in fc.within.items():
            o = g.layer_slice(layer).start
            us.append(o + w["src"])
            vs.append(o + w["dst"])
            rs.append(w["r"])
        return np.concatenate(us), np.concatenate(vs), np.concatenate(rs)

    tu, tv, _ = edges(_fc(model, x, fdr=None, top_k=1))
    ru, rv, rr = edges(_fc(model, x, fdr=None))
    kept = set(zip(tu.tolist(), tv.tolist()))
    best_of = set()
    for node in range(g.num_nodes):  # every unit keeps its strongest edge ...
        inc = np.flatnonzero((ru == node) | (rv == node))
        if inc.size:
            e = inc[np.argmax(np.abs(rr[inc]))]
            best_of.add((int(ru[e]), int(rv[e])))
    assert kept == best_of  # ... and only edges that are the strongest of one of their ends


def test_processes_give_the_result_of_one_process(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    model, x = _tiny(), _images(13)
    for method in ("pearson", "spearman"):
        one = _fc(model, x, method=method, fdr=None, batch_size=3)
        for r in range(2):
            got = np.load(tmp_path / f"{method}{r}.npz")
            for (a, b), m in one.blocks.items():
                np.testing.assert_allclose(got[f"{a}|{b}"], m, rtol=1e-10, atol=1e-12)
            assert int(got["n"]) == 13


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for method in ("pearson", "spearman"):
            fc = _fc(_tiny(), _images(13), method=method, fdr=None, batch_size=3)
            np.savez(Path(out) / f"{method}{rank}.npz", n=fc.n_images,
                     **{f"{a}|{b}": m for (a, b), m in fc.blocks.items()})
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_are_refused_with_a_clear_message():
    model, x = _tiny(), _images(5)
    with pytest.raises(ConnectomeError, match="method must be one of"):
        _fc(model, x, method="kendall")
    with pytest.raises(ConnectomeError, match="fdr must be"):
        _fc(model, x, fdr=0)
    with pytest.raises(ConnectomeError, match="top_k"):
        _fc(model, x, top_k=0)
    with pytest.raises(ConnectomeError, match="no layer|layers are|not in"):
        _fc(model, x, layers=["nope"])
    with pytest.raises(DataError, match="at least 2 images"):
        _fc(model, x[:1])


# ----------------------------------------------------------------------------- coupling
def _graph(weights, seed=0):
    rng = np.random.default_rng(seed)
    edges = [(f"a:{i}", f"b:{j}", float(w)) for (i, j), w in zip([(i, j) for i in range(6) for j in range(5)], weights)]
    edges += [(f"b:{j}", f"c:{k}", float(rng.normal())) for j in range(5) for k in range(3)]
    return cn.Connectome.from_edges([("a", "input", 6), ("b", "linear", 5), ("c", "output", 3)], edges)


def test_coupling_of_a_graph_with_itself_and_a_monotone_transform():
    w = np.random.default_rng(1).normal(size=30)
    g = _graph(w)
    c = coupling(g, g, n_permutations=200, seed=0)
    assert [(r.src_layer, r.dst_layer, r.n_pairs) for r in c.rows] == [("a", "b", 30), ("b", "c", 15)]
    assert all(r.rho == pytest.approx(1.0) for r in c.rows)
    assert c.rows[0].p_value == pytest.approx(1 / 201)
    h = _graph(np.exp(-w))  # order reversed on a -> b only
    c2 = coupling(g, h, n_permutations=200, seed=0)
    assert c2.rows[0].rho == pytest.approx(-1.0)
    assert c2.rows[1].rho == pytest.approx(1.0)
    # seeded: the same null twice; an unrelated graph is not significant on this seed
    again = coupling(g, h, n_permutations=200, seed=0)
    assert again.to_dict() == c2.to_dict()
    noise = _graph(np.random.default_rng(9).normal(size=30), seed=4)
    c3 = coupling(g, noise, n_permutations=500, seed=0)
    assert c3.rows[0].p_value > 0.01
    assert abs(c3.rows[0].null_mean) < 0.05


def test_coupling_needs_shared_pairs():
    g = _graph(np.ones(30))
    other = cn.Connectome.from_edges([("x", "input", 1), ("y", "output", 1)], [("x:0", "y:0", 1.0)])
    with pytest.raises(ConnectomeError, match="share no unit pair"):
        coupling(g, other)
    with pytest.raises(ConnectomeError, match="must be a Connectome"):
        coupling(g, "weights.npz")


def test_coupling_of_structure_and_function_on_a_model():
    model, x = _tiny(), _images(40)
    fc = analysis.functional_connectivity(model, x, device="cpu", fdr=None)
    c = analysis.coupling(cn.extract.weights(model, (3, 8, 8)), fc, n_permutations=50)
    assert c.rows and all(r.n_pairs > 0 for r in c.rows)
    assert all(-1 <= r.rho <= 1 for r in c.rows if math.isfinite(r.rho))


# ----------------------------------------------------------------------------- CLI
def test_cli_functional_writes_the_graph_and_within_pairs(tmp_path, capsys):
    from connectome.cli import main

    out, within = tmp_path / "fc.npz", tmp_path / "within.npz"
    assert main(["functional", "zoo:simplecnn_a", "zoo:shapes:3", "--out", str(out), "--within", str(within),
                 "--fdr", "none", "--device", "cpu", "--top-k", "3"]) == 0
    g = cn.load(out)
    assert g.meta["kind"] == "functional" and g.meta["fdr"] is None and g.meta["top_k"] == 3
    w = np.load(within)
    assert set(w["layer"].tolist()) <= set(g.layer_names)
    assert np.all(np.abs(w["r"]) <= 1) and w["src"].size == w["dst"].size == w["q"].size
    assert main(["functional", "zoo:simplecnn_a", "zoo:shapes:3", "--out", str(out), "--fdr", "often"]) == 2
    assert "--fdr must be" in capsys.readouterr().err
    assert main(["functional", "zoo:simplecnn_a", "zoo:shapes:3", "--out", str(tmp_path / "no" / "f.npz")]) == 2


def test_report_section_draws_functional_next_to_effective():
    from connectome.viz.report import Report, functional_section

    model, x = _tiny(), _images(30)
    fc = _fc(model, x, fdr=None)
    w = cn.extract.weights(model, (3, 8, 8))
    rep = Report("r")
    functional_section(rep, fc, w, coupling(w, fc, n_permutations=20))
    html = rep.to_html()
    assert "Functional connectivity" in html and 'data-file="functional.png"' in html
    assert "Spearman rho" in html
    from connectome.viz.connectivity import plot_functional

    fig = plot_functional(fc, w)
    assert fig._suptitle.get_text() == "conv1 -> conv2"  # the first pair of hidden layers
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), fc.matrix("conv1", "conv2"))
