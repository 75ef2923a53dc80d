"""Heads folded into the batch dim (SAM's ViT, HaloNet: ``(B * heads, tokens, head_dim)``): each
batch row remembers its image and its head, so the flows equal those of the same model written
with the heads on a dim of their own; an attention mask computed from the data (SAM's relative
positions from q) is part of the pattern, held constant with it, as in the hand-written form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError

C, HEADS, N = 8, 2, 16  # channels, heads, tokens (4 x 4)
HD = C // HEADS


def _data(seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 2, torch.tensor([0, 3, 1][:n])


class Heads(nn.Module):
    """Patch embedding, multi-head attention, a residual inside the heads (``o + v``), projection,
    LayerNorm, mean, head.

    ``layout``: ``"batch"`` folds the heads into the batch as SAM does (``reshape(3, B * heads,
    N, hd)``), ``"dim"`` keeps them on dim 1 (``(B, heads, N, hd)``), ``"interleaved"`` folds
    them heads-outer (row ``h * B + b``: the rows of an image are not consecutive).
    ``mask``: a relative-position bias computed from q, ``q @ R``, added to the scores.
    ``hand``: the attention written out, ``softmax(q k^T * scale + bias) @ v``.
    """

    def __init__(self, layout: str, mask: bool = False, hand: bool = False, pad: bool = False, moved: bool = False):
        super().__init__()
        self.layout, self.mask, self.hand, self.pad, self.moved = layout, mask, hand, pad, moved
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C + HEADS if pad else C, C)
        self.beta = nn.Parameter(torch.randn(HD))
        self.rel = nn.Parameter(torch.randn(HD, N) * 0.5)
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        b = t.shape[0]
        qkv = self.qkv(t).reshape(b, N, 3, HEADS, HD)
        if self.layout == "batch":
            q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * HEADS, N, HD).unbind(0)
        elif self.layout == "interleaved":
            q, k, v = qkv.permute(2, 3, 0, 1, 4).reshape(3, HEADS * b, N, HD).unbind(0)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = torch.matmul(q, self.rel) if self.mask else None  # (..., N, N): per query and key
        if self.hand:
            s = q @ k.transpose(-1, -2) * HD ** -0.5
            o = (s + bias if bias is not None else s).softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        o = o + v
        if self.moved:  # a constant added while the batch dim is off dim 0
            o = (o.transpose(0, 1) + self.beta).transpose(0, 1)
        else:
            o = o + self.beta
        if self.pad:  # a column of ones beside each head's channels (EfficientViT's linear attention)
            o = F.pad(o, (0, 1), value=1.0)
        d = o.shape[-1]
        if self.layout == "batch":
            o = o.view(b, HEADS, N, d).permute(0, 2, 1, 3).reshape(b, N, HEADS * d)
        elif self.layout == "interleaved":
            o = o.view(HEADS, b, N, d).permute(1, 2, 0, 3).reshape(b, N, HEADS * d)
        else:
            o = o.transpose(1, 2).reshape(b, N, HEADS * d)
        y = self.norm(t + self.proj(o))
        return self.fc(y.mean(1))


def _pair(seed: int, a: dict, b: dict) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    m1 = Heads(**a).double().eval()
    m2 = Heads(**b).double().eval()
    m2.load_state_dict(m1.state_dict())
    return m1, m2



@pytest.mark.parametrize("kw", [{}, dict(mask=True), dict(pad=True), dict(moved=True)],
                         ids=["plain", "mask from q", "padded heads", "batch moved off dim 0"])
def test_heads_in_the_batch_equal_heads_on_a_dim(kw, exact_graph, same_graph):
    folded, plain = _pair(5, dict(layout="batch", **kw), dict(layout="dim", **kw))
    x, y = _data(6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-12, atol=1e-12)
    g1 = exact_graph(folded, x, y, weights=False, conservation=True)
    g2 = exact_graph(plain, x, y, weights=False, conservation=True)
    same_graph(g1, g2, names=False)
    # per image: statistics, |flow| per sample and the dataset examples read the rows of an image
    # as its heads (unit slots), not as positions
    kw = dict(progress=False, device="cpu", per_sample=True, examples=2)
    p1, p2 = (cn.extract.attribution(m, (x, y), **kw) for m in (folded, plain))
    same_graph(p1, p2, columns="per image", names=False)
    np.testing.assert_allclose(p1.edge_attr("abs_weight"), p2.edge_attr("abs_weight"), rtol=1e-12, atol=1e-12)


def test_a_mask_from_the_data_is_held_constant_as_in_the_written_attention(exact_graph, same_graph):
    fused, hand = _pair(7, dict(layout="batch", mask=True), dict(layout="batch", mask=True, hand=True))
    x, y = _data(8)
    g1 = exact_graph(fused, x, y, weights=False, conservation=True)
    g2 = exact_graph(hand, x, y, weights=False, conservation=True)
    same_graph(g1, g2, names=False)
    # the mask changes the flows (the check above would hold for a mask that is ignored by both)
    plain, _ = _pair(7, dict(layout="batch"), dict(layout="batch"))
    g3 = cn.extract.attribution(plain, (x, y), progress=False, device="cpu")
    assert np.abs(g3.node_attr("attribution") - g1.node_attr("attribution")).max() > 1e-3


def test_heads_outer_in_the_batch_are_refused():
    m, _ = _pair(9, dict(layout="interleaved"), dict(layout="interleaved"))
    x, y = _data(10)
    with pytest.raises(ExtractionError, match="mixes the images of a batch"):
        cn.extract.attribution(m, (x, y), progress=False, device="cpu")


class PoolHeads(nn.Module):
    """MViTv2's pooling attention: k and v pooled per head by one convolution shared by the heads,
    then ``softmax(q k^T) @ v + q`` (residual pooling).

    ``shared=True`` runs the convolution as MViTv2 does, on the heads folded into the batch
    (``(B * heads, head_dim, H, W)``); ``shared=False`` runs the same function as a grouped
    convolution over ``(B, heads x head_dim, H, W)`` with the weight repeated per head.
    """

    def __init__(self, shared: bool, groups: int):
        super().__init__()
        self.shared, self.groups = shared, groups
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.pool_k = nn.Conv2d(HD, HD, 3, stride=2, padding=1, groups=groups, bias=False)
        self.pool_v = nn.Conv2d(HD, HD, 3, stride=2, padding=1, groups=groups)
        self.gamma = nn.Parameter(torch.rand(HD) + 0.5)  # a layer scale per channel of a head
        self.fc = nn.Linear(C, 4)

    def pool(self, t: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """(B, heads, 16, hd) -> (B, heads, 4, hd)."""
        b = t.shape[0]
        if self.shared:
            z = conv(t.reshape(-1, 4, 4, HD).permute(0, 3, 1, 2))  # (B * heads, hd, 2, 2)
        else:
            w = conv.weight.repeat(HEADS, 1, 1, 1)
            bias = conv.bias.repeat(HEADS) if conv.bias is not None else None
            z = F.conv2d(t.permute(0, 1, 3, 2).reshape(b, HEADS * HD, 4, 4), w, bias, 2, 1, 1, self.groups * HEADS)
        if conv is self.pool_v:  # per-unit ops after the layer: its values are the unit's
            gamma = self.gamma if self.shared else self.gamma.repeat(HEADS)
            z = F.gelu(z * gamma.view(1, -1, 1, 1))
        return z.reshape(b, HEADS, HD, 4).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        b = t.shape[0]
        q, k, v = self.qkv(t).reshape(b, N, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, self.pool(k, self.pool_k), self.pool(v, self.pool_v)) + q
        return self.fc(self.proj(o.transpose(1, 2).reshape(b, N, C)).mean(1))


@pytest.mark.parametrize("groups", [1, HD], ids=["dense", "depthwise"])
def test_a_convolution_shared_by_heads_in_the_batch_equals_the_grouped_one(groups, exact_graph, same_graph):
    torch.manual_seed(11)
    shared, grouped = PoolHeads(True, groups).double().eval(), PoolHeads(False, groups).double().eval()
    grouped.load_state_dict(shared.state_dict())
    x, y = _data(12)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), grouped(x), rtol=1e-12, atol=1e-12)
    g1 = exact_graph(shared, x, y, weights=False, conservation=True)
    g2 = exact_graph(grouped, x, y, weights=False, conservation=True)
    # the statistics of a unit are those of its value after the GELU, as for the grouped conv
    same_graph(g1, g2, columns=("attribution", "bias_attribution", "activation_mean", "activation_std", "frequency"),
               names=False)
    kw = dict(progress=False, device="cpu", per_sample=True)
    p1, p2 = (cn.extract.attribution(m, (x, y), **kw) for m in (shared, grouped))
    np.testing.assert_allclose(p1.edge_attr("abs_weight"), p2.edge_attr("abs_weight"), rtol=1e-12, atol=1e-12)
    # activations per image and unit, read where the heads are in the batch
    pool_v = next(l.name for l in g1.layers if l.name.startswith("pool_v"))
    # each unit of the shared convolution is in one head, as the graph's "head" column says
    at = np.flatnonzero(g1.node_layer == [l.name for l in g1.layers].index(pool_v))
    np.testing.assert_array_equal(g1.node_attr("head")[at], np.repeat(np.arange(HEADS), HD))
    pool_v2 = g2.layers[[l.name for l in g1.layers].index(pool_v)].name
    a1 = cn.extract.activations(shared, x, layers=[pool_v], device="cpu")[pool_v]
    a2 = cn.extract.activations(grouped, x, layers=[pool_v2], device="cpu")[pool_v2]
    assert a1.shape == (x.shape[0], HEADS * HD)
    np.testing.assert_allclose(a1, a2, rtol=1e-6, atol=1e-6)
    # masks per image and unit cannot be laid on rows of image x head: refused in one line
    with pytest.raises(ExtractionError, match="holds its units on several dims"):
        cn.analysis.ablate(shared, [f"{pool_v}:1"], (x, y), device="cpu")
    # the weight graph: each head's copy of the kernel
    w1, w2 = (cn.extract.weights(m.float(), (3, 8, 8)) for m in (shared, grouped))
    np.testing.assert_array_equal(w1.src, w2.src)
    np.testing.assert_allclose(w1.weight, w2.weight, rtol=1e-6)


class WindowHeads(nn.Module):
    """Windows of positions and heads both folded into the batch (row ``(b * windows + w) * heads
    + h``), then a residual ``o + v`` in that layout: a layer there would make the windows units."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.qkv = nn.Linear(C, 3 * C)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).permute(0, 2, 3, 1)  # (B, 4, 4, C)
        b = t.shape[0]
        w = t.view(b, 2, 2, 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, C)  # 4 windows of 4 tokens
        q, k, v = self.qkv(w).reshape(b * 4, 4, 3, HEADS, HD).permute(2, 0, 3, 1, 4).reshape(3, b * 4 * HEADS, 4, HD)
        o = F.scaled_dot_product_attention(q, k, v) + v
        return self.fc(o.reshape(b, 4, HEADS, 4, HD).permute(0, 1, 3, 2, 4).reshape(b, 16, C).mean(1))


def test_heads_and_windows_in_the_batch_make_no_layer_of_windows():
    torch.manual_seed(13)
    x, y = _data(14)
    with pytest.raises(ExtractionError, match="heads folded into the batch with windows of positions"):
        cn.extract.attribution(WindowHeads().double().eval(), (x, y), progress=False, device="cpu")


@pytest.mark.parametrize("layout", ["batch", "dim"])
def test_activations_of_a_layer_over_heads_are_per_image_and_unit(layout):
    """The residual ``o + v`` inside the heads holds its units on two dims (heads and channels):
    its activations are the per-image mean of each unit, as the attribution's statistics are
    (they were read as if the units were on dim 1)."""
    m, _ = _pair(15, dict(layout=layout), dict(layout=layout))
    x, y = _data(16)
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu")
    li = next(i for i, l in enumerate(g.layers) if l.kind == "residual")  # o + v, the first
    name = g.layers[li].name
    a = cn.extract.activations(m, x, layers=[name], device="cpu")[name]
    assert a.shape == (x.shape[0], C)
    np.testing.assert_allclose(a.mean(0), g.node_attr("activation_mean")[g.node_layer == li], rtol=1e-5, atol=1e-6)
