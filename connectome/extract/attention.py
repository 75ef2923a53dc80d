"""Multi-head attention written as one call, so a traced graph holds it as one node."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attend"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of (batch, tokens, dim) tensors: ``softmax(q k^T / sqrt(d)) v`` per head.

    One node in the traced graph (the attention rule of :mod:`.rules` linearises it), the
    computation of ``nn.MultiheadAttention`` between its projections.
    """
    n, t, e = q.shape
    d = e // heads
    split = lambda z: z.reshape(z.shape[0], z.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(n, t, v.shape[-1])
