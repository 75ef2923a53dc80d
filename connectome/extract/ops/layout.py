"""Layout ops: they move or select units (views, permutes, splits, indexing, means over
positions) and are followed by running them on a tensor of unit numbers; and ``torch.cat``."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn

from connectome.extract.ops._core import CONSTRUCT, LAYOUT, Call, Op, Receptive, add


def _permute_dims(call: Call) -> dict[str, Any]:
    node = call.node
    if node.op == "call_function":
        return {"dims": call.arg(1, "dims", ())}
    first = call.arg(1, "dims", 0)
    return {"dims": node.args[1:] if len(node.args) > 2 or not isinstance(first, (tuple, list)) else first}


add(Op("reshape", LAYOUT, Receptive.RESHAPE, modules=(nn.Flatten, nn.Unflatten), functions=(torch.flatten, torch.reshape),
       methods=("view", "reshape", "flatten")))
add(Op("permute", LAYOUT, Receptive.PERMUTE, functions=(torch.permute,), methods=("permute",), geometry=_permute_dims))
add(Op("transpose", LAYOUT, Receptive.TRANSPOSE, functions=(torch.transpose, torch.swapaxes),
       methods=("transpose", "swapaxes"), geometry=lambda call: {"dims": (call.node.args[1], call.node.args[2])}))
add(Op("contiguous", LAYOUT, Receptive.POINTWISE, methods=("contiguous", "expand_as")))
add(Op("squeeze", LAYOUT, Receptive.GLOBAL, functions=(torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim),
       methods=("squeeze", "unsqueeze", "narrow", "movedim", "unflatten")))
add(Op("split", LAYOUT, Receptive.SPLIT, functions=(torch.chunk, torch.split), methods=("chunk", "split"),
       geometry=lambda call: {"dim": call.arg(2, "dim", 0)}, multi_output=True))
add(Op("unbind", LAYOUT, Receptive.SPLIT, functions=(torch.unbind,), methods=("unbind",),
       geometry=lambda call: {"dim": call.arg(1, "dim", 0)}, multi_output=True))
add(Op("getitem", LAYOUT, Receptive.SPLIT, functions=(operator.getitem,), multi_output=True))
add(Op("mean", LAYOUT, Receptive.GLOBAL, functions=(torch.mean,), methods=("mean",), reduces=True))
add(Op("cat", CONSTRUCT, Receptive.CONCAT, functions=(torch.cat, torch.concat), construct="concat",
       geometry=lambda call: {"dim": call.arg(1, "dim", 0)}))
