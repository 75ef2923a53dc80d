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

    Edges are written straight into the graph's arrays in canonical ``(dst, src)`` order: a
    dense block that reads its source's units in order already is in that order (row ``j``
    reads its group's sources in increasing order), and layers come in topological order,
    so only identity edges (one per unit and operand) and blocks that read permuted or
    selected channels are sorted, each on its own. No global sort, no concatenation of
    parts, no float64 copy of float32 values; the graph adopts the arrays (they are handed
    over read-only, so it does not copy them).
    """
    sizes = np.array([l.size for l in layers], dtype=np.int64)
    offsets = np.zeros(len(layers) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    extra = extra or {}
    # First pass: the size of every layer's block; the blocks that need sorting are built here.
    blocks: list[tuple[int, int, Any]] = []
    for li, spec in enumerate(ug.layers):
        edges = KINDS[spec.kind].edges if spec.kind in KINDS else None
        if edges == DENSE and spec.operands[0].cols is None:
            o, cg = np.shape(values[li])
            blocks.append((li, o * cg, None))
        elif edges in (DENSE, IDENTITY):
            small = _sorted_block(spec, li, offsets, values, extra)
            blocks.append((li, small[0].size, small))
    total = sum(size for _, size, _ in blocks)
    src = np.empty(total, np.int64)
    dst = np.empty(total, np.int64)
    w = np.empty(total, dtype)
    cols = {k: np.empty(total, np.float64) for k in extra}
    pos = 0
    for li, size, small in blocks:
        end = pos + size
        if small is not None:
            src[pos:end], dst[pos:end], w[pos:end] = small[0], small[1], small[2]
            for k, v in small[3].items():
                cols[k][pos:end] = v
        else:
            spec = ug.layers[li]
            vals = np.asarray(values[li])
            o, cg = vals.shape
            # broadcast into the output: no (o, cg) index temporaries
            dst[pos:end].reshape(o, cg)[:] = (np.arange(o, dtype=np.int64) + offsets[li])[:, None]
            base = (np.arange(o, dtype=np.int64) // (o // spec.groups)) * cg + offsets[spec.operands[0].layer]
            np.add(base[:, None], np.arange(cg, dtype=np.int64)[None, :], out=src[pos:end].reshape(o, cg))
            w[pos:end].reshape(o, cg)[:] = vals
            for k, per in extra.items():
                cols[k][pos:end].reshape(o, cg)[:] = np.asarray(per[li])
        pos = end
    for a in (src, dst, w, *cols.values()):
        a.setflags(write=False)  # handed over: the graph shares instead of copying
    units = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes]) if len(sizes) else np.zeros(0, np.int64)
    node_attrs = dict(node_attrs or {})
    if any("head_of" in s.call for s in ug.layers):
        # the attention head of each unit of a q/k/v projection (-1 elsewhere), to group by head
        head = np.full(int(offsets[-1]), -1.0)
        for li, s in enumerate(ug.layers):
            if "head_of" in s.call:
                head[offsets[li] : offsets[li + 1]] = s.call["head_of"]
        node_attrs["head"] = head
    return Connectome(
        layers=tuple(layers),
        node_units=units,
        src=src,
        dst=dst,
        weight=w,
        edge_attrs=cols,
        node_attrs=node_attrs,
        meta=dict(meta or {}),
    )


def _sorted_block(spec: Any, li: int, offsets: np.ndarray, values: dict[int, Any],
                  extra: dict[str, dict[int, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The edges into layer ``li`` in (dst, src) order, parallel edges summed: its identity
    edges, or a dense block whose input channels are permuted or selected source units."""
    src_p, dst_p, w_p = [], [], []
    x_p: dict[str, list[np.ndarray]] = {k: [] for k in extra}
    if KINDS[spec.kind].edges == DENSE:
        op = spec.operands[0]
        vals = np.asarray(values[li], dtype=np.float64)
        o, cg = vals.shape
        chan = ((np.arange(o, dtype=np.int64) // (o // spec.groups))[:, None] * cg
                + np.arange(cg, dtype=np.int64)[None, :]).ravel()
        src_p.append(np.asarray(op.cols, dtype=np.int64)[chan] + offsets[op.layer])
        dst_p.append(np.repeat(np.arange(o, dtype=np.int64), cg) + offsets[li])
        w_p.append(vals.ravel())
        for k, per in extra.items():
            x_p[k].append(np.asarray(per[li], dtype=np.float64).ravel())
    else:
        for oi, op in enumerate(spec.operands):
            vals = np.asarray(values[li][oi], dtype=np.float64).ravel()
            c = np.arange(vals.size, dtype=np.int64)
            src_p.append((c if op.cols is None else np.asarray(op.cols, dtype=np.int64)) + offsets[op.layer])
            dst_p.append(c + op.offset + offsets[li])
            w_p.append(vals)
            for k, per in extra.items():
                x_p[k].append(np.asarray(per[li][oi], dtype=np.float64).ravel())
    if not src_p:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0), {k: np.zeros(0) for k in extra}
    src, dst, w = np.concatenate(src_p), np.concatenate(dst_p), np.concatenate(w_p)
    cols = {k: np.concatenate(v) for k, v in x_p.items()}
    key = dst * max(int(offsets[-1]), 1) + src
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return (src[order][starts], dst[order][starts], np.add.reduceat(w[order], starts),
            {k: np.add.reduceat(v[order], starts) for k, v in cols.items()})
