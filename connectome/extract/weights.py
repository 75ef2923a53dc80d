"""The static connectome: edges are weights, BatchNorm folded in."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from connectome._version import versions
from connectome.errors import ExtractionError
from connectome.extract._model import check_model, eval_mode, model_device, model_dtype
from connectome.extract.build import assemble, graph_layers
from connectome.extract import dense
from connectome.extract.trace import LayerSpec, UnitGraph, layer_weight, trace_units
from connectome.extract.rules import RULES
from connectome.graph import Connectome
from connectome.kinds import DENSE, KINDS, Kind

__all__ = ["weights", "chain_scale", "weight_notes"]

_REDUCE = ("sum", "l1", "l2")


def _check_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a tuple of ints such as (3, 224, 224), got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes without the batch, such as (3, 224, 224); got {input_shape!r}")
    return shape


def chain_scale(ug: UnitGraph, spec: LayerSpec, nodes: Any = None) -> torch.Tensor | None:
    """Per-unit factor of a layer's per-unit ops (BN scale, ``x * a``, a layer scale) on ``nodes``.

    By default the ops between the layer and the value it passes on; with ``nodes``, the
    ops on one consumer's read path after the branch point. Each op's factor comes from its
    rule (:data:`connectome.extract.rules.RULES`); ops whose factor depends on the data
    (gates, normalisations, smooth activations) are not folded.
    """
    scale = None
    on_chain = set(spec.chain if nodes is None else nodes)
    for op in spec.bias_ops:
        if op.node not in on_chain:
            continue
        rule = RULES[op.kind]
        if rule.scale is None:
            continue
        s = _per_unit(ug, op, rule.scale(op), spec)
        if s is None:
            continue
        scale = s if scale is None else scale * s
    return scale


def _per_unit(ug: UnitGraph, op: Any, factor: Any, spec: LayerSpec) -> torch.Tensor | None:
    """A data-independent factor as one number per unit of ``spec`` (None: 1 everywhere)."""
    if factor is None:
        return None
    if not isinstance(factor, torch.Tensor):
        return torch.full((spec.size,), float(factor), dtype=torch.float64)
    f = factor.detach().double().cpu()
    shape = ug.shapes[op.node]
    u = ug.units[op.node]
    if RULES[op.kind].channel_scale:  # a vector along dim 1 of the value: per channel, or per feature of a flattened map
        idx = u.along(1, shape[1], spec.size) if len(shape) > 1 else None
        if idx is None and u.batch == 0 and u.dims == (0, 1) and u.index is not None:
            # heads folded into the batch: the channel of each head's row (MViTv2's pooled q, k, v)
            idx = np.asarray(u.index, dtype=np.int64)  # (heads, channels)
            f = f.reshape(1, -1).expand(idx.shape[0], -1) if f.numel() == idx.shape[1] else f
            idx = idx.reshape(-1)
        per_unit = idx is not None and f.numel() == idx.size
        if per_unit:
            # a channel of the value is unit idx[channel] (after a shuffle or a split): one factor per unit
            out = torch.ones(spec.size, dtype=torch.float64)
            first = np.unique(idx, return_index=True)[1]
            out[torch.as_tensor(idx[first])] = f.reshape(-1)[torch.as_tensor(first)]
            per_unit = torch.equal(out[torch.as_tensor(idx)], f.reshape(-1))  # the same factor on all of a unit
        if not per_unit:
            raise ExtractionError(
                f"{op.node!r} normalises {f.numel()} features of the {spec.size} units of layer {spec.name!r} "
                "with different factors per position; a per-position BatchNorm cannot be folded into unit edges "
                "(attribution graphs handle it)"
            )
        return out
    if f.dim() > len(shape):
        raise ExtractionError(f"{op.node!r} multiplies by a tensor of shape {tuple(f.shape)} that is larger than the data")
    if u.batch != 0:
        raise ExtractionError(f"{op.node!r} scales a value whose batch dim is not its first; the weight graph "
                              "cannot fold it into unit edges (attribution graphs handle it)")
    # the factor over one image's rows (its heads, when they are folded into the batch)
    dims = tuple(d % len(shape) for d in u.dims)
    rows = u.windows if 0 in dims else 1
    full = f.reshape((1,) * (len(shape) - f.dim()) + tuple(f.shape)).expand((rows, *shape[1:]))
    slots = int(np.prod([rows if d == 0 else shape[d] for d in dims], dtype=np.int64))
    first = full.movedim(dims, tuple(range(len(dims)))).reshape(slots, -1)
    if not torch.equal(first, first[:, :1].expand_as(first)):
        raise ExtractionError(
            f"{op.node!r} scales positions differently; a per-position factor cannot be folded into unit edges "
            "(attribution graphs handle it)"
        )
    col = first[:, 0]
    out = torch.ones(spec.size, dtype=torch.float64)
    if dims == ():
        idx = torch.as_tensor([int(np.asarray(u.index))])
    else:
        idx = torch.arange(shape[dims[0]]) if u.index is None else torch.as_tensor(np.asarray(u.index).reshape(-1))
    out[idx] = col
    return out


def weights(
    model: nn.Module,
    input_shape: Sequence[int],
    reduce: str = "sum",
    labels: Sequence[str] | None = None,
    name: str | None = None,
) -> Connectome:
    """The weight connectome of a model: units and the weights that wire them.

    A conv edge ``j <- i`` is the kernel ``W[j, i]`` reduced over positions; a Linear that
    reads a flattened ``C x H x W`` tensor gets one edge per channel, its weights reduced
    over positions. BatchNorm (eval) that follows a layer is folded in: edges into unit ``j``
    are multiplied by its scale ``gamma_j / sqrt(var_j + eps)``. Residual adds and concats
    are identity edges (weight 1, scaled likewise).

    Parameters
    ----------
    model : nn.Module
        Any fx-traceable CNN or MLP (torchvision models included). Left as found.
    input_shape : tuple of int
        One input without the batch, e.g. ``(3, 224, 224)``.
    reduce : {"sum", "l1", "l2"}, default "sum"
        How a kernel becomes one number: signed sum, sum of |w|, or Euclidean norm.
    labels : sequence of str, optional
        Class names for the output units.
    name : str, optional
        Model name for ``meta["model"]`` (default: the class name).

    Returns
    -------
    Connectome
        ``meta["method"] == "weights"``; edge weights are float32.

    Raises
    ------
    ExtractionError
        The model is not an ``nn.Module``, cannot be traced, rejects ``input_shape``, uses
        an op that mixes units, or has NaN/inf weights.

    Examples
    --------
    >>> import torch.nn as nn
    >>> g = weights(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (4,))
    >>> [l.size for l in g.layers]
    [4, 3, 2]
    """
    check_model(model)
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    shape = _check_shape(input_shape)
    t0 = time.perf_counter()
    with eval_mode(model, warn=False), torch.inference_mode():
        example = torch.zeros((1, *shape), dtype=model_dtype(model), device=model_device(model))
        ug = trace_units(model, example)
        values: dict[int, Any] = {}
        for li, spec in enumerate(ug.layers):
            if spec.kind == Kind.INPUT:
                continue
            scale = chain_scale(ug, spec)
            if KINDS[spec.kind].edges == DENSE:
                w, _ = layer_weight(ug, spec)
                op = spec.operands[0]
                if reduce == "l2" and op.cols is not None and np.unique(op.cols).size < op.cols.size:
                    raise ExtractionError(
                        f"layer {spec.name!r} reads each unit of {ug.layers[op.layer].name!r} through several "
                        "columns (a channels-last flatten or a repeated channel); reduce='l2' cannot be split over them yet: "
                        "use reduce='sum' or 'l1'"
                    )
                # Reduce in the model's dtype first: a float64 copy of every kernel costs more
                # than the reduction (the graph stores float32 weights anyway).
                w = dense.of_spec(spec).blocks(w.detach(), spec)
                if reduce == "sum":
                    r = w.sum(-1)
                elif reduce == "l1":
                    r = w.abs().sum(-1)
                else:
                    r = w.pow(2).sum(-1).sqrt()
                r = r.double().cpu()
                if not torch.isfinite(r).all():
                    raise ExtractionError(
                        f"layer {spec.name!r} has NaN or inf weights; the model is broken (check training "
                        "or the weights file)"
                    )
                if scale is not None:
                    r = r * (scale if reduce == "sum" else scale.abs())[:, None]
                src_scale = chain_scale(ug, ug.layers[op.layer], op.path) if op.path else None
                if src_scale is not None:
                    # column c of group k reads input channel k*Cg + c, which is source unit cols[...]
                    cg = r.shape[1]
                    idx = (torch.arange(r.shape[0]) // (r.shape[0] // spec.groups))[:, None] * cg + torch.arange(cg)[None, :]
                    if op.cols is not None:
                        idx = torch.as_tensor(np.asarray(op.cols))[idx]
                    s = src_scale[idx]
                    r = r * (s if reduce == "sum" else s.abs())
                # rounded to the graph's float32 once, per layer: no float64 copy of every edge
                values[li] = r.numpy().astype(np.float32)
            else:
                vals = []
                for op in spec.operands:
                    n = op.width
                    v = torch.full((n,), op.sign, dtype=torch.float64)
                    if scale is not None:
                        s = scale[op.offset : op.offset + n]
                        v = v * (s if reduce == "sum" else s.abs())
                    src_scale = chain_scale(ug, ug.layers[op.layer], op.path) if op.path else None
                    if src_scale is not None:
                        if op.cols is not None:
                            src_scale = src_scale[torch.as_tensor(np.asarray(op.cols))]
                        v = v * (src_scale if reduce == "sum" else src_scale.abs())
                    vals.append(v.numpy())
                values[li] = vals
    meta = {
        "model": name or type(model).__name__,
        "method": "weights",
        "reduce": reduce,
        "input_shape": list(shape),
        "seconds": round(time.perf_counter() - t0, 3),
        "versions": versions(),
    }
    notes = weight_notes(ug)
    if notes:
        meta["not_folded"] = notes
    return assemble(ug, graph_layers(ug, labels), values, meta=meta, dtype=np.float32)


def weight_notes(ug: UnitGraph) -> list[str]:
    """What the weight connectome leaves out of its edges (``Rule.weight_note``): the data-dependent
    parts of the model, which have no weights to fold (a gate, attention, a normalisation's
    statistics, an element-wise non-linearity), one line per rule the model uses."""
    kinds = {op.kind for s in ug.layers for op in s.bias_ops} | {s.kind for s in ug.layers}
    return sorted({RULES[k].weight_note for k in kinds if k in RULES and RULES[k].weight_note})

