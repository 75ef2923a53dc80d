"""Products of two data tensors, attention in its written forms, and attention across channels.

Each small model is compared with a hand-written copy with the rule spelled out: the product
as ``0.5 * (a.detach() * b + a * b.detach())``, the attention pattern ``.detach()``ed; flows of
a layer by hand are ``W * dT/dW`` of that copy (for attention across channels, ``A * dT/dA`` of
the per-image pattern ``A``, summed over images).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn


def _data(seed: int, n: int = 3, size: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def _hand(m: nn.Module, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Input attribution per channel of the hand copy ``m.run(x, hand=True)``, and ``leaf * dT/dleaf``."""
    x = x.clone().requires_grad_(True)
    wrt = [x] + ([leaf] if leaf is not None else [])
    grads = torch.autograd.grad(m.run(x, hand=True).gather(1, y[:, None]).sum(), wrt)
    per_leaf = (leaf * grads[1]).detach() if leaf is not None else None
    return (x * grads[0]).sum((0, 2, 3)).detach().numpy(), per_leaf


def _close(got: np.ndarray, expect: np.ndarray) -> None:
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expect).max()))


def _dense(g: cn.Connectome, src: str, dst: str) -> np.ndarray:
    i, j, w = g.edge_block(src, dst)
    out = np.zeros((g.layer(dst).size, g.layer(src).size))
    out[j, i] = w
    return out


# ---------------------------------------------------------------------- products of two data tensors
class Star(nn.Module):
    """StarNet's block: ``act(f1(x)) * f2(x)``, or a square ``act(f1(x)) ** 2`` written as a product."""

    def __init__(self, square: bool):
        super().__init__()
        self.square = square
        self.embed = nn.Conv2d(3, 4, 3, padding=1)
        self.f1, self.f2, self.g = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        x = self.embed(x)
        a = F.relu(self.f1(x))
        b = a if self.square else self.f2(x)
        if hand:  # the product rule: each operand with the other held constant, half to each
            p = 0.5 * (a.detach() * b + a * b.detach())
        else:
            p = a * b
        return self.fc((x + self.g(p)).mean((2, 3)))


@pytest.mark.parametrize("square", [False, True], ids=["two operands", "square"])
def test_product_of_two_data_tensors_against_hand_linearisation(square, exact_graph):
    torch.manual_seed(3)
    m = Star(square).double().eval()
    x, y = _data(4)
    with torch.no_grad():
        torch.testing.assert_close(m.run(x, hand=True), m(x), rtol=0, atol=0)
    g = exact_graph(m, x, y, conservation=True)
    assert g.layer("mul").kind == "product"
    assert any(r.startswith("product") for r in g.meta["rules"])
    expect, e = _hand(m, x, y, m.f1.weight)  # the flows of f1 by hand: W * dT/dW, summed over the kernel
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "f1"), e.sum((2, 3)).numpy())
    # each operand's edge carries half the product's flow: 0.5 * sum(y * dT/dy) per unit
    a = g.node_attr("attribution", "mul")
    _close(_dense(g, "f1", "mul").diagonal(), a if square else 0.5 * a)
    if not square:
        _close(_dense(g, "f2", "mul").diagonal(), 0.5 * a)


class Focal(nn.Module):
    """FocalNet's modulation: a global context per channel times a per-position gate (both
    broadcast), summed with a gated local context, then ``q * h(context)``."""

    def __init__(self):
        super().__init__()
        self.f, self.h, self.fc = nn.Conv2d(3, 6, 1), nn.Conv2d(2, 2, 1), nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        product = (lambda a, b: 0.5 * (a.detach() * b + a * b.detach())) if hand else (lambda a, b: a * b)  # noqa: E731
        gate = (lambda s: s.detach()) if hand else (lambda s: s)  # noqa: E731  the gate rule: signal takes all
        q, ctx, gates = torch.split(self.f(x), (2, 2, 2), 1)
        context = product(F.relu(ctx.mean((2, 3), keepdim=True)), gates[:, 1:2]) + ctx * gate(gates[:, :1])
        return self.fc(product(q, self.h(context)).mean((2, 3)))


def test_product_of_two_broadcast_factors_against_hand_linearisation(exact_graph):
    torch.manual_seed(4)
    m = Focal().double().eval()
    x, y = _data(5)
    g = exact_graph(m, x, y, conservation=True)
    expect, _ = _hand(m, x, y)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    # (batch, 2, 1, 1) times (batch, 1, H, W): the context's channels 2, 3 of f each reach one
    # unit, the gate (channel 5 of f) reaches both; each carries half of the product's flow
    half = 0.5 * g.node_attr("attribution", "mul")
    block = _dense(g, "f", "mul")
    _close(block[:, 2:4].diagonal(), half)
    _close(block[:, 5], half)
    assert not block[:, [0, 1, 4]].any()


