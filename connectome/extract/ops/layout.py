"""Layout ops: they move or select units (views, permutes, splits, indexing, means and sums over
positions, rolls, im2col) and are followed by running them on a tensor of unit numbers; resizing
over positions; and ``torch.cat`` / ``torch.stack``."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from connectome.extract.ops._core import CONSTRUCT, LAYOUT, NONE, Call, Op, Receptive, add


def _permute_dims(call: Call) -> dict[str, Any]:
    node = call.node
    if node.op == "call_function":
        return {"dims": call.arg(1, "dims", ())}
    first = call.arg(1, "dims", 0)
    return {"dims": node.args[1:] if len(node.args) > 2 or not isinstance(first, (tuple, list)) else first}


add(Op("reshape", LAYOUT, Receptive.RESHAPE, modules=(nn.Flatten, nn.Unflatten), functions=(torch.flatten, torch.reshape),
       methods=("view", "reshape", "flatten", "reshape_as", "view_as"),
       examples=(lambda: lambda x: x.view(x.shape[0], 2, 2, 8, 8).flatten(1, 2),
                 lambda: nn.Sequential(nn.Unflatten(1, (2, 2)), nn.Flatten(1, 2)))))
add(Op("permute", LAYOUT, Receptive.PERMUTE, functions=(torch.permute,), methods=("permute",), geometry=_permute_dims,
       examples=(lambda: lambda x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2),
                 lambda: lambda x: torch.permute(x, (0, 1, 3, 2)))))
add(Op("transpose", LAYOUT, Receptive.TRANSPOSE, functions=(torch.transpose, torch.swapaxes),
       methods=("transpose", "swapaxes"), geometry=lambda call: {"dims": (call.node.args[1], call.node.args[2])},
       examples=(lambda: lambda x: x.transpose(1, 3).transpose(3, 1), lambda: lambda x: torch.swapaxes(x, 3, 2))))
add(Op("contiguous", LAYOUT, Receptive.POINTWISE, methods=("contiguous", "expand_as"),
       examples=(lambda: lambda x: x.contiguous(),)))
add(Op("squeeze", LAYOUT, Receptive.GLOBAL, functions=(torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim),
       methods=("squeeze", "unsqueeze", "narrow", "movedim", "unflatten"),
       examples=(lambda: lambda x: x.unsqueeze(1).squeeze(1), lambda: lambda x: torch.narrow(x, 2, 1, 5))))
add(Op("split", LAYOUT, Receptive.SPLIT, functions=(torch.chunk, torch.split), methods=("chunk", "split"),
       geometry=lambda call: {"dim": call.arg(2, "dim", 0)}, multi_output=True,
       examples=(lambda: lambda x: torch.chunk(x, 2, 1)[0], lambda: lambda x: x.split(2, 1)[1])))
# an item of unbind's tuple has one dim less than the tensor: its box is not followed
add(Op("unbind", LAYOUT, Receptive.GLOBAL, functions=(torch.unbind,), methods=("unbind",), multi_output=True,
       examples=(lambda: lambda x: x.view(x.shape[0], 2, 2, 8, 8).unbind(1)[1],)))
add(Op("getitem", LAYOUT, Receptive.SPLIT, functions=(operator.getitem,), multi_output=True,
       examples=(lambda: lambda x: x[:, 1:3],)))
add(Op("mean", LAYOUT, Receptive.GLOBAL, functions=(torch.mean,), methods=("mean",), reduces=True,
       examples=(lambda: lambda x: x.mean(3, keepdim=True),)))
add(Op("sum", LAYOUT, Receptive.GLOBAL, functions=(torch.sum,), methods=("sum",), reduces=True,
       examples=(lambda: lambda x: x.sum(3, keepdim=True),)))
# the largest (smallest) value over positions: each output one input of the same unit, exact as
# it is, as a max pool (``x.max(dim).values`` becomes amax when traced)
add(Op("amax", LAYOUT, Receptive.GLOBAL, functions=(torch.amax, torch.amin), methods=("amax", "amin"), reduces=True,
       examples=(lambda: lambda x: x.amax(3, keepdim=True),
                 lambda: lambda x: x.view(x.shape[0], 4, 2, 4, 8).max(2).values)))
# copies along positions (SwiftFormer's global query repeated over the tokens): each copy is the
# same unit; the box of a copied position is not followed
add(Op("repeat", LAYOUT, Receptive.GLOBAL, functions=(torch.tile,), methods=("repeat", "tile"),
       examples=(lambda: lambda x: x.repeat(1, 1, 2, 1)[:, :, 4:12],
                 lambda: lambda x: torch.tile(x, (1, 1, 1, 2))[..., 3:11])))
# positions moved around (a shifted window): units stay, the box of a position is not followed
add(Op("roll", LAYOUT, Receptive.GLOBAL, functions=(torch.roll,), methods=("roll",),
       examples=(lambda: lambda x: torch.roll(x, 1, 3), lambda: lambda x: x.roll((1, 2), (2, 3)))))
# im2col and back: each unit over its kernel offsets (tracing's own code follows the units)
add(Op("unfold", LAYOUT, Receptive.GLOBAL, modules=(nn.Unfold, nn.Fold), functions=(F.unfold, F.fold),
       examples=(lambda: lambda x: F.fold(F.unfold(x, 2, stride=2), (8, 8), 2, stride=2),
                 lambda: nn.Sequential(nn.Unfold(2, stride=2), nn.Fold((8, 8), 2, stride=2)))))
# sliding windows along one dim, ``Tensor.unfold(dim, size, step)`` (HaloNet's halo blocks): each
# copy of a position is the same unit, as with repeat
add(Op("windows", LAYOUT, Receptive.GLOBAL, methods=("unfold",),
       examples=(lambda: lambda x: x.unfold(3, 4, 4).flatten(3, 4),
                 lambda: lambda x: x.unfold(2, 4, 2).unfold(3, 4, 2).mean((-1, -2)))))
# each output position a fixed linear combination of the same channel's input positions: exact
# as it is; fractional jumps fit no integer box, so the box is the whole image
add(Op("resize", NONE, Receptive.GLOBAL, modules=(nn.Upsample,),
       functions=(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), resizes=True,
       examples=(lambda: nn.Upsample(scale_factor=2), lambda: lambda x: F.interpolate(x, size=(4, 4), mode="bilinear"))))
add(Op("stack", CONSTRUCT, Receptive.GLOBAL, functions=(torch.stack,), construct="concat",
       examples=(lambda: lambda x: torch.stack([x, x.relu()], 2).amax(2),)))
add(Op("cat", CONSTRUCT, Receptive.CONCAT, functions=(torch.cat, torch.concat), construct="concat",
       geometry=lambda call: {"dim": call.arg(1, "dim", 0)},
       examples=(lambda: lambda x: torch.cat([x, x.relu()], 1),)))
