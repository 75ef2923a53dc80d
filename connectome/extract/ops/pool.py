"""Pooling and padding: exact as they are (a max pool picks one input, an average is linear);
padding with a non-zero constant has a constant part (the pad rule)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from connectome.extract.ops._core import NONE, Call, Op, Receptive, add


def _window(call: Call) -> dict[str, Any]:
    m = call.module
    if m is not None:
        return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": getattr(m, "dilation", 1)}
    avg = call.node.target is F.avg_pool2d  # no dilation argument
    return {"kernel_size": call.arg(1, "kernel_size", 1), "stride": call.arg(2, "stride", None),
            "padding": call.arg(3, "padding", 0), "dilation": 1 if avg else call.arg(4, "dilation", 1)}


def _pad_params(call: Call) -> tuple[tuple[int, ...], float] | None:
    value = call.plain(3, "value", None)
    if call.plain(2, "mode", "constant") == "constant" and value not in (None, 0, 0.0):
        return (tuple(call.plain(1, "pad", ())), float(value))
    return None  # zeros, or a reflection of the data: exact as it is


add(Op("pool2d", NONE, Receptive.WINDOW, modules=(nn.MaxPool2d, nn.AvgPool2d),
       functions=(F.max_pool2d, torch.max_pool2d, F.avg_pool2d), geometry=_window, pooled=2,
       examples=(lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(3, 1, 1), lambda: lambda x: F.max_pool2d(x, 3, 2, 1))))
add(Op("pool1d", NONE, Receptive.GLOBAL, modules=(nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                                                  nn.AdaptiveMaxPool1d),
       functions=(F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d), pooled=1,
       examples=(lambda: lambda x: F.max_pool1d(x.flatten(2), 2).view(x.shape[0], 4, 4, 8),
                 lambda: nn.Sequential(nn.Flatten(2), nn.AdaptiveAvgPool1d(32), nn.Unflatten(2, (4, 8))))))
# to any output size: the box is kept where the grid is (a pool to 1x1 reads the whole image)
add(Op("adaptive_pool2d", NONE, Receptive.POINTWISE, modules=(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
       functions=(F.adaptive_avg_pool2d, F.adaptive_max_pool2d), pooled=2,
       examples=(lambda: nn.AdaptiveAvgPool2d(8), lambda: nn.AdaptiveMaxPool2d(3))))
add(Op("zero_pad2d", NONE, Receptive.PAD, modules=(nn.ZeroPad2d,), geometry=lambda call: {"pad": call.module.padding},
       pooled=2, examples=(lambda: nn.ZeroPad2d((1, 0, 2, 1)),)))
# (nn.ZeroPad2d is a ConstantPad2d: the most specific class wins, so it stays zero_pad2d)
add(Op("constant_pad2d", "pad", Receptive.PAD, modules=(nn.ConstantPad2d,),
       params=lambda call: (tuple(call.module.padding), float(call.module.value)) if call.module.value != 0 else None,
       geometry=lambda call: {"pad": call.module.padding}, pooled=2,
       examples=(lambda: nn.ConstantPad2d((1, 0, 2, 1), 0.5), lambda: nn.ConstantPad2d(1, 0.0))))
add(Op("pad", "pad", Receptive.PAD, functions=(F.pad,), params=_pad_params,
       geometry=lambda call: {"pad": call.plain(1, "pad", ())},
       examples=(lambda: lambda x: F.pad(x, (1, 1, 0, 2), value=0.5), lambda: lambda x: F.pad(x, (2, 0, 1, 0)))))