# ---------------------------------------------------------------------- gates whose signal mixes units
class Selective(nn.Module):
    """A selective kernel (two branches weighted by a softmax across them, per channel) and a
    hand-written RMS norm across channels (``x * rsqrt(mean(x ** 2, dim=1))``): both gates whose
    signal mixes units, which the gate rule holds constant."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.select = nn.Linear(4, 8)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        held = (lambda s: s.detach()) if hand else (lambda s: s)  # noqa: E731  the gate rule: signal takes all
        x = self.embed(x)
        x = x * held(torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-6))
        branches = torch.stack([self.b1(x), self.b2(x)], dim=1)  # (batch, 2, channels, H, W)
        s = self.select(branches.sum(1).mean((2, 3))).reshape(-1, 2, 4).softmax(dim=1)
        return self.fc((branches * held(s[..., None, None])).sum(1).mean((2, 3)))


def test_gate_whose_signal_mixes_units_against_hand_linearisation(exact_graph):
    torch.manual_seed(6)
    m = Selective().double().eval()
    x, y = _data(7)
    with torch.no_grad():
        torch.testing.assert_close(m.run(x, hand=True), m(x), rtol=0, atol=0)
    g = exact_graph(m, x, y, conservation=True)
    expect, e = _hand(m, x, y, m.b1.weight)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "b1"), e.sum((2, 3)).numpy())
    # the signal's layer is a dead end: it carries no flow
    assert not g.node_attr("attribution", "select").any()


def test_a_softmax_across_units_that_is_not_a_gate_signal_is_still_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 4)

        def forward(self, x):
            x = self.embed(x)
            return self.fc((x * x.softmax(dim=1) + x.softmax(dim=1)).mean((2, 3)))

    x, y = _data(8)
    with pytest.raises(cn.ExtractionError, match="softmax"):
        cn.extract.attribution(Mixer().double().eval(), (x, y), progress=False)


# ---------------------------------------------------------------------- attention in its written forms
class Forms(nn.Module):
    """Hand-written attention over 9 tokens and 2 heads: class attention (only the class token
    queries), talking heads with attention biases, and ``v @ attn^T`` on channels-first tokens."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.embed = nn.Conv2d(3, 8, 2, stride=2)  # 6x6 -> 9 tokens
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.talk1, self.talk2 = nn.Linear(2, 2), nn.Conv2d(2, 2, 1)  # mixes over heads, before and after softmax
        self.bias = nn.Parameter(torch.randn(2, 9, 9))
        self.drop = nn.Dropout(0.1)
        self.softmax = nn.Softmax(dim=-1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        n, tokens, c = t.shape
        heads = lambda z: z.reshape(n, -1, 2, 4).transpose(1, 2)  # noqa: E731
        pattern = (lambda a: a.detach()) if hand else (lambda a: a)  # noqa: E731  the rule: held constant
        if self.form == "class":
            q, k, v = heads(self.q(t[:, 0]).unsqueeze(1)), heads(self.k(t)), heads(self.v(t))
            a = self.drop((q * 0.5 @ k.transpose(-2, -1)).softmax(-1))
            return self.fc((pattern(a) @ v).transpose(1, 2).reshape(n, c))
        if self.form == "gated":  # ConViT: a gated sum of a content and a position softmax, renormalised
            q, k, v = heads(self.q(t)), heads(self.k(t)), heads(self.v(t))
            g = torch.sigmoid(self.bias[:, :1, :1])
            a = (1.0 - g) * (q @ k.transpose(-2, -1) * 0.5).softmax(-1) + g * self.bias.softmax(-1)
            a = a / a.sum(-1).unsqueeze(-1)
            return self.fc((pattern(a) @ v).transpose(1, 2).reshape(n, tokens, c).mean(1))
        if self.form == "module":  # the softmax as a module (timm's Swin)
            q, k, v = heads(self.q(t)), heads(self.k(t)), heads(self.v(t))
            a = self.drop(self.softmax((q * 0.5) @ k.transpose(-2, -1) + self.bias))
            return self.fc((pattern(a) @ v).transpose(1, 2).reshape(n, tokens, c).mean(1))
        if self.form == "talking":
            q, k, v = heads(self.q(t)), heads(self.k(t)), heads(self.v(t))
            s = q @ k.transpose(-2, -1) * 0.5 + self.bias
            a = self.talk1(s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
            a = self.drop(self.talk2(a))
            return self.fc((pattern(a) @ v).transpose(1, 2).reshape(n, tokens, c).mean(1))
        q, k, v = (f(t).transpose(1, 2) for f in (self.q, self.k, self.v))  # (batch, channels, tokens)
        a = (q.transpose(-2, -1) @ k * 0.3).softmax(-1)
        return self.fc((v @ pattern(a).transpose(-2, -1)).mean(2))


@pytest.mark.parametrize("form", ["class", "talking", "right", "module", "gated"])
def test_written_attention_forms_against_hand_linearisation(form, exact_graph):
    torch.manual_seed(5)
    m = Forms(form).double().eval()
    x, y = _data(6)
    g = exact_graph(m, x, y, conservation=True)
    assert any(r.startswith("attention") for r in g.meta["rules"])
    assert [l.name for l in g.layers] == ["input", "embed", "q", "k", "v", "logits"]  # talking heads: in the pattern
    expect, e = _hand(m, x, y, m.v.weight)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "v"), e.numpy())
    a = g.node_attr("attribution")
    assert np.all(a[g.layer_slice("q")] == 0) and np.all(a[g.layer_slice("k")] == 0)


