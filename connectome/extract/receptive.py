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

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Box", "receptive_fields"]


@dataclass(frozen=True)
class Box:
    """Where the spatial axes of a value are (tensor dims) and what each index covers per axis."""

    dims: tuple[int, int]  # tensor dims of the height and width axes
    y: tuple[int, int, int]  # (jump, start, size) along the height
    x: tuple[int, int, int]


_POINTWISE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish,
)
_POINTWISE_FUNCS: set[Any] = {
    F.relu, torch.relu, F.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.dropout, F.dropout2d, torch.dropout,
    F.silu, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.elu, F.mish,
    torch.clamp, torch.clip, operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
    torch.add, torch.sub, torch.mul, torch.div, F.batch_norm, F.layer_norm, F.linear,
}
_POINTWISE_METHODS = {
    "relu", "relu_", "clone", "detach", "float", "double", "to", "type_as", "contiguous", "sigmoid", "tanh",
    "clamp", "clamp_", "clip", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "expand_as",
}
_SPLIT = ({torch.chunk, torch.split, torch.unbind}, {"chunk", "split", "unbind"})


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


def _call(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _node_box(node: fx.Node, inputs: list[tuple[fx.Node, Box]], shapes: dict[str, tuple[int, ...]],
              modules: dict[str, nn.Module], conv_calls: dict[str, dict[str, Any]]) -> Box | None:
    """The box of ``node``'s value from its data inputs' boxes; None: the whole image."""
    first_node, b = inputs[0]
    out = shapes.get(node.name)
    src = shapes.get(first_node.name)
    spatial = lambda s: None if s is None or len(s) <= max(b.dims) else (s[b.dims[0]], s[b.dims[1]])  # noqa: E731
    same = out is not None and src is not None and len(out) == len(src) and spatial(out) == spatial(src)
    # operands of the output's own grid: a residual add's branches (a broadcast gate left out)
    signal = [bb for a, bb in inputs if spatial(shapes.get(a.name)) == spatial(out)]
    t = node.target
    if node.name in conv_calls:
        c = conv_calls[node.name]
        if b.dims != (len(src) - 2, len(src) - 1):
            return None
        return _window(b, c["kernel_size"], c["stride"], c["padding"], c["dilation"])
    if node.op == "call_module":
        m = modules[t]
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return _window(b, m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1))
        if isinstance(m, nn.ZeroPad2d):
            return _pad(b, m.padding, src)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return b if same else None
        if isinstance(m, nn.Linear):
            return b if same and max(b.dims) < len(src) - 1 else None
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            # statistics over the channels of each position only (a channels-last LayerNorm)
            return b if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and max(b.dims) < len(src) - 1 else None
        if isinstance(m, _POINTWISE_MODULES):
            return _union(signal) if same and signal else None
        return None
    if node.op == "call_function":
        if t in (F.max_pool2d, torch.max_pool2d, F.avg_pool2d):
            return _window(b, _call(node, 1, "kernel_size", 1), _call(node, 2, "stride", None),
                           _call(node, 3, "padding", 0), _call(node, 4, "dilation", 1) if t is not F.avg_pool2d else 1)
        if t is F.pad:
            return _pad(b, _call(node, 1, "pad", ()), src)
        if t in (torch.permute,):
            return _permute(b, _call(node, 1, "dims", ()))
        if t in (torch.transpose, torch.swapaxes):
            return _transpose(b, node.args[1], node.args[2], len(src))
        if t is torch.cat:
            dim = _call(node, 1, "dim", 0) % len(src)
            return None if dim in b.dims or not signal else _union(signal)
        if t in _SPLIT[0] or t is operator.getitem:
            return _inherit(node, b, src, out)
        if t in (torch.flatten, torch.reshape):
            return _reshaped(b, src, out)
        if t in _POINTWISE_FUNCS or getattr(t, "__name__", "") == "stochastic_depth":  # identity in eval mode
            if t in (F.linear, F.layer_norm) and max(b.dims) >= len(src) - 1:
                return None
            return _union(signal) if same and signal else None
        return None
    if node.op == "call_method":
        if t == "permute":
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(_call(node, 1, "dims", 0), (tuple, list)) \
                else node.args[1]
            return _permute(b, dims)
        if t in ("transpose", "swapaxes"):
            return _transpose(b, node.args[1], node.args[2], len(src))
        if t in ("view", "reshape", "flatten"):
            return _reshaped(b, src, out)
        if t in _SPLIT[1]:
            return _inherit(node, b, src, out)
        if t in _POINTWISE_METHODS:
            return _union(signal) if same and signal else None
    return None


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


def _inherit(node: fx.Node, b: Box, src: tuple[int, ...] | None, out: tuple[int, ...] | None) -> Box | None:
    """chunk/split/getitem: keep the box when no spatial axis is cut."""
    if src is None:
        return b  # an item of a tuple of tensors: its parent was checked
    if out is not None and len(out) == len(src) and all(out[d] == src[d] for d in b.dims):
        return b
    if out is None:  # a tuple: split along a dim that is not spatial
        dim = _call(node, 2, "dim", 0) if node.target not in (torch.unbind, "unbind") else _call(node, 1, "dim", 0)
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
    conv_calls = {s.node: s.call for s in ug.layers if s.call and "kernel_size" in s.call}
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
        if not ins or node.op in ("output", "placeholder", "get_attr"):
            continue
        data.add(node.name)
        out = shapes.get(node.name)
        known: list[tuple[fx.Node, Box]] = []
        whole = False
        for a in ins:
            ba = boxes.get(a.name)
            sa = shapes.get(a.name)
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
            boxes[node.name] = _node_box(node, known, shapes, modules, conv_calls)
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
