"""Arithmetic: sums and products (residual adds, gates, constants: constructs of tracing) and
negation (a constant scale)."""

from __future__ import annotations

import operator

import torch

from connectome.extract.ops._core import CONSTRUCT, Op, Receptive, add

P = Receptive.POINTWISE

add(Op("add", CONSTRUCT, P, functions=(operator.add, torch.add), methods=("add", "add_"), construct="sum",
       inplace_variants=((operator.iadd, operator.add),)))
add(Op("sub", CONSTRUCT, P, functions=(operator.sub, torch.sub), methods=("sub", "sub_"), construct="sum",
       inplace_variants=((operator.isub, operator.sub),)))
add(Op("mul", CONSTRUCT, P, functions=(operator.mul, torch.mul), methods=("mul", "mul_"), construct="product",
       inplace_variants=((operator.imul, operator.mul),)))
add(Op("div", CONSTRUCT, P, functions=(operator.truediv, torch.div), methods=("div", "div_"), construct="product",
       inplace_variants=((operator.itruediv, operator.truediv),)))
add(Op("neg", "scale", P, functions=(operator.neg, torch.neg), methods=("neg", "neg_"), params=lambda call: (-1.0,)))