class StateSpace(nn.Module):
    """Matrix products of two data tensors with no softmax before them: EfficientViM's
    state-space mixer (``x @ (softmax(a) * b)^T``, then ``h @ c``) and linear attention
    (``q @ (k^T @ v)``). The rule holds the operand whose units are summed over (or, when
    both could carry the flow, the left one) constant, as it holds an attention pattern."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.embed = nn.Conv2d(3, 8, 2, stride=2)  # 6x6 -> 9 positions
        self.bcd = nn.Conv1d(8, 12, 1)  # b, c and dt: 4 states each
        self.A = nn.Parameter(torch.randn(4))
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.proj = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2)  # (batch, channels, positions)
        held = (lambda a: a.detach()) if hand else (lambda a: a)  # noqa: E731  the rule: held constant
        if self.form == "ssd":
            b, c, dt = self.bcd(t).split(4, dim=1)
            a = (dt + self.A.view(1, -1, 1)).softmax(-1)  # over positions, per state
            h = self.proj(t @ held(a * b).transpose(-2, -1))  # (batch, channels, states)
            return self.fc((h @ held(c)).mean(2))
        tt = t.transpose(1, 2)  # (batch, positions, channels)
        q, k, v = F.relu(self.q(tt)), F.relu(self.k(tt)), self.v(tt)
        if self.form == "lite":  # EfficientViT: 2 heads, a column of ones beside v gives the normaliser
            q, k, v = (z.reshape(z.shape[0], 9, 2, 4).transpose(1, 2) for z in (q, k, v))
            out = held(q) @ (held(k).transpose(-2, -1) @ F.pad(v, (0, 1), value=1.0))
            out = out[..., :-1] / held(out[..., -1:] + 0.1)
            return self.fc(out.transpose(1, 2).reshape(out.shape[0], 9, 8).mean(1))
        kv = held(k).transpose(-2, -1) @ v  # (batch, k's channels, v's channels)
        return self.fc((held(q) @ kv).mean(1))


@pytest.mark.parametrize("form", ["ssd", "linear", "lite"])
def test_products_of_data_without_softmax_hold_one_operand_against_hand_linearisation(form, exact_graph):
    torch.manual_seed(7)
    m = StateSpace(form).double().eval()
    x, y = _data(8)
    g = exact_graph(m, x, y, conservation=True)
    leaf = m.proj.weight if form == "ssd" else m.v.weight
    expect, e = _hand(m, x, y, leaf)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "proj" if form == "ssd" else "v"), e.sum(-1).numpy() if form == "ssd" else e.numpy())
    a = g.node_attr("attribution")
    held = ["bcd"] if form == "ssd" else ["q", "k"]
    assert all(np.all(a[g.layer_slice(n)] == 0) for n in held)


class Divided(nn.Module):
    """Data divided by a smaller data tensor computed from it: a hand-written ``x / |x|`` over
    the channels of each token. The divisor is a gate's signal, held constant."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        norm = t.norm(dim=-1, keepdim=True) + 0.1
        return self.fc((t / (norm.detach() if hand else norm)).mean(1))


