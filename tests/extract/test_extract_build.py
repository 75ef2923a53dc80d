"""assemble: per-layer values -> Connectome, against a reference built the slow way; its memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn

from connectome.extract.build import assemble, graph_layers, layout
from connectome.extract.trace import trace_units
from connectome.kinds import DENSE, IDENTITY, KINDS


class _Mixed(nn.Module):
    """Grouped conv, a concat whose operands come in reverse layer order, ``x + x`` (parallel
    edges), a subtraction, a channel shuffle and a split feeding convs (blocks that read
    permuted or selected units), and a Linear over flattened positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.c = nn.Conv2d(6, 4, 1)
        self.s = nn.Conv2d(6, 6, 1, groups=2)
        self.h = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        cat = torch.cat([b, a], 1)  # b's layer comes after a's
        c = self.c(b)
        r = c + c - a
        n, ch, hh, ww = b.shape
        shuffled = b.reshape(n, 2, ch // 2, hh, ww).transpose(1, 2).reshape(n, ch, hh, ww)  # channel shuffle
        s = torch.relu(self.s(shuffled))
        half = self.h(s.chunk(2, dim=1)[1])  # reads units 3..5 of s only
        h = torch.cat([r, cat, half], 1)
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def _reference(ug, values, extra):
    """The straightforward build: every block's (src, dst, value), concatenated, sorted by
    (dst, src), parallel edges summed."""
    sizes = [s.size for s in ug.layers]
    off = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    unit = lambda op, c: c if op.cols is None else int(op.cols[c])  # noqa: E731
    for li, spec in enumerate(ug.layers):
        if KINDS[spec.kind].edges == DENSE:
            op = spec.operands[0]
            vals = values[li]
            o, cg = vals.shape
            og = o // spec.groups
            for j in range(o):
                for c in range(cg):
                    src = off[op.layer] + unit(op, (j // og) * cg + c)
                    rows.append((off[li] + j, src, vals[j, c], *(per[li][j, c] for per in extra.values())))
        elif KINDS[spec.kind].edges == IDENTITY:
            for oi, op in enumerate(spec.operands):
                for c, v in enumerate(values[li][oi]):
                    rows.append((off[li] + op.offset + c, off[op.layer] + unit(op, c), v,
                                 *(per[li][oi][c] for per in extra.values())))
    merged: dict[tuple[int, int], np.ndarray] = {}
    for d, s, *vs in rows:
        merged[(d, s)] = merged.get((d, s), 0) + np.array(vs, dtype=np.float64)
    keys = sorted(merged)
    cols = np.array([merged[k] for k in keys]).reshape(len(keys), -1)
    return np.array([k[1] for k in keys]), np.array([k[0] for k in keys]), cols


def _values(ug, rng):
    values = {}
    for li, spec in enumerate(ug.layers):
        if KINDS[spec.kind].edges == DENSE:
            op = spec.operands[0]
            width = ug.layers[op.layer].size if op.cols is None else len(op.cols)
            values[li] = rng.standard_normal((spec.size, width // spec.groups))
        elif KINDS[spec.kind].edges == IDENTITY:
            values[li] = [rng.standard_normal(op.width) for op in spec.operands]
    return values


@pytest.mark.parametrize("as_tensors", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_assemble_matches_the_slow_build(dtype, as_tensors):
    torch.manual_seed(0)
    model = _Mixed().eval()
    ug = trace_units(model, torch.zeros(1, 3, 4, 4))
    kinds = {s.kind for s in ug.layers}
    assert {"conv", "linear", "residual", "concat"} <= kinds
    assert any(s.groups > 1 for s in ug.layers if s.kind == "conv")
    assert any(s.operands[0].cols is not None for s in ug.layers if s.kind == "conv"), "a block reads permuted units"
    rng = np.random.default_rng(1)
    values = _values(ug, rng)
    absv = {li: (np.abs(v) if isinstance(v, np.ndarray) else [np.abs(u) for u in v]) for li, v in values.items()}
    given, given_abs = values, absv
    if as_tensors:  # what the accumulator hands over: (device) tensors, copied into the columns
        tt = lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else [torch.from_numpy(u) for u in v]  # noqa: E731
        given, given_abs = {li: tt(v) for li, v in values.items()}, {li: tt(v) for li, v in absv.items()}
    g = assemble(ug, graph_layers(ug), given, extra={"abs_weight": given_abs}, dtype=dtype)
    src, dst, cols = _reference(ug, values, {"abs_weight": absv})
    assert len(set(zip(dst.tolist(), src.tolist()))) < sum(
        np.size(v) if isinstance(v, np.ndarray) else sum(u.size for u in v) for v in values.values()
    ), "the model must have parallel edges (x + x)"
    np.testing.assert_array_equal(g.src, src)
    np.testing.assert_array_equal(g.dst, dst)
    assert g.weight.dtype == dtype
    np.testing.assert_allclose(g.weight, cols[:, 0], rtol=1e-6 if dtype == np.float32 else 1e-15)
    np.testing.assert_allclose(g.edge_attrs["abs_weight"], cols[:, 1], rtol=1e-15)


def test_assemble_allocates_about_the_graph_only():
    """No global sort, concatenation or float64 copy: the build's peak is the graph itself
    (the one-pass-per-part build peaked at 4.7x on ResNet-50)."""
    model = nn.Sequential(nn.Linear(1000, 600), nn.ReLU(), nn.Linear(600, 500)).eval()
    ug = trace_units(model, torch.zeros(1, 1000))
    values = _values(ug, np.random.default_rng(0))
    layers = graph_layers(ug)
    tracemalloc.start()
    try:
        g = assemble(ug, layers, values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = g.src.nbytes + g.dst.nbytes + g.weight.nbytes
    assert g.num_edges == 1000 * 600 + 600 * 500
    assert peak <= 1.15 * size, f"assemble peaked at {peak / size:.2f}x the graph's size"


def test_graphs_of_one_traced_model_share_its_edges_and_skip_the_order_check(monkeypatch):
    """The skeleton (src, dst) is built once per traced model, in a background thread when
    prefetched, and every graph of the model shares it read-only without checking or
    sorting it again (the check cost 0.17 s per graph, with_meta included, on vit_b_16)."""
    import connectome.graph as graph_mod
    from connectome.extract.build import prefetch_skeleton, skeleton

    model = _Mixed().eval()
    ug = trace_units(model, torch.zeros(1, 3, 4, 4))
    prefetch_skeleton(ug)
    sk = skeleton(ug)
    ref = trace_units(model, torch.zeros(1, 3, 4, 4))  # built synchronously, on its own
    np.testing.assert_array_equal(sk.src, skeleton(ref).src)
    np.testing.assert_array_equal(sk.dst, skeleton(ref).dst)
    values = _values(ug, np.random.default_rng(2))
    g1 = assemble(ug, graph_layers(ug), values)
    calls = []
    real = graph_mod._check_canonical
    monkeypatch.setattr(graph_mod, "_check_canonical", lambda *a: calls.append(1) or real(*a))
    g2 = assemble(ug, graph_layers(ug), {li: (v * 2 if isinstance(v, np.ndarray) else [u * 2 for u in v])
                                        for li, v in values.items()})
    g3 = g2.with_meta(note="x")
    assert g1.src is g2.src is g3.src and g1.dst is g2.dst is g3.dst
    assert not calls, "graphs sharing checked edge arrays must not check them again"
    np.testing.assert_allclose(g2.weight, 2 * g1.weight)
    assert not g1.src.flags.writeable and not g1.weight.flags.writeable


def test_a_failing_skeleton_build_is_raised_where_the_graph_is_built(monkeypatch):
    import connectome.extract.build as build

    model = _Mixed().eval()
    ug = trace_units(model, torch.zeros(1, 3, 4, 4))

    def broken(ug):
        raise RuntimeError("skeleton broke")

    monkeypatch.setattr(build, "_build_skeleton", broken)
    build.prefetch_skeleton(ug)  # fails in its thread; nothing is raised there
    with pytest.raises(RuntimeError, match="skeleton broke"):
        assemble(ug, graph_layers(ug), _values(ug, np.random.default_rng(0)))


def _small_run(per_sample: bool):
    from connectome.extract.accumulator import FlowAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(5, 3)).eval().double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    ug = trace_units(model, x[:1])
    acc = FlowAccumulator(ug, torch.device("cpu"), torch.float64, per_sample=per_sample)
    acc.step(x, lambda logits: logits[:, 0])
    return ug, acc, x


def test_cpu_sums_become_the_graph_columns_and_a_second_graph_is_a_copy():
    """On the CPU each dense block accumulates in a view of one flat buffer laid out as the
    graph's column, so the finished sums become the column with no copy; the accumulator then
    refuses to step (it would write into the graph), and a second to_graph copies."""
    from connectome.errors import ConnectomeError

    ug, acc, x = _small_run(per_sample=True)
    assert acc._columns is None, "on the CPU nothing is prefetched (it would only raise the peak memory)"
    g1 = acc.to_graph(None, {})
    assert np.shares_memory(g1.weight, acc._flat["edges"].numpy())
    assert np.shares_memory(g1.edge_attrs["abs_weight"], acc._flat["abs_edges"].numpy())
    with pytest.raises(ConnectomeError, match="new FlowAccumulator"):
        acc.step(x, lambda logits: logits[:, 0])
    g2 = acc.to_graph(None, {})
    for a in (g2.weight, g2.edge_attrs["abs_weight"]):
        assert not a.flags.writeable
        assert not np.shares_memory(a, g1.weight) and not np.shares_memory(a, g1.edge_attrs["abs_weight"])
    np.testing.assert_array_equal(g1.weight, g2.weight)
    np.testing.assert_array_equal(g1.edge_attrs["abs_weight"], g2.edge_attrs["abs_weight"])
    assert np.all(g1.edge_attrs["abs_weight"] >= np.abs(g1.weight) - 1e-12) and np.any(g1.weight != 0)


def test_rebound_sums_are_copied_not_handed_over():
    """A checkpoint loaded into the accumulator keeps the blocks as views (copied in place);
    a block rebound to another tensor makes to_graph copy instead of handing the buffer over."""
    ug, acc, x = _small_run(per_sample=False)
    ug2, acc2, _ = _small_run(per_sample=False)
    acc2.load_state_dict(acc.state_dict())
    g_loaded = acc2.to_graph(None, {})
    assert np.shares_memory(g_loaded.weight, acc2._flat["edges"].numpy())
    li = next(b.li for b in layout(ug).blocks if b.order is None)
    acc.edges[li] = acc.edges[li].clone()  # no longer a view of the buffer
    g = acc.to_graph(None, {})
    assert not np.shares_memory(g.weight, acc._flat["edges"].numpy())
    np.testing.assert_array_equal(g.weight, g_loaded.weight)


def test_assemble_fills_prefetched_columns():
    """The columns a device run's skeleton thread allocated and wrote once are the graph's."""
    from connectome.extract.build import prefetch_skeleton

    model = _Mixed().eval()
    ug = trace_units(model, torch.zeros(1, 3, 4, 4))
    cols = prefetch_skeleton(ug, columns=2).result()
    values = _values(ug, np.random.default_rng(4))
    absv = {li: (np.abs(v) if isinstance(v, np.ndarray) else [np.abs(u) for u in v]) for li, v in values.items()}
    g = assemble(ug, graph_layers(ug), values, extra={"abs_weight": absv}, columns=cols)
    assert np.shares_memory(g.weight, cols[0]) and np.shares_memory(g.edge_attrs["abs_weight"], cols[1])
    ref = assemble(ug, graph_layers(ug), values, extra={"abs_weight": absv})
    np.testing.assert_array_equal(g.weight, ref.weight)
    np.testing.assert_array_equal(g.edge_attrs["abs_weight"], ref.edge_attrs["abs_weight"])


def test_traced_copies_of_one_architecture_share_one_skeleton_while_a_graph_holds_it():
    """attribution_by_category traces the model once per category: its graphs share one
    src/dst (16 bytes per edge once, not once per category); a model of another structure
    gets its own; the shared edges go with the last graph holding them."""
    import gc

    import connectome.extract.build as build

    torch.manual_seed(0)
    model = _Mixed().eval()
    ug1 = trace_units(model, torch.zeros(1, 3, 4, 4))
    ug2 = trace_units(model, torch.zeros(1, 3, 4, 4))
    rng = np.random.default_rng(3)
    g1 = assemble(ug1, graph_layers(ug1), _values(ug1, rng))
    g2 = assemble(ug2, graph_layers(ug2), _values(ug2, rng))
    assert g1.src is g2.src and g1.dst is g2.dst and g1.node_units is g2.node_units
    assert not np.array_equal(g1.weight, g2.weight)
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1), nn.Flatten(), nn.Linear(8, 3)).eval()
    ug3 = trace_units(other, torch.zeros(1, 3, 4, 4))
    g3 = assemble(ug3, graph_layers(ug3), _values(ug3, rng))
    assert g3.src is not g1.src and g3.num_edges == 3 * 5 + 5 * 2 + 2 * 3
    gc.collect()  # graphs of earlier tests, unreachable but not yet collected, must not count below
    n_shared = len(build._SHARED)
    del g1, g2, ug1, ug2
    gc.collect()
    assert len(build._SHARED) == n_shared - 1, "the skeleton must go with the last graph holding it"
    ug4 = trace_units(model, torch.zeros(1, 3, 4, 4))
    g4 = assemble(ug4, graph_layers(ug4), _values(ug4, rng))
    src, dst, _ = _reference(ug4, _values(ug4, rng), {})
    np.testing.assert_array_equal(g4.src, src)
    np.testing.assert_array_equal(g4.dst, dst)


def test_handover_is_all_or_nothing_and_the_handed_sums_cannot_change():
    """Review findings: with per_sample, a rebound weight block must not hand over the abs
    buffer alone (it was taken as the weight column); once handed over, nothing that writes
    the sums in place (all_reduce's tensors, load_state_dict) is allowed."""
    from connectome.errors import ConnectomeError

    _, ref_acc, _ = _small_run(per_sample=True)
    ref = ref_acc.to_graph(None, {})
    ug, acc, x = _small_run(per_sample=True)
    li = next(b.li for b in layout(ug).blocks if b.order is None)
    acc.edges[li] = acc.edges[li].clone()
    g = acc.to_graph(None, {})
    np.testing.assert_array_equal(g.weight, ref.weight)
    np.testing.assert_array_equal(g.edge_attrs["abs_weight"], ref.edge_attrs["abs_weight"])
    assert not np.shares_memory(g.edge_attrs["abs_weight"], acc._flat["abs_edges"].numpy())
    for call in (lambda: ref_acc.tensors("sum"), lambda: ref_acc.load_state_dict(acc.state_dict())):
        with pytest.raises(ConnectomeError, match="new FlowAccumulator"):
            call()
    np.testing.assert_array_equal(ref.weight, g.weight)


def test_a_failed_skeleton_build_is_tried_again(monkeypatch):
    import connectome.extract.build as build

    model = _Mixed().eval()
    ug = trace_units(model, torch.zeros(1, 3, 4, 4))
    real, calls = build._build_skeleton, []

    def flaky(ug):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("out of memory once")
        return real(ug)

    monkeypatch.setattr(build, "_build_skeleton", flaky)
    values = _values(ug, np.random.default_rng(0))
    with pytest.raises(MemoryError):
        assemble(ug, graph_layers(ug), values)
    g = assemble(ug, graph_layers(ug), values)
    assert len(calls) == 2 and g.num_edges == build.skeleton(ug).src.size
