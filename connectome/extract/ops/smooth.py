"""Element-wise non-linear activations: the identity rule.

Each is ``f(x) = f(0) + x * r(x)`` with ``r = (f(x) - f(0)) / x`` held constant in the
backward pass; ``f(0)`` is a bias term (:mod:`connectome.extract.rules`, ``smooth``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.extract.ops._core import Call, Op, Receptive, Unsupported, add, smooth_params

P = Receptive.POINTWISE


def _smooth(name: str, modules: tuple[type, ...] = (), functions: tuple = (), methods: tuple[str, ...] = (),
            inplace_arg: int | None = None) -> Op:
    examples = (*modules, *[(lambda f: lambda: f)(f) for f in functions[:1]],
                *[(lambda m: lambda: lambda x: getattr(x, m)())(m) for m in methods[:1]])
    return add(Op(name, "smooth", P, modules=modules, functions=functions, methods=methods, params=smooth_params,
                  inplace_arg=inplace_arg, examples=examples))


def _pow_params(call: Call) -> tuple[float]:
    base, exponent = call.arg(0, "input"), call.arg(1, "exponent")
    if not call.is_data(base) or isinstance(exponent, (fx.Node, torch.Tensor)) or isinstance(exponent, bool) \
            or not isinstance(exponent, (int, float)):
        raise Unsupported("a power whose exponent is not a number (only x ** c with a constant c maps)")
    if exponent < 0:
        raise Unsupported(f"x ** {exponent} is infinite at 0; the identity rule needs a finite f(0)")
    return smooth_params(call)


_smooth("silu", (nn.SiLU,), (F.silu,), inplace_arg=1)
_smooth("gelu", (nn.GELU,), (F.gelu,))
_smooth("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid", "sigmoid_"))
_smooth("tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh", "tanh_"))
_smooth("hardswish", (nn.Hardswish,), (F.hardswish,), inplace_arg=1)
_smooth("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,), inplace_arg=1)
_smooth("elu", (nn.ELU,), (F.elu,), inplace_arg=2)
_smooth("celu", (nn.CELU,), (F.celu,), inplace_arg=2)
_smooth("selu", (nn.SELU,), (F.selu,), inplace_arg=1)
_smooth("softplus", (nn.Softplus,), (F.softplus,))
_smooth("mish", (nn.Mish,), (F.mish,), inplace_arg=1)
_smooth("logsigmoid", (nn.LogSigmoid,), (F.logsigmoid,))
_smooth("softsign", (nn.Softsign,), (F.softsign,))
_smooth("tanhshrink", (nn.Tanhshrink,), (F.tanhshrink,))
_smooth("erf", (), (torch.erf,), ("erf", "erf_"))
_smooth("softshrink", (nn.Softshrink,), (F.softshrink,))
add(Op("pow", "smooth", P, functions=(torch.pow, operator.pow), methods=("pow", "pow_"), params=_pow_params,
       examples=(lambda: lambda x: x ** 2, lambda: lambda x: x.pow(3), lambda: lambda x: torch.pow(x, 2.0))))
