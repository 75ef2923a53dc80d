"""Positions folded into the batch dim and back (Swin's window partition, LeViT's
``flatten(0, 1)``): each batch row remembers its image, so the flows equal those of the same
model written without the fold (attention over all tokens with a block-diagonal mask, a
BatchNorm over the channels of a token tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError

H = W = 4  # tokens per side
WS = 2  # window side
C = 8


def _data(seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2 * H, 2 * W, generator=gen, dtype=torch.float64) * 2
    return x, torch.tensor([0, 3, 1][:n])


def _same_window(shift: int) -> torch.Tensor:
    """(H*W, H*W) bool: whether two tokens share a window after a cyclic shift by ``shift``."""
    h, w = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    win = (((h - shift) % H) // WS * (W // WS) + ((w - shift) % W) // WS).reshape(-1)
    return win[:, None] == win[None, :]


class WindowBlock(nn.Module):
    """Patch embedding, (shifted) window attention over 2 heads, residual, LayerNorm, mean, head.

    ``windowed=True`` partitions the (B, H, W, C) map into windows folded into the batch dim, as
    timm's Swin does (``view``/``permute``/``reshape``, ``torch.roll`` for the shift);
    ``windowed=False`` computes the same function on all tokens with a block-diagonal mask.
    """

    def __init__(self, windowed: bool, shift: int = 0):
        super().__init__()
        self.windowed, self.shift = windowed, shift
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4)
        self.register_buffer("mask", _same_window(shift))

    def attend(self, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(rows, tokens, C) -> (rows, tokens, C): multi-head attention among the tokens of a row."""
        r, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(r, n, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(a.transpose(1, 2).reshape(r, n, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        b = t.shape[0]
        if self.windowed:
            s = torch.roll(t, (-self.shift, -self.shift), (1, 2)) if self.shift else t
            s = s.view(b, H // WS, WS, W // WS, WS, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, WS * WS, C)
            s = self.attend(s, None)
            s = s.view(b, H // WS, W // WS, WS, WS, C).permute(0, 1, 3, 2, 4, 5).reshape(b, H, W, C)
            a = torch.roll(s, (self.shift, self.shift), (1, 2)) if self.shift else s
        else:
            a = self.attend(t.reshape(b, H * W, C), self.mask).reshape(b, H, W, C)
        y = self.norm(t + a)
        return self.fc(y.mean((1, 2)))


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    b.load_state_dict(a.state_dict())



@pytest.mark.parametrize("shift", [0, 1], ids=["windows", "shifted windows"])
def test_window_attention_equals_masked_attention_over_all_tokens(shift, exact_graph, same_graph):
    torch.manual_seed(3)
    windowed = WindowBlock(True, shift).double().eval()
    masked = WindowBlock(False, shift).double().eval()
    _same_weights(windowed, masked)
    x, y = _data(7)
    with torch.no_grad():  # the two are the same function
        torch.testing.assert_close(windowed(x), masked(x), rtol=1e-12, atol=1e-12)
    g1 = exact_graph(windowed, x, y, weights=False, conservation=True)
    g2 = exact_graph(masked, x, y, weights=False, conservation=True)
    same_graph(g1, g2)
    # per image: statistics, |flow| per sample and the dataset examples sum an image's windows into it
    kw = dict(progress=False, device="cpu", per_sample=True, examples=2)
    p1, p2 = (cn.extract.attribution(m, (x, y), **kw) for m in (windowed, masked))
    same_graph(p1, p2, columns="per image")
    np.testing.assert_allclose(p1.edge_attr("abs_weight"), p2.edge_attr("abs_weight"), rtol=1e-12, atol=1e-12)


class TokenBN(nn.Module):
    """LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)`` on tokens, or the same BatchNorm written
    over the channels of (B, C, N) (``folded=False``)."""

    def __init__(self, folded: bool):
        super().__init__()
        self.folded = folded
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.lin = nn.Linear(C, C)
        self.bn = nn.BatchNorm1d(C)
        self.fc = nn.Linear(C, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.lin(self.embed(x).flatten(2).transpose(1, 2))  # (B, N, C)
        if self.folded:
            t = self.bn(t.flatten(0, 1)).reshape_as(t)
        else:
            t = self.bn(t.transpose(1, 2)).transpose(1, 2)
        return self.fc(F.relu(t).mean(1))


def test_batchnorm_over_tokens_folded_into_the_batch(exact_graph, same_graph):
    torch.manual_seed(4)
    folded, plain = TokenBN(True).double().eval(), TokenBN(False).double().eval()
    _same_weights(folded, plain)
    x, y = _data(8)
    g1 = exact_graph(folded, x, y, weights=False, conservation=True)
    g2 = exact_graph(plain, x, y, weights=False, conservation=True)
    same_graph(g1, g2)


class Mixer(nn.Module):
    """Rolls the batch: each row of the result is another image."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.roll(self.embed(x), 1, 0).mean((2, 3)))


def test_a_roll_over_the_batch_is_refused():
    x, y = _data(9)
    with pytest.raises(ExtractionError, match="mixes the images of a batch"):
        cn.extract.attribution(Mixer().double().eval(), (x, y), progress=False, device="cpu")


class Patches(nn.Module):
    """MobileViT's unfold into patches: the pixels of each 2x2 patch folded into the batch, the
    patches as tokens, channels last, a Linear over them, and back. ``via_channels=True`` goes
    as timm does, through a reshape that folds the channels into the batch for a step
    (``(B * C * nh, ph, nw, pw)``); ``False`` goes there by one permute."""

    def __init__(self, via_channels: bool):
        super().__init__()
        self.via_channels = via_channels
        self.embed, self.mix, self.fc = nn.Conv2d(3, C, 1), nn.Linear(C, C), nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, c, hh, ww = h.shape
        nh, nw = hh // 2, ww // 2
        if self.via_channels:
            t = h.reshape(b * c * nh, 2, nw, 2).transpose(1, 2)
            t = t.reshape(b, c, nh * nw, 4).transpose(1, 3).reshape(b * 4, nh * nw, c)
        else:
            t = h.reshape(b, c, nh, 2, nw, 2).permute(0, 3, 5, 2, 4, 1).reshape(b * 4, nh * nw, c)
        t = torch.relu(self.mix(t))
        h = t.reshape(b, 2, 2, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, hh, ww)
        return self.fc(h.mean((2, 3)))


def test_channels_folded_into_the_batch_for_a_step_are_followed_to_the_patches(exact_graph):
    torch.manual_seed(3)
    a, b = Patches(True).double().eval(), Patches(False).double().eval()
    b.load_state_dict(a.state_dict())
    x, y = _data(4)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    ga, gb = exact_graph(a, x, y, conservation=True), exact_graph(b, x, y, conservation=True)
    np.testing.assert_array_equal(ga.src, gb.src)
    np.testing.assert_array_equal(ga.weight, gb.weight)
    np.testing.assert_array_equal(ga.node_attr("attribution"), gb.node_attr("attribution"))


def test_channels_left_in_the_batch_are_refused():
    class Left(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = nn.Conv2d(3, C, 1), nn.Linear(4, 4)

        def forward(self, x):
            h = self.embed(x)
            t = h.reshape(h.shape[0] * C, -1)[:, :4]  # channels stay in the batch
            return self.fc(t).reshape(h.shape[0], C, 4).mean(1)

    x, y = _data(5)
    # the batch rows of an image hold its channels (followed, as heads folded into the batch are);
    # a Linear over them would share its weights between units
    with pytest.raises(ExtractionError, match="module 'fc' reads a tensor whose units are partly in its batch dim"):
        cn.extract.attribution(Left().double().eval(), (x, y), progress=False)
