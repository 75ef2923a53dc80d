"""Turn per-layer edge values of a traced model into a Connectome.

Both the weight graph and the attribution graph have the same edges (every structural
connection of the model); only the values differ. Values come per layer:

- dense kinds (conv/linear, see :mod:`connectome.kinds`): an array of shape
  (out_units, in_channels_per_group); channel ``c`` is unit ``operand.cols[c]`` of the source
  when the input was permuted or selected (a channel shuffle or split);
- identity kinds (residual/concat): one array of shape (channels,) per operand.

The edges themselves, the ``src`` and ``dst`` arrays in canonical order, depend on the
traced structure only: :func:`skeleton` builds them once per traced model, and
:func:`prefetch_skeleton` starts that in a background thread when extraction begins, so
that a run's graph costs one copy of its values at the end (the GPU works meanwhile).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from connectome.extract import dense
from connectome.extract.trace import UnitGraph
from connectome.graph import Connectome, Layer, is_canonical
from connectome.kinds import DENSE, IDENTITY, KINDS, Kind

__all__ = ["graph_layers", "assemble", "edge_shapes", "layout", "skeleton", "prefetch_skeleton", "Layout", "Skeleton"]


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


def edge_shapes(ug: UnitGraph) -> list[Any]:
    """Per layer, the shape of its edge values: ``(out, in_per_group)`` for dense layers, a list
    of ``(width,)`` per operand for identity layers, None for the input. The one place this
    rule lives (accumulators, checkpoints and graph building read it)."""
    out: list[Any] = []
    for s in ug.layers:
        edges = KINDS[s.kind].edges if s.kind in KINDS else None
        if edges == DENSE:
            op = s.operands[0]
            out.append((s.size, op.width // s.groups if s.kind == Kind.MIX else dense.of_spec(s).in_width(op.width, s.groups)))
        elif edges == IDENTITY:
            out.append([(op.width,) for op in s.operands])
        else:
            out.append(None)
    return out


@dataclass(frozen=True)
class _Block:
    """The edges into one layer: ``size`` of them from ``pos`` in the graph's arrays.

    A dense block that reads its source's units in order is written as it is (row ``j``
    reads its group's sources in increasing order: canonical already); otherwise (identity
    edges, permuted or selected channels) the layer's values, concatenated, are gathered by
    ``order`` and summed at ``starts`` (parallel edges, ``x + x``, are one edge).
    """

    li: int
    pos: int
    size: int
    order: np.ndarray | None = None
    starts: np.ndarray | None = None


@dataclass(frozen=True)
class Skeleton:
    """The edges of a traced model in canonical ``(dst, src)`` order, without values."""

    src: np.ndarray
    dst: np.ndarray
    blocks: tuple[_Block, ...]
    units: np.ndarray


def _structure_key(ug: UnitGraph, shapes: list[Any]) -> bytes:
    """Everything the edges depend on: layer sizes, edge shapes, groups, operands and their columns."""
    h = hashlib.blake2b(digest_size=20)
    for s, sh in zip(ug.layers, shapes):
        ops = [] if sh is None else [(op.layer, op.width, op.offset, op.cols is not None) for op in s.operands]
        h.update(repr((s.size, sh, s.groups, ops)).encode())
        for op in ([] if sh is None else s.operands):
            if op.cols is not None:
                h.update(np.asarray(op.cols, dtype=np.int64).tobytes())
    return h.digest()


# Skeletons of live graphs, by structure: every traced copy of one architecture (the categories
# of attribution_by_category, weights() and attribution() of one model) shares one src/dst.
# Held weakly: an entry goes when the last graph holding its arrays does.
_SHARED: dict[bytes, tuple[Any, Any, Any, tuple[_Block, ...]]] = {}


def _drop_shared(key: bytes, ref: Any) -> None:
    hit = _SHARED.get(key)
    if hit is not None and hit[0] is ref:
        del _SHARED[key]


def _build_skeleton(ug: UnitGraph) -> Skeleton:
    shapes = edge_shapes(ug)
    key = _structure_key(ug, shapes)
    hit = _SHARED.get(key)
    if hit is not None:
        src, dst, units = (r() for r in hit[:3])
        if src is not None and dst is not None and units is not None:
            return Skeleton(src, dst, hit[3], units)
    sk = _new_skeleton(ug, shapes)
    ref = weakref.ref(sk.src)
    _SHARED[key] = (ref, weakref.ref(sk.dst), weakref.ref(sk.units), sk.blocks)
    weakref.finalize(sk.src, _drop_shared, key, ref)
    return sk


@dataclass(frozen=True)
class Layout:
    """Where each layer's edges go in the graph's columns (cheap: no per-edge arrays except
    for the small sorted blocks, whose ``(src, dst)`` it keeps in ``small``)."""

    blocks: tuple[_Block, ...]
    total: int
    offsets: np.ndarray
    small: dict[int, tuple[np.ndarray, np.ndarray]]


def layout(ug: UnitGraph) -> Layout:
    """The block layout of ``ug``'s edges (computed once per traced model)."""
    lay = ug.__dict__.get("_layout")
    if lay is None:
        lay = ug.__dict__["_layout"] = _new_layout(ug, edge_shapes(ug))
    return lay


