"""Sums per unit of a layer, over images and positions, of tensors whose units sit anywhere.

A node's value holds its layer's units along some dims (channels in NCHW, the last dim of a
channels-last or token tensor, several dims after a flatten, or one unit for all of it): a
:class:`UnitView` moves them next to the batch, ``(N, K, P)``, and reduces. The flow
accumulator takes every per-unit quantity through one (attribution ``A * dT/dA``, the flows
of constants, activation statistics), and reduces products by their factors where it can:
a constant that varies with the unit only multiplies the per-unit sum of the gradient, and
one that varies per token or per image contracts it without building the product.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from connectome.extract.trace import Units

__all__ = ["UnitView"]


class UnitView:
    """How to sum a node's value per unit: move its unit dims next to the batch, then index."""

    def __init__(self, u: Units, layer_size: int, device: torch.device):
        self.dims, self.size = u.dims, layer_size
        # the batch dim when a layout op moved it off dim 0 for a while (it is moved back first)
        self.batch = u.batch
        # rows of the batch dim per image (positions folded into the batch): the rows of one
        # image are summed into it, as positions of that image
        self.windows = u.windows
        self.natural1 = u.dims == (1,) and u.index is None and self.windows == 1 and u.batch == 0
        # the units vary with the row of an image (heads folded into the batch): the rows of an
        # image are then unit slots, not positions; such values (and those with the batch off
        # dim 0) are summed without the shortcuts for constants that vary per unit or per token
        self.row_units = (self.windows > 1 and u.batch in u.dims) or u.batch != 0
        self.index = None
        if u.dims == ():
            self.index = torch.full((1,), int(np.asarray(u.index)), dtype=torch.long, device=device)
        elif u.index is not None:
            self.index = torch.as_tensor(np.asarray(u.index).reshape(-1), dtype=torch.long, device=device)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(N, K, P): N images, K unit slots (channels), P positions (with the windows, if any)."""
        dims = self.dims
        if self.batch != 0:
            nd = t.dim()
            b = self.batch % nd
            t = t.movedim(b, 0)
            dims = tuple(0 if d % nd == b else d % nd + 1 if d % nd < b else d % nd for d in dims)
        n = t.shape[0]
        if self.natural1:
            return t.reshape(n, t.shape[1], -1)
        if dims == ():
            return t.reshape(n // self.windows if n % self.windows == 0 else n, 1, -1)
        if self.windows > 1 and n % self.windows == 0:  # a constant's one row is not folded
            n //= self.windows
            t = t.reshape(n, self.windows, *t.shape[1:])
            dims = tuple(d % (t.dim() - 1) + 1 for d in dims)
        t = t.movedim(dims, tuple(range(1, 1 + len(dims))))
        k = math.prod(t.shape[1 : 1 + len(dims)])
        return t.reshape(n, k, -1)

    def sum_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Per image (batch row, unless the units vary along an image's rows) and unit slot, the
        sum over positions: (N, K) in ``t``'s dtype."""
        return self._rows(t).sum(2)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over batch and positions per unit of the layer: (L,) float64.

        The reduction runs in the tensor's own dtype (a float64 reduction of a float32 tensor is
        several times slower on CPUs; torch's cascade summation keeps float32 sums to ~1e-7
        relative) and only the per-unit result is widened for accumulation.
        """
        return self._units(self._rows(t).sum(dim=(0, 2), dtype=_acc_dtype(t)).double())

    def slot_sums(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over batch and positions per unit slot (K,), in float32 at least (not widened)."""
        return self._rows(t).sum(dim=(0, 2), dtype=_acc_dtype(t))

    def scaled_sum(self, c: torch.Tensor | None, t: torch.Tensor, per_slot: torch.Tensor | None = None) -> torch.Tensor:
        """``sum(c * t)`` per unit, for a constant ``c`` that broadcasts against ``t``.

        When ``c`` varies with the unit only (a BatchNorm shift, a per-channel bias), this is
        ``c_unit * sum(t)``: one pass over ``t`` instead of a product the size of ``t`` and a
        second pass over it. ``per_slot``: that ``c_unit``, from :meth:`per_slot`, computed before.
        """
        if per_slot is None:
            per_slot = self.per_slot(c, t.shape)
        if per_slot is None:
            return self.sum(c.to(t.device, t.dtype) * t)
        return self._units(self._rows(t).sum(dim=(0, 2), dtype=_acc_dtype(t)).double() * per_slot)

    def per_slot(self, c: Any, shape: torch.Size) -> torch.Tensor | None:
        """A constant's value per unit slot (float64), or None when it also varies over images or
        positions (or is not a tensor)."""
        return self._per_slot(c, shape) if isinstance(c, torch.Tensor) else None

    def product_sum(self, factors: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """``sum(f1 * f2 * ... * t)`` per unit, for factors that broadcast against ``t``, without
        their full-size product where the factors allow: per-unit factors multiply the per-unit
        sum; one factor that is constant over the units (per token: a LayerNorm's statistics)
        contracts ``t`` in a batched matrix-vector product; one constant over positions (per
        image and unit: a GroupNorm's) weights per-image sums."""
        per_unit, rest = None, None
        for f in factors:
            f = f.to(t.device, t.dtype)
            p = self._per_slot(f, t.shape)
            if p is not None:
                per_unit = p if per_unit is None else per_unit * p
            else:
                rest = f if rest is None else rest * f
        s = self._rows(t).sum(dim=(0, 2)).double() if rest is None else self._weighted(rest, t)
        return self._units(s if per_unit is None else s * per_unit)

    def _weighted(self, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per slot ``sum(m * t)`` (K,) float64, ``m`` broadcasting against ``t``."""
        shape = t.shape
        if m.dim() <= len(shape) and self.dims != () and not self.row_units:
            m = m.reshape((1,) * (len(shape) - m.dim()) + tuple(m.shape))
            units = {d % len(shape) for d in self.dims}
            rows = self._rows(t)  # (N, K, P)
            if all(m.shape[d] == 1 for d in units):  # per image and position: (N,K,P) @ (N,P,1)
                mm = m.expand([1 if d in units else shape[d] for d in range(len(shape))])
                mr = self._rows(mm).reshape(rows.shape[0], 1, -1).transpose(1, 2)
                if mr.shape[1] == rows.shape[2]:
                    return torch.bmm(rows, mr).sum(dim=(0, 2)).double()
            if self.windows == 1 and all(m.shape[d] == 1 for d in range(1, len(shape)) if d not in units):
                # per image and unit
                mm = m.expand([shape[d] if d in units or d == 0 else 1 for d in range(len(shape))])
                mr = self._rows(mm)[..., 0]  # (N, K)
                return (rows.sum(-1) * mr).sum(0).double()
        return self._rows(m * t).sum(dim=(0, 2)).double()

    def _per_slot(self, c: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """``c``'s value per unit slot (float64), or None when it also varies over images or positions."""
        if c.dim() > len(shape) or self.dims == () or self.row_units:
            return None
        c = c.reshape((1,) * (len(shape) - c.dim()) + tuple(c.shape))
        units = {d % len(shape) for d in self.dims}
        if any(c.shape[d] != 1 for d in range(len(shape)) if d not in units):
            return None
        try:
            c = c.expand(shape)
        except RuntimeError:
            return None
        for d in range(len(shape)):
            if d not in units:
                c = c.narrow(d, 0, 1)
        return self._rows(c).reshape(-1).double()

    def _units(self, s: torch.Tensor) -> torch.Tensor:
        """Per-slot sums (K,) -> per unit of the layer (L,)."""
        if self.index is None:
            return s
        return torch.zeros(self.size, dtype=torch.float64, device=s.device).index_add_(0, self.index, s)

    def per_image_mean(self, t: torch.Tensor, widen: bool = True) -> torch.Tensor:
        m = self._rows(t).mean(-1, dtype=_acc_dtype(t))
        return m.double() if widen else m

    def unit_means(self, t: torch.Tensor) -> torch.Tensor:
        """Per image and unit of the layer, the mean of the unit's values: (N, L) in ``t``'s
        dtype, for units anywhere (channels-last, on several dims, heads or positions folded
        into the batch)."""
        rows = self._rows(t).to(_acc_dtype(t))  # (N, K, P)
        if self.index is None:
            return rows.mean(-1)
        n, k, p = rows.shape
        sums = torch.zeros(n, self.size, dtype=rows.dtype, device=rows.device).index_add_(1, self.index, rows.sum(-1))
        count = torch.zeros(self.size, dtype=rows.dtype, device=rows.device).index_add_(
            0, self.index, torch.full((k,), float(p), dtype=rows.dtype, device=rows.device))
        return sums / count.clamp_min(1)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Sums of bfloat16/float16 values (autocast) are taken in float32, others in their own dtype."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
