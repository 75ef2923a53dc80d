"""Turn per-layer edge values of a traced model into a Connectome.

Both the weight graph and the attribution graph have the same edges (every structural
connection of the model); only the values differ. Values come per layer:

- dense kinds (conv/linear, see :mod:`connectome.kinds`): an array of shape
  (out_units, in_channels_per_group); channel ``c`` is unit ``operand.cols[c]`` of the source
  when the input was permuted or selected (a channel shuffle or split);
- identity kinds (residual/concat): one array of shape (channels,) per operand.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from connectome.extract.trace import UnitGraph
from connectome.graph import Connectome, Layer
from connectome.kinds import DENSE, IDENTITY, KINDS, Kind

__all__ = ["graph_layers", "assemble"]


def graph_layers(ug: UnitGraph, labels: Sequence[str] | None = None) -> list[Layer]:
    """The Connectome layers of a traced model; the output layer becomes ``logits``."""
    names = {l.name for l in ug.layers}
    out = []
    for i, spec in enumerate(ug.layers):
        name, kind, lab = spec.name, spec.kind, None
        if i == ug.output_layer:
            kind = Kind.OUTPUT
            if "logits" not in names:
                name = "logits"
            if labels is not None:
                lab = tuple(str(s) for s in labels)
                if len(lab) != spec.size:
                    raise ValueError(
                        f"labels has {len(lab)} class names but the model's output has {spec.size} units"
                    )
        out.append(Layer(name=name, kind=kind, size=spec.size, labels=lab, module=spec.module))
    return out


def assemble(
    ug: UnitGraph,
    layers: list[Layer],
    values: dict[int, Any],
    extra: dict[str, dict[int, Any]] | None = None,
    node_attrs: dict[str, np.ndarray] | None = None,
    meta: dict[str, Any] | None = None,
    dtype: Any = np.float64,
) -> Connectome:
    """Build the Connectome from per-layer values (see module docstring).

    ``extra`` maps an edge column name to per-layer values of the same shapes.
    Parallel edges (the same source unit reaching one unit twice, ``x + x``) are summed.
    """
    sizes = np.array([l.size for l in layers], dtype=np.int64)
    offsets = np.zeros(len(layers) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    extra = extra or {}
    src_parts, dst_parts, w_parts = [], [], []
    x_parts: dict[str, list[np.ndarray]] = {k: [] for k in extra}
    for li, spec in enumerate(ug.layers):
        edges = KINDS[spec.kind].edges if spec.kind in KINDS else None
        if edges == DENSE:
            op = spec.operands[0]
            vals = np.asarray(values[li])
            o, cg = vals.shape
            og = o // spec.groups
            dst = np.repeat(np.arange(o, dtype=np.int64), cg)
            src = ((np.arange(o, dtype=np.int64) // og)[:, None] * cg + np.arange(cg, dtype=np.int64)[None, :]).ravel()
            if op.cols is not None:  # channel c of the input is unit cols[c] of the source
                src = np.asarray(op.cols, dtype=np.int64)[src]
            src_parts.append(src + offsets[op.layer])
            dst_parts.append(dst + offsets[li])
            w_parts.append(vals.ravel())
            for k, per in extra.items():
                x_parts[k].append(np.asarray(per[li]).ravel())
        elif edges == IDENTITY:
            for oi, op in enumerate(spec.operands):
                vals = np.asarray(values[li][oi]).ravel()
                c = np.arange(vals.size, dtype=np.int64)
                src = c if op.cols is None else np.asarray(op.cols, dtype=np.int64)
                src_parts.append(src + offsets[op.layer])
                dst_parts.append(c + op.offset + offsets[li])
                w_parts.append(vals)
                for k, per in extra.items():
                    x_parts[k].append(np.asarray(per[li][oi]).ravel())
    src = np.concatenate(src_parts) if src_parts else np.zeros(0, np.int64)
    dst = np.concatenate(dst_parts) if dst_parts else np.zeros(0, np.int64)
    w = np.concatenate(w_parts).astype(dtype) if w_parts else np.zeros(0, dtype)
    cols = {k: np.concatenate(v).astype(np.float64) for k, v in x_parts.items()}
    n = int(offsets[-1])
    key = dst * n + src
    order = np.argsort(key, kind="stable")
    key = key[order]
    dup = np.r_[False, key[1:] == key[:-1]] if key.size else np.zeros(0, bool)
    if dup.any():
        starts = np.flatnonzero(~dup)
        w = np.add.reduceat(w[order], starts)
        cols = {k: np.add.reduceat(v[order], starts) for k, v in cols.items()}
        key = key[starts]
    else:
        w = w[order]
        cols = {k: v[order] for k, v in cols.items()}
    units = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes]) if len(sizes) else np.zeros(0, np.int64)
    node_attrs = dict(node_attrs or {})
    if any(s.call.get("head_of") for s in ug.layers):
        # the attention head of each unit of a q/k/v projection (-1 elsewhere), to group by head
        head = np.full(int(offsets[-1]), -1.0)
        for li, s in enumerate(ug.layers):
            for u, h in (s.call.get("head_of") or {}).items():
                head[offsets[li] + u] = h
        node_attrs["head"] = head
    return Connectome(
        layers=tuple(layers),
        node_units=units,
        src=key % n if n else key,
        dst=key // n if n else key,
        weight=w,
        edge_attrs=cols,
        node_attrs=node_attrs,
        meta=dict(meta or {}),
    )