def test_data_divided_by_a_smaller_data_tensor_against_hand_linearisation(exact_graph):
    torch.manual_seed(11)
    m = Divided().double().eval()
    x, y = _data(12)
    g = exact_graph(m, x, y, conservation=True)
    expect, e = _hand(m, x, y, m.fc.weight)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "logits"), e.numpy())
    assert any(r.startswith("gate") for r in g.meta["rules"])


class Factorised(nn.Module):
    """CoaT's factorised attention and convolutional position encoding on (batch, heads,
    tokens, channels), before the heads are merged: ``q @ (softmax_tokens(k)^T @ v)``, the
    product ``q * conv(v)`` and the sum of both (units on two dims: heads and channels)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)  # 6x6 -> 9 tokens
        self.qkv = nn.Linear(8, 24)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        n = t.shape[0]
        q, k, v = self.qkv(t).reshape(n, 9, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, tokens, 4)
        held = (lambda a: a.detach()) if hand else (lambda a: a)  # noqa: E731  the rule: held constant
        att = held(q) @ (held(k.softmax(dim=2)).transpose(-1, -2) @ v)
        cv = self.conv(v.transpose(-1, -2).reshape(n, 8, 3, 3)).reshape(n, 2, 4, 9).transpose(-1, -2)
        prod = 0.5 * (q.detach() * cv + q * cv.detach()) if hand else q * cv  # the product rule
        return self.fc((0.5 * att + prod).transpose(1, 2).reshape(n, 9, 8).mean(1))


def test_products_and_sums_on_heads_and_channels_against_hand_linearisation(exact_graph):
    torch.manual_seed(9)
    m = Factorised().double().eval()
    x, y = _data(10)
    g = exact_graph(m, x, y, conservation=True)
    expect, e = _hand(m, x, y, m.qkv.weight)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "qkv"), e.numpy())
    assert g.layer("mul").size == g.layer("add").size == 8  # 2 heads x 4 channels


class Rotary(nn.Module):
    """``F.scaled_dot_product_attention`` on queries and keys with rotary embeddings (the halves
    of each head swapped and negated, a map between units): only the pattern reads them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)  # 6x6 -> 9 tokens
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 4)
        angle = torch.rand(9, 4, generator=torch.Generator().manual_seed(1)) * 3  # float32 values: the weight check rounds to float32
        self.register_buffer("cos", angle.cos())
        self.register_buffer("sin", angle.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def rope(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.cos + torch.cat([-z[..., 2:], z[..., :2]], dim=-1) * self.sin

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        n, tokens, _ = t.shape
        q, k, v = self.qkv(t).reshape(n, tokens, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rope(q), self.rope(k)
        if hand:  # the attention rule: the pattern held constant
            a = (q @ k.transpose(-2, -1) / 2.0).softmax(-1).detach()
            out = a @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.fc(out.transpose(1, 2).reshape(n, tokens, 8).mean(1))


def test_attention_on_rotary_queries_and_keys_against_hand_linearisation(exact_graph):
    torch.manual_seed(7)
    m = Rotary().double().eval()
    x, y = _data(9)
    with torch.no_grad():
        torch.testing.assert_close(m.run(x, hand=True), m(x), rtol=1e-12, atol=1e-12)
    g = exact_graph(m, x, y, conservation=True)
    expect, e = _hand(m, x, y, m.qkv.weight)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "qkv"), e.numpy())


class Probe(nn.Module):
    """Attention pooling (SigLIP's head): a learned query attends over the tokens."""

    def __init__(self, module: bool):
        super().__init__()
        self.module = module
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.probe = nn.Parameter(torch.randn(1, 1, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        q = self.probe.expand(t.shape[0], -1, -1)
        if self.module:
            return self.fc(self.attn(q, t, t, need_weights=False)[0][:, 0])
        k, v = self.k(t), self.v(t)
        if hand:  # the attention rule: the pattern held constant
            return self.fc(((q @ k.transpose(1, 2) / math.sqrt(8)).softmax(-1).detach() @ v)[:, 0])
        return self.fc(F.scaled_dot_product_attention(q, k, v)[:, 0])


def test_attention_pooling_by_a_constant_query_against_hand_linearisation(exact_graph):
    torch.manual_seed(8)
    m = Probe(module=False).double().eval()
    x, y = _data(10)
    g = exact_graph(m, x, y, conservation=True)
    expect, e = _hand(m, x, y, m.v.weight)
    _close(g.node_attr("attribution")[g.layer_slice("input")], expect)
    _close(_dense(g, "embed", "v"), e.numpy())
    assert not g.node_attr("attribution", "k").any()  # keys only shape the pattern
    exact_graph(Probe(module=True).double().eval(), x, y, conservation=True)  # nn.MultiheadAttention


# ---------------------------------------------------------------------- attention across channels
class XCA(nn.Module):
    """Cross-covariance attention (XCiT): q and k normalised along tokens, a pattern over the
    4 channels of each of 2 heads, applied to v's channels at every token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.qkv = nn.Linear(8, 24)
        self.temperature = nn.Parameter(torch.rand(2, 1, 1) + 0.5)
        self.proj, self.fc = nn.Linear(8, 8), nn.Linear(8, 4)
        self.leaf: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, hand=False)

    def run(self, x: torch.Tensor, hand: bool) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        n, tokens, c = t.shape
        q, k, v = self.qkv(t).reshape(n, tokens, 3, 2, 4).permute(2, 0, 3, 4, 1).unbind(0)  # (batch, heads, 4, tokens)
        a = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.temperature).softmax(-1)
        if hand:  # the per-image pattern held constant: a leaf, so that A * dT/dA gives its flows
            a = self.leaf = a.detach().requires_grad_(True)
        return self.fc(self.proj((a @ v).permute(0, 3, 1, 2).reshape(n, tokens, c)).mean(1))


def test_attention_across_channels_is_a_per_image_dense_map(exact_graph):
    torch.manual_seed(7)
    m = XCA().double().eval()
    x, y = _data(8)
    g = exact_graph(m, x, y, conservation=True)
    assert g.layer("mix").kind == "mix" and g.layer("mix").size == 8
    assert any(r.startswith("attention across channels") for r in g.meta["rules"])
    xx = x.clone().requires_grad_(True)
    out = m.run(xx, hand=True).gather(1, y[:, None]).sum()
    gx, ga = torch.autograd.grad(out, [xx, m.leaf])
    _close(g.node_attr("attribution")[g.layer_slice("input")], (xx * gx).sum((0, 2, 3)).detach().numpy())
    # edge v-unit (head h, channel j) -> mix unit (h, i): sum over images of A[h, i, j] * dT/dA[h, i, j];
    # v's channel (h, j) is qkv unit 16 + 4h + j
    per = (m.leaf * ga).sum(0).detach().numpy()
    expect = np.zeros((8, 24))
    for h in range(2):
        expect[4 * h:4 * h + 4, 16 + 4 * h:16 + 4 * h + 4] = per[h]
    _close(_dense(g, "qkv", "mix"), expect)
    # the weight graph has the same edges: a uniform pattern (rows sum to one) stands for A
    wg = cn.extract.weights(m, (3, 6, 6))
    _, _, w = wg.edge_block("qkv", "mix")
    np.testing.assert_allclose(w, 0.25, rtol=1e-6)


def test_attention_across_channels_per_sample_edges_sum_absolute_flows_per_image():
    torch.manual_seed(7)
    m = XCA().double().eval()
    x, y = _data(8)
    g = cn.extract.attribution(m, (x, y), progress=False, per_sample=True)
    per_image = []
    for i in range(x.shape[0]):
        gi = cn.extract.attribution(m, (x[i:i + 1], y[i:i + 1]), progress=False)
        per_image.append(_dense(gi, "qkv", "mix"))
    i, j, w = g.edge_block("qkv", "mix", attr="abs_weight")
    got = np.zeros((8, 24))
    got[j, i] = w
    _close(got, np.abs(np.stack(per_image)).sum(0))


# ---------------------------------------------------------------------- timm
_TIMM = ["starnet_s050", "mambaout_femto", "focalnet_tiny_srf", "cait_xxs24_224", "efficientformerv2_s0",
         "shvit_s1", "xcit_nano_12_p16_224", "edgenext_xx_small"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CONNECTOME_HEAVY"), reason="full-size timm models: set CONNECTOME_HEAVY=1")
@pytest.mark.parametrize("name", _TIMM)
def test_timm_families_with_products_and_written_attention_are_exact(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    x = torch.randn(2, *m.pretrained_cfg.get("input_size", (3, 224, 224)), dtype=torch.float64)
    y = torch.tensor([1, 2])
    g = cn.extract.attribution(m, (x, y), progress=False)
    with torch.no_grad():
        T = m(x).gather(1, y[:, None]).sum().item()
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-12)
    assert g.meta["completeness_relative"] <= 1e-9
