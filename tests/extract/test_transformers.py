"""Vision transformers: the attention rule against a hand-linearised copy of a torchvision ViT.

The copy spells every rule out: the attention pattern ``softmax(q k^T / sqrt(d))`` and the
LayerNorm statistics are detached, GELU goes by the identity rule. Its ``x * dT/dx`` per
input channel must equal the graph's input attribution, every hidden unit must conserve
flow, and the edges into the V projection of one block must equal a brute-force computation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402


def _vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
                          num_classes=5)
    with torch.no_grad():  # torchvision zero-initialises the head and biases: give every weight a value
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.eval().double()


def _ln(x, ln):
    mu, var = x.mean(-1, keepdim=True).detach(), x.var(-1, unbiased=False, keepdim=True).detach()
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _gelu(x):
    xd = x.detach()
    r = torch.where(xd != 0, F.gelu(xd) / torch.where(xd != 0, xd, torch.ones_like(xd)), torch.zeros_like(xd))
    return x * r


def _attention(x, mha, keep: dict | None = None, name: str = ""):
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    W, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (F.linear(x, W[i * e:(i + 1) * e], b[i * e:(i + 1) * e]) for i in range(3))
    if keep is not None:
        v.retain_grad()
        keep[name] = (x, v)
    split = lambda z: z.reshape(z.shape[0], z.shape[1], h, d).transpose(1, 2)  # noqa: E731
    pattern = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), -1).detach()
    out = (pattern @ split(v)).transpose(1, 2).reshape(x.shape)
    return mha.out_proj(out)


def _hand(m: VisionTransformer, x: torch.Tensor, keep: dict | None = None) -> torch.Tensor:
    t = m._process_input(x)
    t = torch.cat([m.class_token.expand(t.shape[0], -1, -1), t], dim=1) + m.encoder.pos_embedding
    for i, blk in enumerate(m.encoder.layers):
        a = _attention(_ln(t, blk.ln_1), blk.self_attention, keep, f"block{i}") + t
        mlp = blk.mlp
        t = a + mlp[3](_gelu(mlp[0](_ln(a, blk.ln_2))))
    return m.heads(_ln(t, m.encoder.ln)[:, 0])


def test_vit_attention_rule_against_hand_linearisation(exact_graph):
    m = _vit()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu")
    with torch.no_grad():
        T = m(x).gather(1, y[:, None]).sum().item()
    assert g.meta["exact"] is True
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-12)
    assert any(r.startswith("attention") for r in g.meta["rules"])
    # the hand copy: input attribution per channel
    xr = x.clone().requires_grad_(True)
    keep: dict = {}
    Th = _hand(m, xr, keep).gather(1, y[:, None]).sum()
    assert Th.item() == pytest.approx(T, rel=1e-12)
    Th.backward()
    expect = (xr * xr.grad).sum((0, 2, 3)).detach().numpy()
    np.testing.assert_allclose(g.node_attr("attribution")[g.layer_slice("input")], expect, rtol=1e-10, atol=1e-12)
    # conservation at every hidden unit; q and k carry no flow
    exact_graph(m, x, y, weights=False, conservation=True)
    a = g.node_attr("attribution")
    for part in ("q", "k"):
        assert np.all(a[g.layer_slice(f"encoder.layers.encoder_layer_1.self_attention.{part}")] == 0)
    # brute force on the V projection of block 1: edge ln_1-input unit i -> v unit j
    xin, v = keep["block1"]
    gv = v.grad
    e = m.encoder.layers[1].self_attention.embed_dim
    Wv = m.encoder.layers[1].self_attention.in_proj_weight[2 * e:]
    E = np.zeros((e, e))
    for i in range(e):
        xi = torch.zeros_like(xin)
        xi[..., i] = xin[..., i]
        E[:, i] = (gv * F.linear(xi, Wv)).sum((0, 1)).detach().numpy()
    src = "encoder.layers.encoder_layer_0.add_1"  # the residual stream entering block 1
    i, j, vals = g.edge_block(src, "encoder.layers.encoder_layer_1.self_attention.v")
    got = np.zeros((e, e))
    got[j, i] = vals
    np.testing.assert_allclose(got, E, rtol=1e-9, atol=1e-12)


def test_vit_weight_connectome_holds_the_projections():
    m = _vit().float()
    g = cn.extract.weights(m, (3, 16, 16))
    e = 8
    i, j, v = g.edge_block("encoder.layers.encoder_layer_0.self_attention.v",
                           "encoder.layers.encoder_layer_0.self_attention.out_proj")
    W = m.encoder.layers[0].self_attention.out_proj.weight.detach().double().numpy()
    np.testing.assert_allclose(v, W[j, i], rtol=1e-6)
    i, j, v = g.edge_block("encoder.layers.encoder_layer_0.ln_1" if "encoder.layers.encoder_layer_0.ln_1" in
                           g.layer_names else "conv_proj", "encoder.layers.encoder_layer_0.self_attention.k")
    Wk = m.encoder.layers[0].self_attention.in_proj_weight[e:2 * e].detach().double().numpy()
    np.testing.assert_allclose(v, Wk[j, i], rtol=1e-6)


@pytest.mark.slow
def test_vit_b_16_extracts_exactly(exact_graph):
    torch.manual_seed(0)
    m = torchvision.models.vit_b_16(weights=None, num_classes=10).eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    exact_graph(m, x, torch.tensor([3]), weights=False)  # its zero-initialised head gets random weights


def test_attention_with_a_mask_is_refused():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)
            self.mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
            self.fc = torch.nn.Linear(4, 2)
            self.register_buffer("mask", torch.ones(16, 16, dtype=torch.bool).triu(1))

        def forward(self, x):
            t = self.proj(x.flatten(2).transpose(1, 2))
            a, _ = self.mha(t, t, t, attn_mask=self.mask)
            return self.fc(a.mean(1))

    with pytest.raises(ExtractionError, match="MultiheadAttention 'mha'.*masks") as info:
        cn.extract.weights(Masked(), (3, 4, 4))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_shifted_windows_and_patch_merging(v2, exact_graph):
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer, SwinTransformerBlockV2)

    torch.manual_seed(0)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    m = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                        num_classes=5, **kw).eval().double()
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # pads 5x5 maps
    y = torch.tensor([1, 4])
    g = exact_graph(m, x, y, weights=False, conservation=True)
    # patch merging joins four position groups of the same units: a concat of 4 x 8 units
    merge = [l for l in g.layers if l.kind == "concat"]
    assert merge and merge[0].size == 32
    # q and k units of a window attention carry no flow; v units do
    qkv = g.layer_slice("features.1.0.attn.qkv")
    a = g.node_attr("attribution")[qkv]
    assert np.all(a[:16] == 0) and np.any(a[16:] != 0)


def test_maxvit_hand_written_attention(exact_graph):
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    m = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
               head_dim=4, stochastic_depth_prob=0.0, num_classes=5).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3])
    g = exact_graph(m, x, y, weights=False, conservation=True)
    assert any(r.startswith("attention") for r in g.meta["rules"]) and any(r.startswith("gate") for r in g.meta["rules"])


def test_vit_per_sample_and_contraction():
    m = _vit(3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 0, 4])
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu", per_sample=True)
    # per-sample |flow| of every edge is the sum over images of the per-image |flow|
    ones = [cn.extract.attribution(m, (x[i:i + 1], y[i:i + 1]), progress=False, device="cpu") for i in range(3)]
    expect = sum(np.abs(o.weight.astype(np.float64)) for o in ones)
    np.testing.assert_allclose(g.edge_attr("abs_weight"), expect, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g.weight, sum(o.weight for o in ones), rtol=1e-9, atol=1e-12)
    # contraction onto the residual stream conserves the flow
    keep = ["encoder.layers.encoder_layer_0.add_1", "encoder.layers.encoder_layer_1.add_1"]
    c = cn.extract.attribution(m, (x, y), progress=False, device="cpu", layers=keep)
    assert [l.name for l in c.layers] == ["input", *keep, "logits"]
    A = c.node_attr("attribution")
    assert A[c.layer_slice("input")].sum() + c.node_attr("bias_attribution").sum() == pytest.approx(
        c.meta["target_total"], rel=1e-9)


def test_vit_heads_are_a_node_attribute():
    g = cn.extract.weights(_vit().float(), (3, 16, 16))
    head = g.node_attr("head")
    v = g.layer_slice("encoder.layers.encoder_layer_0.self_attention.v")
    assert head[v].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # 8 units, 2 heads of 4
    assert np.all(head[g.layer_slice("conv_proj")] == -1)
