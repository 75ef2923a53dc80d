"""Dense layer kinds as strategies: one object per kind of weight layer, beside its ``kinds.py`` row.

A dense layer's units are the output channels (or features) of one weight tensor, and its
edges are a block ``(out units, in units per group)`` (:mod:`connectome.kinds`, ``DENSE``).
Each :class:`Dense` strategy says, for one kind of weight op:

- which modules and functions it is (``modules``: leaves of tracing when they run their stock
  forward; ``functions``: ``F.conv2d`` and the like);
- its call: groups, input features and hyper-parameters, read from the module or the call;
- where the units are (``units_dim``: the channel dim, or the last dim for a Linear);
- ``blocks(w)``: its weight (or anything shaped like it, ``W * dT/dW`` included) reshaped to
  ``(out units, in units per group, kernel)``, so that an edge is a sum over the last axis:
  the static kernel sum of the weight graph and the ``W x dW`` reduction of attribution alike;
- ``forward(m, x, w, b)``: the module run with its weight and bias replaced (autograd leaves);
- ``geometry(call)``: ``(kernel, stride, padding, dilation)`` of an equivalent convolution over
  the image grid for receptive fields, or None when its positions are no window of its input's;
- ``per_sample_abs``: ``sum_n |E_n|`` over the images of a batch (``abs_weight``).

============ ========================================= ========= ==================================
strategy     op                                        kind      weight -> (out, in per group, k)
============ ========================================= ========= ==================================
conv2d       ``nn.Conv2d``, ``F.conv2d``               conv      ``(O, I/g, kh * kw)``
conv1d       ``nn.Conv1d``, ``F.conv1d``               conv      ``(O, I/g, k)``
conv1d_units a Conv1d across the units (ECA attention:   conv      the ``(units, units)`` banded matrix
             one channel, positions are the units)               it multiplies by; edges from
                                                                 ``sum_n dT/dy x^T`` (``io_edges``)
conv_t2d     ``nn.ConvTranspose2d``,                   conv      ``(I, O/g, kh, kw)`` regrouped to
             ``F.conv_transpose2d``                              ``(O, I/g, kh * kw)``
linear       ``nn.Linear``, ``F.linear``               linear    ``(O, I / group, group)``: a
                                                                 flattened ``C x H x W`` input
                                                                 reads ``group`` positions per unit
============ ========================================= ========= ==================================

A Linear whose input holds its units along another dim than the last (MLP-Mixer's token
mixing: ``Linear`` over the tokens of a transposed ``(batch, channels, tokens)`` tensor) is no
dense layer: it mixes positions of each unit with the same weights and keeps the units, so it
is a per-unit op (a linear map over positions, exact as it is, its bias a constant part;
:func:`positions_bias`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from connectome.errors import ExtractionError
from connectome.kinds import Kind

__all__ = ["Dense", "STRATEGIES", "CONV1D", "CONV1D_UNITS", "CONV2D_ONE_UNIT", "DENSE_MODULES", "DENSE_FUNCTIONS", "of_module", "of_function", "of_spec",
           "positions_bias"]

_PER_SAMPLE_BUDGET = 1 << 26  # elements of scratch per chunk (~256 MB in float32)

#: ``arg(i, name, default)``: argument ``i`` (or keyword ``name``) of a traced call.
Arg = Callable[[int, str, Any], Any]


@dataclass(frozen=True)
class Dense:
    """One kind of dense layer (see the module docstring for the table)."""

    name: str
    kind: str  # a row of connectome.kinds.KINDS
    modules: tuple[type, ...]
    functions: tuple[Any, ...]
    module_call: Callable[[nn.Module], tuple[int, int, dict[str, Any]]]  # -> (groups, in features, call)
    function_call: Callable[[Arg, tuple[int, ...]], tuple[int, int, dict[str, Any]]]  # (arg, weight shape)
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    regroup: Callable[[torch.Tensor, int], torch.Tensor]  # weight-shaped -> (O, I/g, K) for `groups`
    geometry: Callable[[dict[str, Any]], tuple[Any, Any, Any, Any] | None] = lambda call: None
    per_sample: Callable[..., torch.Tensor] | None = None  # a faster sum_n |E_n| than the generic one
    grouped_input: bool = False  # reads a flattened tensor: `group` consecutive features per unit
    units_along: int = 0  # units along this dim of its input and output (0: the channel dim, or the last)
    # Edges from the input and the output's gradient (E = W o sum_n dT/dy x^T), not from W * dT/dW:
    # one kernel tap is shared by many edges (a convolution across units)
    io_edges: bool = False

    def is_stock(self, m: nn.Module) -> bool:
        """Whether ``m`` is this kind's module running its stock forward (a leaf of tracing)."""
        return isinstance(m, self.modules) and any(type(m).forward is t.forward for t in self.modules)

    def units_dim(self, ndim: int) -> int:
        """The dim of an ``ndim``-dim input (and output) that holds the units."""
        if self.units_along:
            return self.units_along
        return ndim - 1 if self.grouped_input and ndim > 2 else 1

    def blocks(self, w: torch.Tensor, spec: Any) -> torch.Tensor:
        """``w`` (weight-shaped) as ``(out units, in units per group, k)`` for the layer ``spec``: an
        edge sums the last axis (``W * dT/dW`` too, except where ``io_edges``)."""
        if self.grouped_input:
            return w.reshape(w.shape[0], -1, spec.operands[0].group)
        if self.io_edges:
            return self.unit_matrix(spec.call, w, spec.operands[0].width)[..., None]
        return self.regroup(w, spec.groups)

    def unit_matrix(self, call: dict[str, Any], w: torch.Tensor, width: int) -> torch.Tensor:
        """A convolution across units as the ``(out units, in units)`` matrix it multiplies by."""
        eye = torch.eye(width, dtype=w.dtype, device=w.device)[:, None, :]  # each input unit alone
        return call["fn"](eye, w, None)[:, 0, :].T

    def in_width(self, width: int, groups: int) -> int:
        """Columns of the edge block for an operand of ``width`` units."""
        return width if self.grouped_input else width // groups

    def per_sample_abs(self, call: dict[str, Any], groups: int, group: int, w: torch.Tensor, x: torch.Tensor,
                       gz: torch.Tensor, device: torch.device, rows: int = 1) -> torch.Tensor:
        """``sum_n |E_n|`` of a batch: per image, ``W * dT/dW`` reduced to edges, ``(O, I/g)`` float64.

        ``x`` is the layer's input, ``gz`` the gradient of the target at its output. ``rows``
        consecutive batch rows are one image (positions folded into the batch: its windows),
        summed before the absolute value."""
        if self.per_sample is not None:
            return self.per_sample(call, groups, group, w, x, gz, device, rows)
        if self.io_edges and rows > 1:
            raise ExtractionError(f"per_sample=True: a {self.name} layer over positions folded into the batch is not "
                                  "supported; use per_sample=False")
        if self.io_edges:  # E_n = W o outer(gz_n, x_n): |E_n| = |W| o outer(|gz_n|, |x_n|)
            m = self.unit_matrix(call, w, x.shape[-1]).abs()
            return m.double() * (gz.abs().flatten(0, 1).T.double() @ x.abs().flatten(0, 1).double())
        # Generic: per-image weight gradients by vmap over the images of a chunk.
        from torch.func import grad, vmap

        def inner(wt: torch.Tensor, xn: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
            return (self.forward_call(call, xn[None], wt, None) * gn[None]).sum()

        per_image = vmap(grad(inner), in_dims=(None, 0, 0))
        n = x.shape[0]
        per = max(1, _PER_SAMPLE_BUDGET // max(1, w.numel() + x[:1].numel() + gz[:1].numel())) // rows * rows or rows
        out = None
        for a in range(0, n, per):
            gw = per_image(w, x[a : a + per], gz[a : a + per])
            e = vmap(lambda gi: self.regroup(gi * w, groups).sum(-1))(gw)  # per image, no Python loop
            e = e.reshape(-1, rows, *e.shape[1:]).sum(1)  # an image's rows are one sample
            part = e.abs().sum(0, dtype=torch.float64)
            out = part if out is None else out + part
        return out

    def io_flows(self, call: dict[str, Any], w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor,
                 gz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``io_edges`` layers: the edge flows ``(out, in)`` and bias flows ``(out,)`` of a batch, float64.

        ``x`` and ``gz`` are ``(batch, 1, units)``: a single channel convolved across the units."""
        m = self.unit_matrix(call, w, x.shape[-1])
        g2, x2 = gz.flatten(0, 1).double(), x.flatten(0, 1).double()
        bias = None if b is None else b.double() * g2.sum(0)
        return m.double() * (g2.T @ x2), bias

    def forward_call(self, call: dict[str, Any], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The op as a function of its input, weight and bias, from its recorded call."""
        return call["fn"](x, w, b)


# ----------------------------------------------------------------------------- conv2d
def _conv2d_module(m: nn.Module) -> tuple[int, int, dict[str, Any]]:
    return m.groups, m.in_channels, dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                                         padding_mode=m.padding_mode, kernel_size=m.kernel_size)


def _conv_function(arg: Arg, wshape: tuple[int, ...]) -> tuple[int, int, dict[str, Any]]:
    groups = int(arg(6, "groups", 1))
    return groups, wshape[1] * groups, dict(stride=arg(3, "stride", 1), padding=arg(4, "padding", 0),
                                            dilation=arg(5, "dilation", 1), groups=groups, padding_mode="zeros",
                                            kernel_size=tuple(wshape[2:]))


def _conv_regroup(w: torch.Tensor, groups: int) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1], -1)


