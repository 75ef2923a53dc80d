"""The lean step (issue 26): per-unit sums of many layers joined into a few ops
(:mod:`connectome.extract.batched`), weights that one layer reads used as their own autograd
leaves, and the flows they give, checked against per-tensor sums and against the per-layer path."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import connectome as cn
from connectome.extract import batched
from connectome.extract.batched import GroupedSums


def _reference(x: torch.Tensor, dim: int, y: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """Per image and unit, over every other dim, in float64, one tensor at a time."""
    t = x.double() if y is None else x.double() * y.double()
    t = t.movedim(dim, 1).reshape(t.shape[0], t.shape[dim], -1)
    return t.mean(2) if mean else t.sum(2)


def _tensors(seed: int) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [((3, 4, 5, 5), 1), ((3, 6, 5, 5), 1), ((3, 7), 1), ((3, 2, 1, 1), 1), ((3, 5, 2, 2), 1),
              ((3, 9, 8), -1), ((3, 9, 3), -1), ((3, 2, 2, 4), -1), ((3, 8, 4, 5), 1),
              ((3, 3, 5, 5), 1)]  # the last joins the first group: its columns move back in place
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s, _ in shapes]
    ys = [torch.randn(s, generator=gen, dtype=torch.float64) for s, _ in shapes]
    xs[1] = xs[1].transpose(2, 3)  # not contiguous: joined all the same
    return xs, [d for _, d in shapes], ys


@pytest.mark.parametrize("limit", [0, 40, 1 << 20])
def test_grouped_sums_equal_per_tensor_sums_in_the_callers_order(limit: int):
    xs, dims, ys = _tensors(0)
    sums = GroupedSums(limit)
    m, p = sums(xs, dims, ys, means=True)
    _, s = sums(xs, dims)
    want_m = torch.cat([_reference(x, d if d == 1 else x.dim() - 1, None, True) for x, d in zip(xs, dims)], 1)
    want_p = torch.cat([_reference(x, d if d == 1 else x.dim() - 1, y, False) for x, y, d in zip(xs, ys, dims)], 1)
    want_s = torch.cat([_reference(x, d if d == 1 else x.dim() - 1, None, False) for x, d in zip(xs, dims)], 1)
    for got, want in ((m, want_m), (p, want_p), (s, want_s)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)


def test_grouped_sums_join_by_layout_and_leave_large_tensors_alone():
    xs, dims, _ = _tensors(1)

    def joins(limit: int) -> int:
        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                Count.n += func.overloadpacket.__name__ == "_chunk_cat"
                return func(*args, **(kwargs or {}))

        with Count():
            GroupedSums(limit)(xs, dims)
        return Count.n

    # dim-1 tensors with 25, 1 and 4 positions per unit, and last-dim ones led by (3, 9) and (3, 2, 2):
    # the groups of more than one tensor are (25 positions: 3), (1 position: 2) and ((3, 9): 2)
    assert joins(1 << 20) == 3
    assert joins(0) == 0  # every tensor above the limit: reduced alone, no copy


def test_grouped_sums_refuse_another_units_dim():
    with pytest.raises(ValueError, match="units dim must be 1 or -1"):
        GroupedSums()([torch.zeros(2, 3, 4)], [2])


class _Mixed(nn.Module):
    """Conv + BatchNorm with a residual add, a channel concat, a LayerNorm over tokens (its Terms
    constants), GELU and a Linear head: every joined path of the step."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.b2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 4, 1)
        self.norm = nn.LayerNorm(10)
        self.tok = nn.Linear(10, 10)
        self.head = nn.Linear(10 * 16, 5)
        with torch.no_grad():
            for bn in (self.b1, self.b2):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))  # residual add (identity edges), BN constants
        h = torch.cat([h, self.c3(h)], 1)  # (N, 10, 4, 4)
        t = h.flatten(2).transpose(1, 2)  # (N, 16 tokens, 10 units)
        t = nn.functional.gelu(self.tok(self.norm(t)))
        return self.head(t.flatten(1))


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    return _Mixed().double().eval()


