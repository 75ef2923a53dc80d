"""Receptive fields: which input pixels a unit's value at one position can depend on.

Computed from the traced graph's geometry (kernel sizes, strides, paddings and dilations of
convolutions and pools, explicit padding, layout permutations), not from gradients, so the
box is the *structural* receptive field: it contains the gradient support of the unit for
every input. Along each spatial axis a value's index ``i`` covers the input pixels
``[start + i * jump, start + i * jump + size)`` (before clipping to the image); a
convolution with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` maps
``(jump, start, size)`` to ``(jump * s, start - p * jump, size + (k - 1) * d * jump)``, and a
residual add takes the union of its operands' boxes.

An op that mixes all positions (a flatten into a linear layer, a global pool, attention, a
resize) makes every later value depend on the whole image: such layers get no box (the
crop is the whole image). Operands broadcast over the positions (the per-channel gates of
squeeze-and-excitation) are context, not signal, and are left out of the union, as the gate
rule of :mod:`connectome.extract.rules` leaves them out of the flows.

References
----------
Araujo, Norris and Sim (2019), "Computing Receptive Fields of Convolutional Neural
Networks", Distill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.extract import dense, ops
from connectome.extract.ops import Receptive

__all__ = ["Box", "receptive_fields"]


@dataclass(frozen=True)
class Box:
    """Where the spatial axes of a value are (tensor dims) and what each index covers per axis."""

    dims: tuple[int, int]  # tensor dims of the height and width axes
    y: tuple[int, int, int]  # (jump, start, size) along the height
    x: tuple[int, int, int]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _window(b: Box, kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> Box | None:
    k, d = _pair(kernel), _pair(dilation)
    s = _pair(stride if stride not in (None, ()) else kernel)
    if padding == "valid":
        p = (0, 0)
    elif padding == "same":
        p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    elif isinstance(padding, str):
        return None
    else:
        p = _pair(padding)

    def axis(a: tuple[int, int, int], i: int) -> tuple[int, int, int]:
        j, start, size = a
        return (j * s[i], start - p[i] * j, size + (k[i] - 1) * d[i] * j)

    return Box(b.dims, axis(b.y, 0), axis(b.x, 1))


def _union(boxes: list[Box]) -> Box | None:
    first = boxes[0]
    if any(b.dims != first.dims or b.y[0] != first.y[0] or b.x[0] != first.x[0] for b in boxes):
        return None  # operands on different grids: give up (whole image) rather than guess

    def axis(parts: list[tuple[int, int, int]]) -> tuple[int, int, int]:
        lo = min(p[1] for p in parts)
        hi = max(p[1] + p[2] for p in parts)
        return (parts[0][0], lo, hi - lo)

    return Box(first.dims, axis([b.y for b in boxes]), axis([b.x for b in boxes]))


def _node_box(node: fx.Node, inputs: list[tuple[fx.Node, Box]], shapes: dict[str, tuple[int, ...]],
              modules: dict[str, nn.Module], windows: dict[str, tuple[Any, Any, Any, Any]]) -> Box | None:
    """The box of ``node``'s value from its data inputs' boxes; None: the whole image."""
    first_node, b = inputs[0]
    out = shapes.get(node.name)
    src = shapes.get(first_node.name)
    spatial = lambda s: None if s is None or len(s) <= max(b.dims) else (s[b.dims[0]], s[b.dims[1]])  # noqa: E731
    same = out is not None and src is not None and len(out) == len(src) and spatial(out) == spatial(src)
    # operands of the output's own grid: a residual add's branches (a broadcast gate left out)
    signal = [bb for a, bb in inputs if spatial(shapes.get(a.name)) == spatial(out)]
    t = node.target
    if node.name in windows:  # a dense layer that is a window over the image grid (its strategy's geometry)
        if b.dims != (len(src) - 2, len(src) - 1):
            return None
        return _window(b, *windows[node.name])
    module = modules[t] if node.op == "call_module" else None
    if isinstance(module, nn.Linear) or (node.op == "call_function" and t is F.linear):
        # a dense layer over the last dim: per position when the positions are not that dim
        if not same or max(b.dims) >= len(src) - 1:
            return None
        return b if module is not None else _union(signal) if signal else None
    op = ops.op_for_node(node, modules)
    if op is None:
        return None
    how = op.receptive
    call = ops.Call(node, module)
    geometry = op.geometry(call) if op.geometry is not None else {}
    if how == Receptive.POINTWISE:
        return _union(signal) if same and signal else None
    if how == Receptive.STATS:
        nd = len(src)
        if any(int(d) % nd in b.dims for d in geometry["dims"]):
            return None  # statistics over positions
        return _union(signal) if same and signal else None
    if how == Receptive.WINDOW:
        return _window(b, geometry["kernel_size"], geometry["stride"], geometry["padding"], geometry["dilation"])
    if how == Receptive.PAD:
        return _pad(b, geometry["pad"], src)
    if how == Receptive.PERMUTE:
        return _permute(b, geometry["dims"])
    if how == Receptive.TRANSPOSE:
        return _transpose(b, *geometry["dims"], len(src))
    if how == Receptive.RESHAPE:
        return _reshaped(b, src, out)
    if how == Receptive.SPLIT:
        return _inherit(b, src, out, geometry.get("dim", 0))
    if how == Receptive.CONCAT:
        dim = geometry["dim"] % len(src)
        return None if dim in b.dims or not signal else _union(signal)
    return None  # Receptive.GLOBAL


def _pad(b: Box, pad: Any, src: tuple[int, ...] | None) -> Box | None:
    pad = tuple(int(v) for v in (pad if isinstance(pad, (tuple, list)) else (pad,) * 4))
    if src is None or b.dims != (len(src) - 2, len(src) - 1) or len(pad) not in (2, 4):
        return None
    left, top = pad[0], (pad[2] if len(pad) == 4 else 0)
    return Box(b.dims, (b.y[0], b.y[1] - top * b.y[0], b.y[2]), (b.x[0], b.x[1] - left * b.x[0], b.x[2]))


def _permute(b: Box, dims: Any) -> Box | None:
    dims = [int(d) for d in dims]
    n = len(dims)
    dims = [d % n for d in dims]
    try:
        return Box((dims.index(b.dims[0]), dims.index(b.dims[1])), b.y, b.x)
    except ValueError:
        return None


def _transpose(b: Box, d0: Any, d1: Any, ndim: int) -> Box:
    d0, d1 = int(d0) % ndim, int(d1) % ndim
    swap = {d0: d1, d1: d0}
    return Box((swap.get(b.dims[0], b.dims[0]), swap.get(b.dims[1], b.dims[1])), b.y, b.x)


def _reshaped(b: Box, src: tuple[int, ...] | None, out: tuple[int, ...] | None) -> Box | None:
    """A view that keeps the two spatial axes last (a channel shuffle's view) keeps the box."""
    if src is None or out is None or b.dims != (len(src) - 2, len(src) - 1) or len(out) < 3:
        return None
    if tuple(out[-2:]) != tuple(src[-2:]) or out[0] != src[0]:
        return None
    return Box((len(out) - 2, len(out) - 1), b.y, b.x)


def _inherit(b: Box, src: tuple[int, ...] | None, out: tuple[int, ...] | None, dim: Any) -> Box | None:
    """chunk/split/getitem: keep the box when no spatial axis is cut."""
    if src is None:
        return b  # an item of a tuple of tensors: its parent was checked
    if out is not None and len(out) == len(src) and all(out[d] == src[d] for d in b.dims):
        return b
    if out is None:  # a tuple: split along a dim that is not spatial
        return None if int(dim) % len(src) in b.dims else b
    return None


def receptive_fields(ug: Any) -> tuple[dict[str, list[int] | None], list[int] | None]:
    """Per layer of a traced :class:`~connectome.extract.trace.UnitGraph`, the receptive field
    of its units at each position of the value they pass on.

    Returns
    -------
    fields : dict of layer name -> list of int or None
        ``[jump_y, start_y, size_y, jump_x, start_x, size_x, height, width]``: position
        ``p`` (row-major over the ``height x width`` positions of the unit) covers input rows
        ``start_y + (p // width) * jump_y`` to that plus ``size_y``, likewise for columns.
        None where the unit's value depends on the whole image or its positions are not an
        image grid.
    input_size : list of int or None
        ``[height, width]`` of the input image; None when the input is not an image.
    """
    gm = ug.gm
    shapes = ug.shapes
    modules = dict(gm.named_modules())
    windows = {s.node: g for s in ug.layers if s.dense and (g := dense.of_spec(s).geometry(s.call)) is not None}
    boxes: dict[str, Box | None] = {}
    data: set[str] = set()
    input_size = None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and not data:
            s = shapes.get(node.name)
            data.add(node.name)
            if s is not None and len(s) == 4:
                boxes[node.name] = Box((2, 3), (1, 0, 1), (1, 0, 1))
                input_size = [int(s[2]), int(s[3])]
            else:
                boxes[node.name] = None
            continue
        ins = [a for a in node.all_input_nodes if a.name in data]
        if node.op == "call_method" and node.target == "expand_as" and isinstance(node.args[0], fx.Node):
            ins = ins[:1] if node.args[0].name in data else []  # the other tensor gives only its shape
        if not ins or node.op in ("output", "placeholder", "get_attr"):
            continue
        data.add(node.name)
        out = shapes.get(node.name)
        known: list[tuple[fx.Node, Box]] = []
        whole = False
        for a in ins:
            ba = boxes.get(a.name)
            sa = shapes.get(a.name)
            if a.op == "call_method" and a.target in ("expand", "expand_as") and isinstance(a.args[0], fx.Node):
                sa = shapes.get(a.args[0].name, sa)  # a gate written broadcast out (ECA's y.expand_as(x))
            if ba is None:
                # an operand broadcast over the positions (a gate) is context, not signal
                if sa is not None and out is not None and len(sa) == len(out) and sa != out and \
                        all(v == 1 for d, v in enumerate(sa) if v != out[d]):
                    continue
                whole = True
                break
            known.append((a, ba))
        if whole or not known:
            boxes[node.name] = None
            continue
        # the operand that carries the signal first (a gate multiplies it, a residual adds to it)
        known.sort(key=lambda t: 0 if shapes.get(t[0].name) == out else 1)
        try:
            boxes[node.name] = _node_box(node, known, shapes, modules, windows)
        except (TypeError, ValueError, IndexError):  # arguments we cannot read statically
            boxes[node.name] = None
    fields: dict[str, list[int] | None] = {}
    for s in ug.layers:
        node = s.node if s.kind == "input" else s.out_node
        b = boxes.get(node)
        u = ug.units.get(node)
        shape = shapes.get(node)
        ok = b is not None and u is not None and u.index is None and len(u.dims) == 1 and u.batch == 0 \
            and u.windows == 1
        if ok:
            rest = [d for d in range(1, len(shape)) if d != u.dims[0]]
            ok = tuple(rest) == b.dims
        fields[s.name] = [*b.y, *b.x, int(shape[b.dims[0]]), int(shape[b.dims[1]])] if ok else None
    return fields, input_size
