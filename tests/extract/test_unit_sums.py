"""Per-unit sums of the accumulator (UnitView): the one-pass ``c * sum(t)`` for per-unit constants
against the plain ``sum(c * t)``, for every way a tensor can hold its units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from connectome.extract.unit_sums import UnitView
from connectome.extract.trace import Units


def _brute(units: Units, size: int, t: torch.Tensor) -> torch.Tensor:
    """sum over images and positions per unit, element by element."""
    out = torch.zeros(size, dtype=torch.float64)
    dims = tuple(d % t.dim() for d in units.dims)
    for idx in np.ndindex(*t.shape):
        if units.dims == ():
            u = int(units.index)
        else:
            key = tuple(idx[d] for d in dims)
            u = key[0] if units.index is None else int(np.asarray(units.index)[key])
        out[u] += float(t[idx])
    return out


CASES = [
    ("NCHW", Units(0, (1,)), (3, 4, 2, 5), 4, [(1, 4, 1, 1), (4, 1, 1), (), (3, 4, 2, 5), (1, 1, 2, 1)]),
    ("channels-last", Units(0, (-1,)), (3, 2, 5, 4), 4, [(4,), (1, 1, 1, 4), (2, 5, 4), (1, 2, 1, 1)]),
    ("tokens", Units(0, (2,)), (3, 6, 4), 4, [(4,), (1, 6, 1), (6, 4)]),
    ("indexed", Units(0, (1,), np.array([2, 0, 1, 2])), (3, 4, 5), 3, [(1, 4, 1), (4, 1), (3, 4, 5)]),
    ("two dims", Units(0, (1, 2), np.arange(6).reshape(2, 3)), (3, 2, 3, 4), 6, [(1, 2, 3, 1), (2, 3, 1), (1, 1, 1, 4)]),
    ("one unit", Units(0, (), np.array(1)), (3, 5), 2, [(1, 5), ()]),
]


@pytest.mark.parametrize("name,units,shape,size,cshapes", CASES, ids=[c[0] for c in CASES])
def test_scaled_sum_is_the_sum_of_the_product(name, units, shape, size, cshapes):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    view = UnitView(units, size, torch.device("cpu"))
    np.testing.assert_allclose(view.sum(t).numpy(), _brute(units, size, t).numpy(), rtol=1e-12, atol=1e-12)
    for cs in cshapes:
        c = torch.randn(cs, generator=g, dtype=torch.float64)
        expect = _brute(units, size, c * t)
        got = view.scaled_sum(c, t)
        np.testing.assert_allclose(got.numpy(), expect.numpy(), rtol=1e-12, atol=1e-12, err_msg=f"c of shape {cs}")


PRODUCT_CASES = [
    # LayerNorm over channels-last tokens: statistics per token, affine per unit
    ("tokens, per-token x per-unit", Units(0, (-1,)), (3, 6, 4), 4, [(3, 6, 1), (4,)]),
    ("NHWC, per-position x per-unit", Units(0, (-1,)), (2, 3, 5, 4), 4, [(2, 3, 5, 1), (4,)]),
    # GroupNorm on NCHW: statistics per image and channel, affine per unit
    ("NCHW, per-image-unit x per-unit", Units(0, (1,)), (3, 4, 2, 5), 4, [(3, 4, 1, 1), (1, 4, 1, 1)]),
    ("NCHW, per-position", Units(0, (1,)), (3, 4, 2, 5), 4, [(3, 1, 2, 5)]),
    ("indexed, per-position x per-unit", Units(0, (1,), np.array([2, 0, 1, 2])), (3, 4, 5), 3, [(3, 1, 5), (1, 4, 1)]),
    ("full-size factor", Units(0, (1,)), (3, 4, 5), 4, [(3, 4, 5), (4, 1)]),
    ("per-unit only", Units(0, (1,)), (3, 4, 5), 4, [(4, 1), (1, 4, 1)]),
]


@pytest.mark.parametrize("name,units,shape,size,fshapes", PRODUCT_CASES, ids=[c[0] for c in PRODUCT_CASES])
def test_product_sum_is_the_sum_of_the_full_product(name, units, shape, size, fshapes):
    """The factored constants of the normalisation rule: sum(f1 * f2 * t) per unit, taken
    without building f1 * f2 where it can, equals the brute-force sum of the full product."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    factors = [torch.randn(fs, generator=g, dtype=torch.float64) for fs in fshapes]
    full = t
    for f in factors:
        full = full * f
    view = UnitView(units, size, torch.device("cpu"))
    got = view.product_sum(factors, t)
    np.testing.assert_allclose(got.numpy(), _brute(units, size, full).numpy(), rtol=1e-12, atol=1e-12)
