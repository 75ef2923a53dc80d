"""Arithmetic: sums and products (residual adds, gates, constants: constructs of tracing) and
negation (a constant scale)."""

from __future__ import annotations

import operator

import torch

from connectome.extract.ops._core import CONSTRUCT, Op, Receptive, add

P = Receptive.POINTWISE

add(Op("add", CONSTRUCT, P, functions=(operator.add, torch.add), methods=("add", "add_"), construct="sum",
       inplace_variants=((operator.iadd, operator.add),),
       examples=(lambda: lambda x: x + x.relu(), lambda: lambda x: x + 1.0, lambda: lambda x: x.add(2.0))))
add(Op("sub", CONSTRUCT, P, functions=(operator.sub, torch.sub), methods=("sub", "sub_"), construct="sum",
       inplace_variants=((operator.isub, operator.sub),),
       examples=(lambda: lambda x: x - x.sigmoid(), lambda: lambda x: 1.0 - x)))
add(Op("mul", CONSTRUCT, P, functions=(operator.mul, torch.mul), methods=("mul", "mul_"), construct="product",
       inplace_variants=((operator.imul, operator.mul),),
       examples=(lambda: lambda x: x * 0.5, lambda: lambda x: x * x.sigmoid())))
add(Op("div", CONSTRUCT, P, functions=(operator.truediv, torch.div), methods=("div", "div_"), construct="product",
       inplace_variants=((operator.itruediv, operator.truediv),),
       examples=(lambda: lambda x: x / 3.0,)))
add(Op("neg", "scale", P, functions=(operator.neg, torch.neg), methods=("neg", "neg_"), params=lambda call: (-1.0,),
       examples=(lambda: operator.neg, lambda: torch.neg, lambda: lambda x: x.neg())))