def _conv2d_per_sample(call: dict[str, Any], groups: int, group: int, w: torch.Tensor, x: torch.Tensor,
                       gz: torch.Tensor, device: torch.device, rows: int = 1) -> torch.Tensor:
    n = x.shape[0]
    k = tuple(call["kernel_size"])
    pad, stride, dil = call["padding"], call["stride"], call["dilation"]
    if call.get("padding_mode", "zeros") != "zeros" or isinstance(pad, str):
        x, pad = _explicit_pad(x, call, k)
    o, cg = w.shape[0], w.shape[1]
    og = o // groups
    K = int(np.prod(k))
    L = gz.shape[2] * gz.shape[3]
    per_img = o * cg * K + x.shape[1] * K * L
    per = max(rows, _PER_SAMPLE_BUDGET // per_img // rows * rows)  # whole images (rows each) per chunk
    wv = w.reshape(groups, og, cg, K)
    out = torch.zeros(groups, og, cg, dtype=torch.float64, device=device)
    for a in range(0, n, per):
        xs = x[a : a + per]
        b = xs.shape[0]
        if K == 1 and _is_zero(pad):
            # a 1x1 conv reads each position once: strided view instead of an im2col copy
            st = (stride, stride) if isinstance(stride, int) else tuple(stride)
            U = xs[:, :, :: st[0], :: st[1]].reshape(b, groups, cg, L)
        else:
            U = F.unfold(xs, k, dilation=dil, padding=pad, stride=stride).reshape(b, groups, cg * K, L)
        G = gz[a : a + per].reshape(b, groups, og, L)
        P = torch.einsum("ngol,ngkl->ngok", G, U).reshape(b, groups, og, cg, K)
        E = torch.einsum("ngock,gock->ngoc", P, wv)
        if rows > 1:  # positions folded into the batch: an image's rows are one sample
            E = E.reshape(-1, rows, *E.shape[1:]).sum(1)
        out += E.abs().sum(0, dtype=torch.float64)
    return out.reshape(o, cg)


def _is_zero(pad: Any) -> bool:
    return pad == 0 or pad == "valid" or (isinstance(pad, (tuple, list)) and all(p == 0 for p in pad))


def _explicit_pad(x: torch.Tensor, call: dict[str, Any], k: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    pad = call["padding"]
    dil = call["dilation"]
    dil = (dil, dil) if isinstance(dil, int) else tuple(dil)
    if pad == "valid":
        return x, 0
    if pad == "same":
        tot = [d * (kk - 1) for d, kk in zip(dil, k)]
        p = (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2)
    else:
        pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
        p = (pad[1], pad[1], pad[0], pad[0])
    mode = call.get("padding_mode", "zeros")
    mode = "constant" if mode == "zeros" else mode
    return F.pad(x, p, mode=mode), 0


CONV2D = Dense(
    "conv2d", Kind.CONV, (nn.Conv2d,), (F.conv2d, torch.conv2d), _conv2d_module, _conv_function,
    forward=lambda m, x, w, b: m._conv_forward(x, w, b), regroup=_conv_regroup,
    geometry=lambda call: (call["kernel_size"], call["stride"], call["padding"], call["dilation"]),
    per_sample=_conv2d_per_sample,
)


# A convolution whose input channels are the positions of one unit (CSATv2's stem: the 64 DCT
# frequencies of the Y channel of every 8x8 block, read by a 1x1 convolution): one edge from that
# unit to each output channel, summed over the input channels and the kernel.
CONV2D_ONE_UNIT = Dense(
    "conv2d_one_unit", Kind.CONV, (), (), _conv2d_module, _conv_function,
    forward=lambda m, x, w, b: m._conv_forward(x, w, b), regroup=lambda w, groups: w.reshape(w.shape[0], 1, -1),
    geometry=lambda call: (call["kernel_size"], call["stride"], call["padding"], call["dilation"]),
)


# ----------------------------------------------------------------------------- conv1d
def _conv1d_module(m: nn.Module) -> tuple[int, int, dict[str, Any]]:
    groups, in_feat, call = _conv2d_module(m)
    if m.padding_mode != "zeros":
        mode, pad = m.padding_mode, m._reversed_padding_repeated_twice
        call["fn"] = lambda x, w, b: F.conv1d(F.pad(x, pad, mode=mode), w, b, m.stride, 0, m.dilation, m.groups)
    else:
        call["fn"] = lambda x, w, b: F.conv1d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    return groups, in_feat, call


def _conv1d_function(arg: Arg, wshape: tuple[int, ...]) -> tuple[int, int, dict[str, Any]]:
    groups, in_feat, call = _conv_function(arg, wshape)
    call["fn"] = lambda x, w, b: F.conv1d(x, w, b, call["stride"], call["padding"], call["dilation"], groups)
    return groups, in_feat, call


CONV1D = Dense(
    "conv1d", Kind.CONV, (nn.Conv1d,), (F.conv1d, torch.conv1d), _conv1d_module, _conv1d_function,
    forward=lambda m, x, w, b: m._conv_forward(x, w, b), regroup=_conv_regroup,
)


# A Conv1d across the units of a pooled tensor: ECA attention (Wang et al. 2020) runs a Conv1d with
# one channel over the channel axis of (batch, 1, channels), so the conv's positions are the units
# and each unit reads its k neighbours through one shared kernel: a banded (units x units) matrix.
CONV1D_UNITS = Dense(
    "conv1d_units", Kind.CONV, (), (), _conv1d_module, _conv1d_function,
    forward=lambda m, x, w, b: m._conv_forward(x, w, b), regroup=_conv_regroup, units_along=2, io_edges=True,
)


# ----------------------------------------------------------------------------- conv_transpose2d
def _conv_t_module(m: nn.Module) -> tuple[int, int, dict[str, Any]]:
    call = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                output_padding=m.output_padding, kernel_size=m.kernel_size)
    call["fn"] = lambda x, w, b: F.conv_transpose2d(x, w, b, m.stride, m.padding, m.output_padding, m.groups,
                                                    m.dilation)
    return m.groups, m.in_channels, call


def _conv_t_function(arg: Arg, wshape: tuple[int, ...]) -> tuple[int, int, dict[str, Any]]:
    groups = int(arg(6, "groups", 1))
    call = dict(stride=arg(3, "stride", 1), padding=arg(4, "padding", 0), output_padding=arg(5, "output_padding", 0),
                dilation=arg(7, "dilation", 1), groups=groups, kernel_size=tuple(wshape[2:]))
    call["fn"] = lambda x, w, b: F.conv_transpose2d(x, w, b, call["stride"], call["padding"], call["output_padding"],
                                                    groups, call["dilation"])
    return groups, wshape[0], call


def _conv_t_forward(m: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv_transpose2d(x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


def _conv_t_regroup(w: torch.Tensor, groups: int) -> torch.Tensor:
    # (I, O/g, kh, kw): input channel i of group i // (I/g) reaches outputs of that group
    i, og = w.shape[0], w.shape[1]
    return w.reshape(groups, i // groups, og, -1).transpose(1, 2).reshape(groups * og, i // groups, -1)


def _conv_t_geometry(call: dict[str, Any]) -> tuple[Any, Any, Any, Any] | None:
    # With stride 1 a transposed conv is a conv with the kernel flipped and padding d (k - 1) - p;
    # with a larger stride an output position reads a window that changes with its phase (no box).
    s, p, d, k = (_pair(call[f]) for f in ("stride", "padding", "dilation", "kernel_size"))
    if s != (1, 1) or isinstance(call["padding"], str):
        return None
    return k, 1, tuple(dd * (kk - 1) - pp for dd, kk, pp in zip(d, k, p)), d


def _pair(v: Any) -> tuple[Any, Any]:
    return (v[0], v[-1]) if isinstance(v, (tuple, list)) else (v, v)


CONV_T2D = Dense(
    "conv_t2d", Kind.CONV, (nn.ConvTranspose2d,), (F.conv_transpose2d, torch.conv_transpose2d), _conv_t_module,
    _conv_t_function, forward=_conv_t_forward, regroup=_conv_t_regroup, geometry=_conv_t_geometry,
)


# ----------------------------------------------------------------------------- linear
def _linear_per_sample(call: dict[str, Any], groups: int, grp: int, w: torch.Tensor, x: torch.Tensor,
                       gz: torch.Tensor, device: torch.device, rows: int = 1) -> torch.Tensor:
    n = x.shape[0] // rows
    o = w.shape[0]
    c = w.shape[1] // grp
    wv = w.reshape(o, c, grp)
    # positions of a channels-last or token tensor are summed like a conv's; an image's rows
    # (positions folded into the batch) are consecutive, so its windows are positions too
    p = max(1, x[:rows].numel() // (c * grp))
    per = max(1, _PER_SAMPLE_BUDGET // max(1, o * c * p))
    out = torch.zeros(o, c, dtype=torch.float64, device=device)
    for a in range(0, n, per):
        xs = x[a * rows : (a + per) * rows].reshape(-1, p, c, grp)
        gs = gz[a * rows : (a + per) * rows].reshape(-1, p, o)
        e = torch.einsum("npcs,ocs,npo->noc", xs, wv, gs)
        out += e.abs().sum(0, dtype=torch.float64)
    return out


LINEAR = Dense(
    "linear", Kind.LINEAR, (nn.Linear,), (F.linear,), lambda m: (1, m.in_features, {}),
    lambda arg, wshape: (1, wshape[1], {}), forward=lambda m, x, w, b: F.linear(x, w, b),
    regroup=lambda w, groups: w.reshape(w.shape[0], -1, 1), per_sample=_linear_per_sample, grouped_input=True,
)

STRATEGIES: dict[str, Dense] = {d.name: d for d in (CONV2D, CONV2D_ONE_UNIT, CONV1D, CONV1D_UNITS, CONV_T2D, LINEAR)}
#: dense modules, traced as leaves when they run their stock forward
DENSE_MODULES: tuple[type, ...] = tuple(t for d in STRATEGIES.values() for t in d.modules)
DENSE_FUNCTIONS: frozenset[Any] = frozenset(f for d in STRATEGIES.values() for f in d.functions)


def of_module(m: nn.Module) -> Dense | None:
    """The strategy of a module that runs a stock dense forward, or None."""
    for d in STRATEGIES.values():
        if d.is_stock(m):
            return d
    return None


def of_function(target: Any) -> Dense | None:
    """The strategy of a dense function (``F.conv2d``, ``F.linear``, ...), or None."""
    for d in STRATEGIES.values():
        if target in d.functions:
            return d
    return None


def of_spec(spec: Any) -> Dense:
    """The strategy of a dense :class:`~connectome.extract.unitgraph.LayerSpec`."""
    return STRATEGIES[spec.dense or ("conv2d" if spec.kind == Kind.CONV else "linear")]


def positions_bias(bias: torch.Tensor | None, ndim: int, dim: int) -> torch.Tensor | None:
    """The bias of a Linear over positions (``dim`` of an ``ndim``-dim value), shaped to broadcast."""
    if bias is None:
        return None
    shape = [1] * ndim
    shape[dim] = bias.shape[0]
    return bias.detach().reshape(shape)
