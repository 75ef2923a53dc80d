"""Tracing remembers the units a layout op gives per layout (the blocks of a transformer repeat
theirs), also for an op that gives several tensors (a block's ``unbind`` into q, k and v): each
block's result is in its own layer, so each attention reads its own block's projection."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

C, HEADS, N, HD = 8, 2, 16, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        q, k, v = self.qkv(t).reshape(b, N, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
        return t + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, N, C))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_each_block_reads_its_own_projection_after_an_unbind(exact_graph):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 3, 1])
    g = exact_graph(Blocks().double().eval(), x, y, weights=False, conservation=True)
    names = [l.name for l in g.layers]
    for i in range(3):
        src = g.node_layer[g.src[g.node_layer[g.dst] == names.index(f"blocks.{i}.proj")]]
        assert set(np.unique(src).tolist()) == {names.index(f"blocks.{i}.qkv")}
