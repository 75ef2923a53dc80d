"""Normalisations: BatchNorm in eval mode (affine, folded), and the ones whose statistics the
norm rule holds constant (LayerNorm, GroupNorm, RMSNorm, ``F.normalize``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from connectome.extract.ops._core import Call, Op, Receptive, Unsupported, add


def _bn(mean: Any, var: Any, weight: Any, bias: Any, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    var = var.detach()
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.detach()
    shift = -mean.detach() * scale
    if bias is not None:
        shift = shift + bias.detach()
    return (scale, shift)


def _batch_norm(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    m = call.module
    if m is not None:
        if m.running_mean is None or m.running_var is None:
            raise Unsupported("BatchNorm without running statistics cannot be folded; build it with "
                              "track_running_stats=True")
        return _bn(m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    if call.arg(5, "training", False):
        raise Unsupported("F.batch_norm in training mode; extraction runs the model in eval mode")
    mean, var = call.const_of(call.arg(1, "running_mean")), call.const_of(call.arg(2, "running_var"))
    if mean is None or var is None:
        raise Unsupported("F.batch_norm without running statistics cannot be folded")
    w, b = call.const_of(call.arg(3, "weight")), call.const_of(call.arg(4, "bias"))
    return _bn(mean, var, w, b, float(call.arg(7, "eps", 1e-5)))


def _detached(t: Any) -> torch.Tensor | None:
    return t.detach() if t is not None else None


def _affine_args(call: Call, name: str, wpos: int, bpos: int) -> tuple[Any, Any]:
    for pos, key in ((wpos, "weight"), (bpos, "bias")):
        a = call.arg(pos, key)
        if a is not None and not isinstance(a, (int, float)) and call.const_of(a) is None:
            raise Unsupported(f"{name} with a {key} computed from the data (only parameters and buffers map: the "
                              "normalisation rule holds them constant)")
    return call.const_of(call.arg(wpos, "weight")), call.const_of(call.arg(bpos, "bias"))


def _shape(v: Any) -> tuple[int, ...]:
    return (int(v),) if isinstance(v, int) else tuple(v)


def _layer_norm(call: Call) -> tuple[Any, ...]:
    m = call.module
    if m is not None:
        return ("layer", tuple(m.normalized_shape), _detached(m.weight), m.eps, _detached(m.bias))
    w, b = _affine_args(call, "layer_norm", 2, 3)
    return ("layer", _shape(call.plain(1, "normalized_shape")), w, float(call.arg(4, "eps", 1e-5)), b)


def _group_norm(call: Call) -> tuple[Any, ...]:
    m = call.module
    if m is not None:
        return ("group", m.num_groups, _detached(m.weight), m.eps, _detached(m.bias))
    w, b = _affine_args(call, "group_norm", 2, 3)
    return ("group", int(call.plain(1, "num_groups", 1)), w, float(call.arg(4, "eps", 1e-5)), b)


def _rms_norm(call: Call) -> tuple[Any, ...]:
    m = call.module
    if m is not None:
        return ("rms", tuple(m.normalized_shape), _detached(m.weight), m.eps, None)
    w, _ = _affine_args(call, "rms_norm", 2, 99)
    eps = call.plain(3, "eps", None)
    return ("rms", _shape(call.plain(1, "normalized_shape")), w, None if eps is None else float(eps), None)


def _normalize(call: Call) -> tuple[Any, ...]:
    p, dim, eps = call.plain(1, "p", 2.0), call.plain(2, "dim", 1), call.plain(3, "eps", 1e-12)
    if not all(isinstance(v, (int, float)) for v in (p, dim, eps)) or isinstance(dim, float):
        raise Unsupported("F.normalize with p, dim or eps that are not numbers")
    if call.arg(4, "out") is not None:
        raise Unsupported("F.normalize with out=")
    return ("lp", (float(p), int(dim)), None, float(eps), None)


def _last_dims(call: Call) -> dict[str, Any]:
    m = call.module
    shape = m.normalized_shape if m is not None else _shape(call.plain(1, "normalized_shape"))
    return {"dims": tuple(range(-len(shape), 0))}


def _bn_example() -> nn.Module:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return bn


def _channels_last(f: Any) -> Any:
    return lambda x: f(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


add(Op("batch_norm", "bn", Receptive.POINTWISE, modules=(nn.BatchNorm1d, nn.BatchNorm2d), functions=(F.batch_norm,),
       params=_batch_norm, examples=(_bn_example,)))
add(Op("layer_norm", "norm", Receptive.STATS, modules=(nn.LayerNorm,), functions=(F.layer_norm,), params=_layer_norm,
       geometry=_last_dims, examples=(lambda: nn.LayerNorm(8), lambda: _channels_last(lambda x: F.layer_norm(x, (4,))))))
add(Op("group_norm", "norm", Receptive.GLOBAL, modules=(nn.GroupNorm,), functions=(F.group_norm,),
       params=_group_norm, examples=(lambda: nn.GroupNorm(2, 4),)))
add(Op("rms_norm", "norm", Receptive.STATS, modules=(nn.RMSNorm,), functions=(F.rms_norm,), params=_rms_norm,
       geometry=_last_dims, examples=(lambda: nn.RMSNorm(8), lambda: _channels_last(lambda x: F.rms_norm(x, (4,))))))
add(Op("normalize", "norm", Receptive.STATS, functions=(F.normalize,), params=_normalize,
       geometry=lambda call: {"dims": (int(call.plain(2, "dim", 1)),)},
       examples=(lambda: lambda x: F.normalize(x, dim=1), lambda: lambda x: F.normalize(x, 1.5, 3))))
