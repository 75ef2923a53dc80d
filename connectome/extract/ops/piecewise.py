"""Piecewise-linear and linear element-wise ops: ReLU-likes and clamps, dropout, copies.

ReLU-likes pass 0 at 0 and are linear on each piece, so they are exact as they are (no rule);
clamps saturate at constant bounds, which the clamp rule makes a bias term.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.extract.ops._core import NONE, Call, Op, Receptive, Unsupported, add

P = Receptive.POINTWISE


def _bounds(lo: Any, hi: Any, call: Call | None = None) -> tuple[Any, Any]:
    def number(b: Any) -> Any:
        # a bound held in a one-element buffer (Gemma 4's clipped linears) is a number
        v = call.const_of(b) if call is not None and isinstance(b, fx.Node) else b
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v.reshape(()))
        if isinstance(b, (fx.Node, torch.Tensor)):
            raise Unsupported("a clamp with tensor bounds (only number bounds, or one-element constants, map)")
        return b
    return (number(lo), number(hi))


class _BufferBounds(nn.Module):
    """A clamp whose bounds are one-element buffers (Gemma 4's clipped linears)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(-0.3))
        self.register_buffer("hi", torch.tensor(0.4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)


def _hardtanh(call: Call) -> tuple[Any, Any]:
    if call.module is not None:
        return (call.module.min_val, call.module.max_val)
    return _bounds(call.arg(1, "min_val", -1.0), call.arg(2, "max_val", 1.0))


def _stochastic_depth_example() -> nn.Module:
    from torchvision.ops import StochasticDepth  # optional: the entry matches it by name

    return StochasticDepth(0.2, "row")


def _stochastic_depth(call: Call) -> None:
    if call.arg(3, "training", True):
        raise Unsupported("stochastic depth in training mode; extraction runs the model in eval mode")
    return None  # the identity in eval mode


add(Op("relu", NONE, P, modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu", "relu_"),
       inplace_arg=1, inplace_variants=((F.relu_, F.relu), (torch.relu_, torch.relu)),
       examples=(nn.ReLU, lambda: nn.ReLU(inplace=True), lambda: F.relu, lambda: torch.relu, lambda: lambda x: x.relu_())))
add(Op("leaky_relu", NONE, P, modules=(nn.LeakyReLU,), functions=(F.leaky_relu,), inplace_arg=2,
       examples=(lambda: nn.LeakyReLU(0.1), lambda: F.leaky_relu)))
add(Op("prelu", NONE, P, modules=(nn.PReLU,), examples=(lambda: nn.PReLU(init=0.3),)))
add(Op("relu6", "clamp", P, modules=(nn.ReLU6,), functions=(F.relu6,), params=lambda call: (0.0, 6.0),
       inplace_arg=1, examples=(nn.ReLU6, lambda: lambda x: F.relu6(x * 20.0))))
add(Op("hardtanh", "clamp", P, modules=(nn.Hardtanh,), functions=(F.hardtanh,), params=_hardtanh, inplace_arg=3,
       examples=(lambda: nn.Hardtanh(-0.5, 0.5), lambda: lambda x: F.hardtanh(x, -0.2, 0.3))))
add(Op("clamp", "clamp", P, functions=(torch.clamp, torch.clip), methods=("clamp", "clamp_", "clip", "clip_"),
       params=lambda call: _bounds(call.arg(1, "min", None), call.arg(2, "max", None), call),
       examples=(lambda: lambda x: x.clamp(-0.3, 0.4), lambda: lambda x: torch.clamp(x, min=-0.2),
                 lambda: _BufferBounds())))
add(Op("dropout", NONE, P, modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout),
       functions=(F.dropout, F.dropout1d, F.dropout2d, torch.dropout), inplace_arg=3,
       examples=(lambda: nn.Dropout(0.5), lambda: lambda x: F.dropout2d(x, 0.5, False))))
add(Op("identity", NONE, P, modules=(nn.Identity,), methods=("clone", "detach", "float", "double", "to", "type_as"),
       examples=(nn.Identity, lambda: lambda x: x.clone())))
add(Op("stochastic_depth", NONE, P, function_names=("torchvision.ops.stochastic_depth.stochastic_depth",),
       params=_stochastic_depth, examples=(_stochastic_depth_example,)))
