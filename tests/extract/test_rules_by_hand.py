"""Gaps of the second mutation audit in the rules and the tracing (issue 24, items 1-5 and 11).

Each test checks the graph against a computation written here by hand: a copy of the model
with the rule spelled out (``detach()`` on what the rule holds constant), the bias terms
summed from autograd gradients of that copy, or weight-graph edges from the model's weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn


def _data(seed: int, n: int = 3, c: int = 3, size: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=gen, dtype=torch.float64) * 2, torch.randint(0, classes, (n,), generator=gen)


def _input_attribution(forward, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``x * dT/dx`` per input channel of a hand-linearised forward."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(forward(x).gather(1, y[:, None]).sum(), x)
    return (x * g).sum((0, 2, 3)).detach().numpy()


def _assert_input_attribution(g: cn.Connectome, expect: np.ndarray) -> None:
    got = g.node_attr("attribution")[g.layer_slice("input")]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))


def _identity(f, x: torch.Tensor) -> torch.Tensor:
    """The identity rule by hand: ``f(0) + x * r``, ``r = (f(x) - f(0)) / x`` held constant, 0 where x is 0."""
    f0 = f(torch.zeros((), dtype=x.dtype))
    xd = x.detach()
    nz = xd != 0
    r = torch.where(nz, (f(xd) - f0) / torch.where(nz, xd, torch.ones_like(xd)), torch.zeros_like(xd))
    return f0 + x * r


# ---------------------------------------------------------------------- 1. identity rule at an exact zero
def test_identity_rule_with_an_exact_zero_input_stays_finite_and_exact(exact_graph):
    # A conv without bias maps a black image (and a black patch of another) to exact zeros,
    # which GELU then sees: r = (f(x) - f(0)) / x is 0/0 there, and must be taken as 0.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.GELU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                      nn.Linear(5 * 16, 4)).double().eval()
    x, y = _data(11, n=3, size=8)
    x[0] = 0.0  # a black image
    x[1, :, :4, :4] = 0.0  # a black patch: conv outputs at (0..1, 0..1) are exact zeros
    with torch.no_grad():
        assert (m[0](x[1:2])[0, :, :2, :2] == 0).all() and (m[0](x[:1]) == 0).all()
    g = exact_graph(m, x, y, weights=False, conservation=True)
    for column in (g.weight, g.node_attr("attribution"), g.node_attr("bias_attribution")):
        assert np.isfinite(column).all()
    _assert_input_attribution(g, _input_attribution(lambda t: m[4](m[2](_identity(F.gelu, m[0](t))).flatten(1)), x, y))


# ---------------------------------------------------------------------- 2. constant tokens after the data
class Tokens(nn.Module):
    """Patch tokens with constant tokens joined around them: register tokens before, a class token after."""

    def __init__(self, registers: int):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)  # 6x6 -> 9 patch tokens
        self.registers = nn.Parameter(torch.randn(1, registers, 6)) if registers else None
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.mlp, self.fc = nn.Linear(6, 5), nn.Linear(5, 4)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        parts = [t, self.cls.expand(t.shape[0], -1, -1)]
        if self.registers is not None:
            parts.insert(0, self.registers.expand(t.shape[0], -1, -1))
        return torch.cat(parts, dim=1)

    def head(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.mlp(t)).mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x))


@pytest.mark.parametrize("registers", [0, 2], ids=["class token after the patches", "registers, patches, class token"])
def test_constant_tokens_at_an_offset_are_bias_terms_where_they_sit(registers, exact_graph):
    torch.manual_seed(1)
    m = Tokens(registers).double().eval()
    x, y = _data(12)
    g = exact_graph(m, x, y, weights=False, conservation=True)
    # by hand: the embedding's bias term is its conv bias at the patch tokens plus the
    # constant tokens' values times dT/dA where they sit
    t = m.tokens(x).detach().requires_grad_(True)
    (gt,) = torch.autograd.grad(m.head(t).gather(1, y[:, None]).sum(), t)
    const = torch.zeros(t.shape[1], dtype=torch.bool)
    const[:registers] = True
    const[-1] = True
    expect = (m.embed.bias * gt[:, ~const]).sum((0, 1)) + (t[:, const] * gt[:, const]).sum((0, 1))
    np.testing.assert_allclose(g.node_attr("bias_attribution", "embed"), expect.detach().numpy(), rtol=1e-10, atol=1e-12)
    _assert_input_attribution(g, _input_attribution(m, x, y))


# ---------------------------------------------------------------------- 3. SDPA with a causal or boolean mask
class SDPA(nn.Module):
    """Patch tokens, q/k/v Linear maps, ``F.scaled_dot_product_attention`` over 2 heads with a mask."""

    def __init__(self, causal: bool, mask: torch.Tensor | None):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)  # 6x6 -> 9 tokens
        self.q, self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)
        self.causal = causal
        self.register_buffer("mask", mask)

    @staticmethod
    def split(z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (2, 4)).transpose(1, 2)  # (batch, heads, tokens, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.split(self.q(t)), self.split(self.k(t)), self.split(self.v(t))
        if hand:  # the attention rule: the pattern from detached q and k, the mask applied by hand
            s = q.detach() @ k.detach().transpose(-1, -2) / math.sqrt(4)
            allowed = torch.ones(9, 9, dtype=torch.bool).tril() if self.causal else self.mask
            a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).detach() @ v
        elif self.causal:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.fc(self.out(a.transpose(1, 2).flatten(2)).mean(1))


def _random_mask() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(9, 9, generator=gen) < 0.5
    mask.fill_diagonal_(True)  # every query sees at least itself
    assert not torch.equal(mask, mask.T) and not torch.equal(mask, mask.tril())
    return mask


@pytest.mark.parametrize("causal", [True, False], ids=["is_causal", "boolean attn_mask"])
def test_sdpa_masks_against_hand_linearisation(causal, exact_graph):
    torch.manual_seed(2)
    m = SDPA(causal, None if causal else _random_mask()).double().eval()
    x, y = _data(13)
    with torch.no_grad():  # the hand copy computes the model's function
        torch.testing.assert_close(m.run(x, hand=True), m(x), rtol=1e-12, atol=1e-12)
    g = exact_graph(m, x, y, weights=False, conservation=True)
    assert any(r.startswith("attention") for r in g.meta["rules"])
    _assert_input_attribution(g, _input_attribution(lambda t: m.run(t, hand=True), x, y))
    a = g.node_attr("attribution")
    assert np.all(a[g.layer_slice("q")] == 0) and np.all(a[g.layer_slice("k")] == 0)


# ---------------------------------------------------------------------- 4. Python numbers folded into weights
def test_python_number_operands_fold_into_the_weight_graph():
    class Numbers(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = F.relu(2.5 - self.c1(x))  # slope -1 on the units of c1
            h = F.relu(self.c2(h) / 4.0)  # factor 1/4 on the units of c2
            return self.fc(self.c3(h).mean((2, 3)))

    torch.manual_seed(3)
    m = Numbers().eval()
    g = cn.extract.weights(m, (3, 6, 6))

    def block(src: str, dst: str) -> np.ndarray:
        i, j, v = g.edge_block(src, dst)
        out = np.zeros((g.layer(dst).size, g.layer(src).size))
        out[j, i] = v
        return out

    kernel = lambda conv: conv.weight.detach().double().sum((2, 3)).numpy()  # noqa: E731
    np.testing.assert_allclose(block("input", "c1"), -1.0 * kernel(m.c1), rtol=1e-6)
    np.testing.assert_allclose(block("c1", "c2"), kernel(m.c2) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(block("c2", "c3"), kernel(m.c3), rtol=1e-6)


# ---------------------------------------------------------------------- 5. Swin: window == feature map
def test_swin_stage_whose_map_equals_the_window_is_not_shifted(exact_graph):
    # 16 px, patches of 4: a 4x4 map in stage 1 (windows of 2, shifted by 1), then 2x2 after
    # patch merging, the size of the window: no shift there (Swin-T's last stage at 224 px)
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(4)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                        num_classes=5).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([1, 3])
    exact_graph(m, x, y, weights=False, conservation=True)  # its target_total is the model's own logits


# ---------------------------------------------------------------------- 11. clamp constants per batch
def test_relu6_constant_is_recomputed_for_every_batch():
    # two batches saturate different positions: a constant kept from the first batch would
    # book the bound where the second batch does not saturate
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 16, 4)).double().eval()
    with torch.no_grad():
        m[0].weight.mul_(3.0)
    x, y = _data(14, n=4, size=6)
    x[:2] *= 3.0  # the first batch saturates widely, the second at a few other places
    with torch.no_grad():
        z = m[0](x)
    sat = z >= 6
    assert sat[:2].sum() > 3 * sat[2:].sum() > 0
    g = cn.extract.attribution(m, (x, y), progress=False, device="cpu", batch_size=2)
    # by hand, per unit of the conv: its bias times dT/dz, plus the bound 6 times dT/dy where saturated
    zr = z.detach().requires_grad_(True)
    out = F.relu6(zr)
    out.retain_grad()
    m[3](out.flatten(1)).gather(1, y[:, None]).sum().backward()
    expect = (m[0].bias[None, :, None, None] * zr.grad).sum((0, 2, 3)) + (6.0 * sat * out.grad).sum((0, 2, 3))
    np.testing.assert_allclose(g.node_attr("bias_attribution", "0"), expect.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert abs(g.meta["completeness_residual"]) <= 1e-10 * max(1.0, abs(g.meta["target_total"]))
