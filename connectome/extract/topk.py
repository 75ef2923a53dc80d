"""Top-k states of dataset examples: (value, image index, position) triples per unit, and their merge."""

from __future__ import annotations

import math

import torch

__all__ = ["VALUE", "INDEX", "POS", "topk_merge"]

VALUE, INDEX, POS = 0, 1, 2  # columns of a top-k state tensor (rows, k, 3)


def topk_merge(cand: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best of candidate triples ``(value, image index, position)`` per row.

    ``cand`` has shape ``(rows, m, 3)``; the result ``(rows, k, 3)`` is ordered by value,
    largest first, ties by the smaller image index; empty slots (index -1, value -inf) last.
    Used to merge the top-k of several processes, whose image indices interleave.
    """
    idx = cand[..., INDEX]
    # two stable sorts make a lexicographic one: by value descending, then index ascending
    o1 = torch.sort(torch.where(idx < 0, math.inf, idx), dim=1, stable=True).indices
    c = cand.gather(1, o1[..., None].expand_as(cand))
    o2 = torch.sort(c[..., VALUE], dim=1, descending=True, stable=True).indices[:, :k]
    return c.gather(1, o2[..., None].expand(-1, -1, cand.shape[2]))