def _new_layout(ug: UnitGraph, shapes: list[Any]) -> Layout:
    sizes = np.array([l.size for l in ug.layers], dtype=np.int64)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    blocks: list[_Block] = []
    small: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pos = 0
    for li, spec in enumerate(ug.layers):
        sh = shapes[li]
        if sh is None:
            continue
        if not isinstance(sh, list) and spec.operands[0].cols is None:
            blocks.append(_Block(li, pos, sh[0] * sh[1]))
            pos += sh[0] * sh[1]
        else:
            src, dst, order, starts = _sorted_edges(spec, li, offsets, sh)
            blocks.append(_Block(li, pos, src.size, order, starts))
            small[li] = (src, dst)
            pos += src.size
    return Layout(tuple(blocks), pos, offsets, small)


def _new_skeleton(ug: UnitGraph, shapes: list[Any]) -> Skeleton:
    lay = layout(ug)
    offsets = lay.offsets
    src = np.empty(lay.total, np.int64)
    dst = np.empty(lay.total, np.int64)
    for b in lay.blocks:
        end = b.pos + b.size
        if b.order is not None:
            src[b.pos:end], dst[b.pos:end] = lay.small[b.li]
            continue
        spec = ug.layers[b.li]
        o, cg = shapes[b.li]
        # broadcast into the output: no (o, cg) index temporaries
        dst[b.pos:end].reshape(o, cg)[:] = (np.arange(o, dtype=np.int64) + offsets[b.li])[:, None]
        base = (np.arange(o, dtype=np.int64) // (o // spec.groups)) * cg + offsets[spec.operands[0].layer]
        np.add(base[:, None], np.arange(cg, dtype=np.int64)[None, :], out=src[b.pos:end].reshape(o, cg))
    for a in (src, dst):
        a.setflags(write=False)  # shared by every graph of this model: never written again
    if not is_canonical(src, dst, offsets, remember=True):  # a bug here, not bad input
        raise AssertionError("the edges of a traced model are not in canonical order")
    sizes = np.diff(offsets)
    units = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes]) if len(sizes) else np.zeros(0, np.int64)
    units.setflags(write=False)
    return Skeleton(src, dst, lay.blocks, units)