def _graph(model: nn.Module, limit: int, **kw) -> cn.Connectome:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 5, (6,), generator=gen)
    with batched.joining_on_cpu(limit):
        return cn.extract.attribution(model, (x, y), progress=False, device="cpu", batch_size=4, **kw)


def _columns(g: cn.Connectome) -> dict[str, np.ndarray]:
    return {"weight": np.asarray(g.weight), **{k: np.asarray(v) for k, v in g.node_attrs.items()}}


def test_joined_step_gives_the_flows_of_the_per_layer_step():
    m = _mixed()
    alone, joined = _columns(_graph(m, 0)), _columns(_graph(m, 1 << 30))
    assert alone.keys() == joined.keys()
    for k in alone:
        scale = max(np.abs(alone[k]).max(), 1e-300)
        np.testing.assert_allclose(joined[k], alone[k], rtol=0, atol=1e-12 * scale, err_msg=k)
    g = _graph(m, 1 << 30)
    # and the joined sums are exact: conservation at every unit of a hidden layer, completeness
    assert g.meta["completeness_relative"] < 1e-12
    assert np.abs(g.node_attr("bias_attribution")).max() > 1e-3  # BN and LayerNorm constants were summed


def test_joined_step_dispatches_fewer_ops_than_the_per_layer_step():
    m = _mixed()

    def ops(limit: int) -> int:
        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                Count.n += 1
                return func(*args, **(kwargs or {}))

        with Count():
            _graph(m, limit)
        return Count.n

    assert ops(1 << 30) < ops(0) - 40


