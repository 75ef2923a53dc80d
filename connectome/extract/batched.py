"""Per-unit sums of many layers at once: a few ops per batch instead of several per layer.

Most per-unit statistics of a batch (attribution ``A * dT/dA``, activation means, the flows
of per-unit constants, identity edges) are sums over positions of tensors that hold their
units along dim 1 (``NCHW``, ``(N, C)``) or along the last dim (tokens, channels-last).
Tensors of one layout that share the rest of their shape are joined with one
``torch._chunk_cat`` (a single kernel on a GPU) and reduced with one op, so a step dispatches
a handful of ops per layout group instead of a few per layer: where a step is short, the host
launching kernels is the limit (``benchmarks/bench_ops.py`` counts them).

Written here rather than taken from a library: neither ``torch._foreach_*`` (no reductions
along dims) nor ``torch.segment_reduce`` (a sequential sum, 13x slower than ``sum`` on a CPU
and less accurate in float32) does it; a join and one ``sum`` keep torch's pairwise summation.

Tensors of other layouts (units along several dims, an index of units, positions folded into
the batch) are left to :class:`~connectome.extract.unit_sums.UnitView`; :func:`units_dim`
says which.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from connectome.extract.unit_sums import UnitView, _acc_dtype

__all__ = ["GroupedSums", "JOIN_LIMIT", "join_limit", "joining_on_cpu", "units_dim"]

#: elements per joined buffer: the copy a join makes stays bounded (128 MiB in float32)
_CAP = 1 << 25

#: Tensors up to this many elements are joined, per device type; larger ones are reduced alone.
#: A join copies its tensors (about four more passes over the memory of each); that costs less
#: than the ops it saves (three or so per tensor, 10-20 us each to launch) up to about 2**22
#: elements at a GPU's 3 TB/s, but only up to about 2**14 at a CPU core's 10 GB/s (measured:
#: joining everything made ResNet-50's per-unit sums at 224 px 8x slower on one CPU thread).
JOIN_LIMIT: dict[str, int] = {"cpu": 1 << 14, "cuda": 1 << 22}
_OTHER_DEVICES = 1 << 22


def join_limit(device: torch.device) -> int:
    """The largest tensor :class:`GroupedSums` joins with others on ``device``."""
    return JOIN_LIMIT.get(device.type, _OTHER_DEVICES)


@contextmanager
def joining_on_cpu(limit: int) -> Iterator[None]:
    """Accumulators made inside join up to ``limit`` elements on the CPU (``JOIN_LIMIT["cuda"]``:
    the GPU's path, to count its ops without a GPU; 0: every tensor alone)."""
    saved = JOIN_LIMIT["cpu"]
    JOIN_LIMIT["cpu"] = limit
    try:
        yield
    finally:
        JOIN_LIMIT["cpu"] = saved


def units_dim(view: UnitView, t: torch.Tensor) -> int | None:
    """1 when ``t`` holds its units along dim 1, -1 along its last dim (one unit per slot, no
    windows), else None (the caller sums it with ``view``)."""
    if view.index is not None or view.windows != 1 or view.batch != 0 or len(view.dims) != 1 or t.dim() < 2:
        return None
    d = view.dims[0] % t.dim()
    if d == 1:
        return 1
    return -1 if d == t.dim() - 1 else None


@dataclass(frozen=True)
class _Group:
    members: tuple[int, ...]  # positions in the caller's list
    dim: int  # 1 or -1
    width: int  # units of all members together


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    order: torch.Tensor | None  # columns of the joined results in the caller's order (None: already)


class GroupedSums:
    """Sums over positions, per image and unit, of many tensors in one op per layout group.

    Plans (which tensors join) are made once per list of shapes and dtypes and kept. Tensors
    larger than ``limit`` elements are reduced alone (a view, no copy): see :data:`JOIN_LIMIT`.
    """

    def __init__(self, limit: int = _CAP) -> None:
        self.limit = limit
        self._plans: dict[tuple, _Plan] = {}

    def __call__(self, xs: Sequence[torch.Tensor], dims: Sequence[int], ys: Sequence[torch.Tensor] | None = None,
                 *, means: bool = False, total: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per image and unit, over positions: ``(mean of x, sum of x * y)``.

        The mean only when ``means``; the sum of ``x * y`` when ``ys`` is given, of ``x`` when
        neither is. Each result is ``(N, sum of units)``, its columns in the order of ``xs``, in
        the tensors' dtype (float32 for bfloat16/float16). ``dims``: each tensor's
        :func:`units_dim`; ``ys[i]`` has the shape and dtype of ``xs[i]``. With ``total``, the sums
        are also summed over the batch dim, in float64: ``(sum of units,)``, for tensors whose
        batch dims differ (positions folded into the batch).
        """
        plan = self._plan(xs, dims)
        mean_parts: list[torch.Tensor] = []
        sum_parts: list[torch.Tensor] = []
        for g in plan.groups:
            xv = _joined([xs[i] for i in g.members], g)
            axis = 2 if g.dim == 1 else 1
            acc = _acc_dtype(xv)
            if means:
                mean_parts.append(xv.mean(axis, dtype=acc))
            if ys is not None:
                sum_parts.append((xv * _joined([ys[i] for i in g.members], g)).sum(axis, dtype=acc))
            elif not means:
                sum_parts.append(xv.sum(axis, dtype=acc))
        if total:
            if len({p.shape[0] for p in sum_parts}) == 1:  # one batch: joined first, one sum over it
                out = _in_order(sum_parts, plan)
                return _in_order(mean_parts, plan), None if out is None else out.double().sum(0)
            sum_parts = [p.double().sum(0) for p in sum_parts]
        return _in_order(mean_parts, plan), _in_order(sum_parts, plan)

    def _plan(self, xs: Sequence[torch.Tensor], dims: Sequence[int]) -> _Plan:
        key = tuple((tuple(x.shape), x.dtype, d) for x, d in zip(xs, dims))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _new_plan(xs, dims, self.limit)
        return plan


def _new_plan(xs: Sequence[torch.Tensor], dims: Sequence[int], limit: int) -> _Plan:
    by_key: dict[tuple, list[int]] = {}
    for i, (x, d) in enumerate(zip(xs, dims)):
        if d not in (1, -1):
            raise ValueError(f"units dim must be 1 or -1, got {d}")
        if x.numel() > limit:  # alone: joining would cost more than the ops it saves
            key: tuple = ("alone", i, d)
        elif d == 1:  # (N, K, positions...): joins with the same batch and number of positions
            key = (x.dtype, 1, x.shape[0], int(np.prod(x.shape[2:], dtype=np.int64)))
        else:  # (N, positions..., K): joins with the same leading shape
            key = (x.dtype, -1, tuple(x.shape[:-1]))
        by_key.setdefault(key, []).append(i)
    groups: list[_Group] = []
    for key, members in by_key.items():
        dim = dims[members[0]]
        run: list[int] = []
        size = 0
        for i in members:  # split where a join would copy more than _CAP elements
            if run and size + xs[i].numel() > _CAP:
                groups.append(_Group(tuple(run), dim, sum(_width(xs[j], dim) for j in run)))
                run, size = [], 0
            run.append(i)
            size += xs[i].numel()
        groups.append(_Group(tuple(run), dim, sum(_width(xs[j], dim) for j in run)))
    # where each input's columns land in the joined results
    starts = np.concatenate([[0], np.cumsum([_width(x, d) for x, d in zip(xs, dims)])])
    cols = np.concatenate([np.arange(starts[i], starts[i + 1]) for g in groups for i in g.members]) \
        if len(xs) else np.zeros(0, np.int64)
    order = None
    if not np.array_equal(cols, np.arange(cols.size)):
        inverse = np.empty_like(cols)
        inverse[cols] = np.arange(cols.size)
        order = torch.as_tensor(inverse, dtype=torch.long, device=xs[0].device)
    return _Plan(tuple(groups), order)


def _width(x: torch.Tensor, dim: int) -> int:
    return int(x.shape[1] if dim == 1 else x.shape[-1])


def _joined(ts: list[torch.Tensor], g: _Group) -> torch.Tensor:
    """The group's tensors as one ``(N, units, positions)`` (dim 1) or ``(N, positions, units)``
    (last dim) tensor: a view of a lone tensor, else one join."""
    n = ts[0].shape[0]
    if len(ts) == 1:
        t = ts[0]
        return t.reshape(n, g.width, -1) if g.dim == 1 else t.reshape(n, -1, g.width)
    if g.dim == 1:
        return torch._chunk_cat(ts, 1, 1).view(n, g.width, -1)
    return torch._chunk_cat(ts, ts[0].dim() - 1, 1).view(n, -1, g.width)


def _in_order(parts: list[torch.Tensor], plan: _Plan) -> torch.Tensor | None:
    if not parts:
        return None
    axis = parts[0].dim() - 1  # (N, units), or (units,) summed over the batch
    out = parts[0] if len(parts) == 1 else torch.cat(parts, axis)
    return out if plan.order is None else out.index_select(axis, plan.order)