def _sorted_edges(spec: Any, li: int, offsets: np.ndarray,
                  shape: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The edges into layer ``li`` in (dst, src) order, parallel edges merged, with the order
    and the run starts that turn the layer's concatenated values into theirs."""
    src_p, dst_p = [], []
    if KINDS[spec.kind].edges == DENSE:
        op = spec.operands[0]
        o, cg = shape
        chan = ((np.arange(o, dtype=np.int64) // (o // spec.groups))[:, None] * cg
                + np.arange(cg, dtype=np.int64)[None, :]).ravel()
        src_p.append(np.asarray(op.cols, dtype=np.int64)[chan] + offsets[op.layer])
        dst_p.append(np.repeat(np.arange(o, dtype=np.int64), cg) + offsets[li])
    else:
        for op, (width,) in zip(spec.operands, shape):
            c = np.arange(width, dtype=np.int64)
            src_p.append((c if op.cols is None else np.asarray(op.cols, dtype=np.int64)) + offsets[op.layer])
            dst_p.append(c + op.offset + offsets[li])
    src = np.concatenate(src_p) if src_p else np.zeros(0, np.int64)
    dst = np.concatenate(dst_p) if dst_p else np.zeros(0, np.int64)
    key = dst * max(int(offsets[-1]), 1) + src
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    return src[order][starts], dst[order][starts], order, starts


_LOCK = threading.Lock()


def _claim(ug: UnitGraph) -> tuple[Future, bool]:
    """The future skeleton of ``ug``, and whether the caller must build it."""
    with _LOCK:
        fut = ug.__dict__.get("_skeleton")
        if fut is not None:
            return fut, False
        fut = ug.__dict__["_skeleton"] = Future()
        return fut, True


def _build_into(ug: UnitGraph, fut: Future) -> None:
    try:
        fut.set_result(_build_skeleton(ug))
    except BaseException as exc:  # raised where the skeleton is read; the next call builds again
        _unclaim(ug, fut)
        fut.set_exception(exc)


def _unclaim(ug: UnitGraph, fut: Future) -> None:
    with _LOCK:
        if ug.__dict__.get("_skeleton") is fut:
            del ug.__dict__["_skeleton"]


def prefetch_skeleton(ug: UnitGraph, columns: int = 0) -> Future | None:
    """Start building the edges of ``ug`` in a background thread (numpy releases the GIL: it
    runs while the batches do); :func:`skeleton` waits for it.

    With ``columns``, the same thread then allocates that many float64 columns of the graph's
    length and writes them once (the first write of fresh memory is most of the cost of
    filling it), and the returned future gives them, for :func:`assemble`'s ``columns``.
    """
    fut, mine = _claim(ug)
    if not columns:
        if mine and not _start(_build_into, ug, fut):
            _build_into(ug, fut)  # no thread to be had: build it now (never leave the future unresolved)
        return None
    cols: Future = Future()

    def work() -> None:
        if mine:
            _build_into(ug, fut)
        try:
            n = fut.result().src.size
            out = []
            for _ in range(columns):
                a = np.empty(n, np.float64)
                a.fill(0.0)
                out.append(a)
            cols.set_result(out)
        except BaseException as exc:
            cols.set_exception(exc)

    if not _start(work):
        work()  # no thread to be had: now, in this one
    return cols


def _start(target: Any, *args: Any) -> bool:
    """Run ``target(*args)`` in a daemon thread; False (nothing started) where no thread can start."""
    try:
        threading.Thread(target=target, args=args, name="connectome-skeleton", daemon=True).start()
    except RuntimeError:  # "can't start new thread": the graph is then built where it is needed
        return False
    return True


def skeleton(ug: UnitGraph) -> Skeleton:
    """The edges of ``ug``: built once per traced model, shared read-only by its graphs."""
    fut, mine = _claim(ug)
    if mine:
        _build_into(ug, fut)
    return fut.result()


def _put(out: np.ndarray, values: Any) -> None:
    """Write one layer's values into its slice of a column: straight from a device tensor."""
    if hasattr(values, "detach"):
        values = values.detach()
        if values.device.type != "cpu":
            import torch

            torch.from_numpy(out).view(values.shape).copy_(values)
            return
        # numpy, not torch's copy_: torch's threads fault the fresh pages in together, ~8x slower
        values = values.numpy()
    if isinstance(values, np.ndarray) and values.size == out.size and values.size and \
            values.__array_interface__["data"][0] == out.__array_interface__["data"][0]:
        return  # the values already live in the column (the accumulator's buffer, handed over)
    out.reshape(np.shape(values))[...] = values


def _flat(values: Any) -> np.ndarray:
    parts = values if isinstance(values, list) else [values]
    return np.concatenate([np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64).ravel()
                           for v in parts])


def assemble(
    ug: UnitGraph,
    layers: list[Layer],
    values: dict[int, Any],
    extra: dict[str, dict[int, Any]] | None = None,
    node_attrs: dict[str, np.ndarray] | None = None,
    meta: dict[str, Any] | None = None,
    dtype: Any = np.float64,
    columns: list[np.ndarray] | None = None,
) -> Connectome:
    """Build the Connectome from per-layer values (see module docstring): numpy arrays or
    torch tensors (on any device: copied once, straight into the graph's column).

    ``extra`` maps an edge column name to per-layer values of the same shapes.
    Parallel edges (the same source unit reaching one unit twice, ``x + x``) are summed.

    The edges come from :func:`skeleton` (shared by every graph of the traced model, and
    known to be canonical: the graph does not check or sort them again); only the value
    columns are written here, each layer into its slice (of ``columns``, float64 arrays of
    the graph's length that :func:`prefetch_skeleton` made ready, when given: weight first,
    then ``extra``'s in order). No concatenation of parts, no
    float64 copy of float32 values; the graph adopts the arrays (they are handed over
    read-only, so it does not copy them).
    """
    sk = skeleton(ug)
    extra = extra or {}
    total = sk.src.size
    ready = [c for c in (columns or []) if c.shape == (total,) and c.dtype == np.float64 and c.flags.writeable]
    w = ready.pop(0) if ready and np.dtype(dtype) == np.float64 else np.empty(total, dtype)
    cols = {k: (ready.pop(0) if ready else np.empty(total, np.float64)) for k in extra}
    for b in sk.blocks:
        end = b.pos + b.size
        for out, per in ((w, values), *((cols[k], v) for k, v in extra.items())):
            if b.order is None:
                _put(out[b.pos:end], per[b.li])
            elif b.size:
                out[b.pos:end] = np.add.reduceat(_flat(per[b.li])[b.order], b.starts)
    for a in (w, *cols.values()):
        a.setflags(write=False)  # handed over: the graph shares instead of copying
    node_attrs = dict(node_attrs or {})
    if any("head_of" in s.call for s in ug.layers):
        # the attention head of each unit of a q/k/v projection (-1 elsewhere), to group by head
        offsets = np.concatenate([[0], np.cumsum([s.size for s in ug.layers])])
        head = np.full(int(offsets[-1]), -1.0)
        for li, s in enumerate(ug.layers):
            if "head_of" in s.call:
                head[offsets[li] : offsets[li + 1]] = s.call["head_of"]
        node_attrs["head"] = head
    return Connectome(
        layers=tuple(layers),
        node_units=sk.units,
        src=sk.src,
        dst=sk.dst,
        weight=w,
        edge_attrs=cols,
        node_attrs=node_attrs,
        meta=dict(meta or {}),
    )