class _Tied(nn.Module):
    """One weight read by two layers: its gradient sums both uses, each layer's W * dW must not."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.fc2 = None if tied else nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = self.fc if self.fc2 is None else self.fc2
        h = torch.relu(nn.functional.linear(x, self.fc.weight, self.fc.bias))
        return self.head(torch.relu(nn.functional.linear(h, second.weight, second.bias)))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_weight_that_two_layers_read_gives_each_its_own_flows(frozen: bool):
    torch.manual_seed(0)
    tied = _Tied(True).double().eval()
    untied = _Tied(False).double().eval()
    untied.load_state_dict({**tied.state_dict(), "fc2.weight": tied.fc.weight, "fc2.bias": tied.fc.bias})
    assert untied.fc2.weight.data_ptr() != tied.fc.weight.data_ptr()
    if frozen:
        tied.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    a = cn.extract.attribution(tied, (x, y), progress=False, device="cpu")
    b = cn.extract.attribution(untied, (x, y), progress=False, device="cpu")
    assert a.num_edges == b.num_edges
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.node_attr("bias_attribution"), b.node_attr("bias_attribution"), rtol=1e-12, atol=1e-12)
    assert all(p.requires_grad != frozen for p in tied.parameters())  # the model is left as it was


def test_ops_per_batch_do_not_grow_per_layer_on_the_gpu_path():
    """The GPU path's per-unit sums: adding layers of the same shape adds no per-unit-sum op
    (counted ops per batch grow by the layers' own forward and backward ops only)."""

    def net(depth: int) -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
        for _ in range(depth):
            layers += [nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double().eval()

    def per_batch(model: nn.Module) -> collections.Counter:
        gen = torch.Generator().manual_seed(4)
        x, y = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)

        def count(n: int) -> collections.Counter:
            c: collections.Counter = collections.Counter()

            class Count(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                    c[func.overloadpacket.__name__] += 1
                    return func(*args, **(kwargs or {}))

            with batched.joining_on_cpu(batched.JOIN_LIMIT["cuda"]), Count():
                cn.extract.attribution(model, (x[: 4 * n], y[: 4 * n]), progress=False, device="cpu", batch_size=4)
            return c

        one, three = count(1), count(3)
        return collections.Counter({k: (three[k] - one[k]) // 2 for k in three})

    small, big = per_batch(net(2)), per_batch(net(6))
    # the 4 more blocks add their own convolution, batch norm and relu ops, forward and backward
    for op in ("sum", "mean", "mul", "_chunk_cat", "index_add_", "cat", "_to_copy", "view"):
        assert big[op] == small[op], (op, {k: (small[k], big[k]) for k in big if big[k] != small[k]})


class _Blocks(nn.Module):
    """Three identical blocks of layout ops by sizes read off x.shape: a channel shuffle
    (units in another order) and a transpose, around a Linear over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 2, stride=2)
        self.proj = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
        self.mix = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 9 tokens, 12): patches, as a ViT's
        for proj, mix in zip(self.proj, self.mix):
            b, n, c = t.shape
            h = proj(t).reshape(b, n, 3, c // 3).transpose(2, 3).reshape(b, n, c)  # shuffled channels
            t = torch.relu(mix(h.transpose(1, 2).transpose(1, 2)))
        return self.head(t.mean(1))


def test_layout_ops_repeated_across_blocks_map_as_when_each_is_followed(monkeypatch: pytest.MonkeyPatch):
    from connectome.extract import trace

    torch.manual_seed(0)
    m = _Blocks().double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    keys: list = []
    real = trace._layout_key

    def counted(*a, **kw):  # noqa: ANN002, ANN003
        k = real(*a, **kw)
        keys.append(k)
        return k

    monkeypatch.setattr(trace, "_layout_key", counted)
    remembered = trace.trace_units(m, x)
    assert len([k for k in keys if k is not None]) > len({k for k in keys if k is not None})  # some ops were repeats
    monkeypatch.setattr(trace, "_layout_key", lambda *a, **kw: None)
    followed = trace.trace_units(m, x)
    assert remembered.units.keys() == followed.units.keys()
    for name, u in followed.units.items():
        r = remembered.units[name]
        assert (r.layer, r.dims, r.batch, r.windows) == (u.layer, u.dims, u.batch, u.windows), name
        assert (r.index is None) == (u.index is None) and (u.index is None or np.array_equal(r.index, u.index)), name
    gen = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
    g = cn.extract.attribution(m, (xs, ys), progress=False, device="cpu")
    assert g.meta["completeness_relative"] < 1e-12


def test_grouped_totals_of_tensors_with_positions_folded_into_the_batch():
    """Rows of a batch that hold windows (TNT's pixel tokens: (images x patches, pixels, units))
    are summed with the others: per-image sums cannot be joined, totals over the batch can."""
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64), torch.randn(12, 7, 5, generator=gen, dtype=torch.float64),
          torch.randn(12, 2, 3, 3, generator=gen, dtype=torch.float64)]
    ys = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
    dims = [-1, -1, 1]
    _, got = GroupedSums(1 << 20)(xs, dims, ys, total=True)
    want = torch.cat([(x * y).movedim(d % x.dim(), -1).reshape(-1, x.shape[d]).sum(0) for x, y, d in zip(xs, ys, dims)])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)


def test_a_gradient_hook_on_a_weight_leaves_its_flows_alone():
    """Hooks that training code leaves on a parameter (a gradient mask) must not reach W * dW."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    plain = cn.extract.attribution(m, (x, y), progress=False, device="cpu")
    handles = [m[0].weight.register_hook(lambda g: g * 0), m[2].bias.register_hook(lambda g: g * 3)]
    hooked = cn.extract.attribution(m, (x, y), progress=False, device="cpu")
    for h in handles:
        h.remove()
    assert np.abs(plain.weight).max() > 1e-3
    np.testing.assert_allclose(hooked.weight, plain.weight, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hooked.node_attr("bias_attribution"), plain.node_attr("bias_attribution"),
                               rtol=1e-12, atol=1e-12)
