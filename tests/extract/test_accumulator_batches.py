"""Gaps of the second mutation audit in the flow accumulator (issue 24, items 7, 8, 9 and 12):
image numbering across batches without an explicit index, sums of bfloat16 values taken in
float32, the per-sample 1x1 fast path with different strides along H and W, and the input
layer's attribution in a run that keeps dataset examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import connectome as cn
from connectome import patches
from connectome.extract.accumulator import FlowAccumulator
from connectome.extract.trace import Units, trace_units
from connectome.extract.unit_sums import UnitView


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


def _data(n: int, seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Per unit (column), the k images (rows) with the largest value, ties to the smaller index."""
    n = values.shape[0]
    return np.stack([np.lexsort((np.arange(n), -values[:, u]))[:k] for u in range(values.shape[1])])


# ---------------------------------------------------------------------- 7. step() numbers images on
def test_step_without_an_index_numbers_images_across_batches():
    m = _net()
    x, y = _data(12)
    k = 3
    acc = FlowAccumulator(trace_units(m, x[:1]), torch.device("cpu"), torch.float64, examples=k)
    for a in range(0, 12, 4):  # three batches, no index: the images are 0..11 in the order stepped
        acc.step(x[a:a + 4], lambda logits, a=a: logits.gather(1, y[a:a + 4, None]).squeeze(1))
    g = acc.to_graph(None, {})
    index, value, _ = patches.example_arrays(g)
    with torch.no_grad():  # by hand: the largest value over positions of what each unit passes on, per image
        per_image = {"0": m[:2](x).amax((2, 3)), "2": m[:6](x)}  # "2" passes on its global average
    for layer, a in per_image.items():
        best = a.numpy()
        want = _top_k(best, k)
        assert want.max() >= 4  # images of later batches are among the examples
        sl = g.layer_slice(layer)
        np.testing.assert_array_equal(index[sl], want, err_msg=layer)
        np.testing.assert_allclose(value[sl], np.take_along_axis(best.T, want, 1), rtol=1e-12)


# ---------------------------------------------------------------------- 8. bfloat16 values summed in float32
def test_bfloat16_values_are_summed_in_float32():
    """Each per-unit sum of bfloat16 values against float64 sums of the same values: a sum
    taken in float32 is within ~1e-7 of it, one rounded to bfloat16 is off by ~1e-3."""
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(4, 3, 32, 32, generator=gen) + 3.0).to(torch.bfloat16)  # same sign: sums do not cancel
    c = torch.randn(1, 3, 1, 1, generator=gen).to(torch.bfloat16)
    ref = t.double().sum((0, 2, 3))  # exact: every bfloat16 value is a float64
    ref_mean = t.double().mean((2, 3))
    # the tolerance tells the two apart: the sums rounded to bfloat16 miss it
    assert ((ref.to(torch.bfloat16).double() - ref).abs() / ref.abs()).max() > 1e-4
    view = UnitView(Units(0, (1,)), 3, torch.device("cpu"))
    torch.testing.assert_close(view.sum(t), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(view.slot_sums(t).double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(view.scaled_sum(c, t), c.double().reshape(-1) * ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(view.per_image_mean(t), ref_mean, rtol=1e-6, atol=0)


def test_amp_attribution_sums_bfloat16_products_in_float32():
    """End to end: under bfloat16 autocast each layer's attribution is the float32 sum of its
    bfloat16 products ``A * dT/dA``; the reference takes the same products and sums them in float64."""
    from connectome.extract.trace import run_nodes

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu", amp=True)
    ug = trace_units(m, x[:1])
    nodes = {s.name: s.out_node for s in ug.layers if s.name in ("0", "2")}
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, kept = run_nodes(ug.gm, (x,), keep=set(nodes.values()))
        grads = torch.autograd.grad(out.gather(1, y[:, None]).sum(), [kept[n] for n in nodes.values()])
    for (name, node), gA in zip(nodes.items(), grads):
        A = kept[node]
        assert A.dtype == gA.dtype == torch.bfloat16
        prod = (A * gA).double()  # (N, C, H, W), or (N, C) where the unit passes on its global average
        expect = prod.sum([d for d in range(prod.dim()) if d != 1]).detach().numpy()
        got = g.node_attr("attribution", name)
        assert np.abs(got - expect).max() <= 1e-5 * np.abs(expect).max(), name


# ---------------------------------------------------------------------- 9. per-sample 1x1 path, strides differ
class Strides(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 1, stride=(2, 1))  # 1x1, strided along the height only
        self.c3 = nn.Conv2d(5, 3, 1, stride=(1, 2))  # and along the width only
        self.fc = nn.Linear(3 * 4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(h)).flatten(1))


def test_per_sample_one_by_one_conv_with_different_strides_along_h_and_w():
    torch.manual_seed(0)
    m = Strides().double().eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 3, 8, 12, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1])  # H != W
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu", per_sample=True)
    # per image, |flow| of an edge is |its flow| in a run of that image alone
    ones = [cn.extract.attribution(m, (x[i:i + 1], y[i:i + 1]), progress=False, device="cpu") for i in range(3)]
    expect = sum(np.abs(o.weight) for o in ones)
    assert g.edge_block("c1", "c2")[0].size == 4 * 5 and g.edge_block("c2", "c3")[0].size == 5 * 3
    np.testing.assert_allclose(g.edge_attr("abs_weight"), expect, rtol=1e-10, atol=1e-12)
    assert np.abs(g.edge_attr("abs_weight") - np.abs(g.weight)).max() > 1e-6  # signs differ across images


# ---------------------------------------------------------------------- 12. examples keep the input attribution
def test_examples_keep_the_input_layer_attribution():
    m = _net()
    x, y = _data(6, seed=4)
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu", examples=2, batch_size=4)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(m(xr).gather(1, y[:, None]).sum(), xr)
    expect = (x * gx).sum((0, 2, 3)).numpy()
    assert np.abs(expect).min() > 0
    np.testing.assert_allclose(g.node_attr("attribution", "input"), expect, rtol=1e-10, atol=1e-12)
    assert abs(g.meta["completeness_residual"]) <= 1e-10 * max(1.0, abs(g.meta["target_total"]))
