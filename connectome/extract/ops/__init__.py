"""The op registry: one entry per op that keeps or moves units (see :mod:`._core`).

Tracing (:mod:`connectome.extract.trace`), receptive fields, the accumulator and the weight
graphs read only this registry. A new element-wise activation is one entry in its family module;
users register their own modules and autograd functions with :func:`register_op`.
"""

from __future__ import annotations

from connectome.extract.ops._core import (CONSTRUCT, LAYOUT, NONE, Call, Op, Receptive, Unsupported, entries,
                                          inplace_position, is_inplace_function, is_leaf_module, leaf_functions,
                                          op_for_function, op_for_method, op_for_module, op_for_node, out_of_place,
                                          register_op, unregister_op)
from connectome.extract.ops import arith, layout, norm, piecewise, pool, smooth  # noqa: F401  (they register)

__all__ = ["Op", "Call", "Receptive", "Unsupported", "NONE", "LAYOUT", "CONSTRUCT", "entries", "register_op",
           "unregister_op", "op_for_module", "op_for_function", "op_for_method", "op_for_node", "is_leaf_module",
           "inplace_position", "is_inplace_function", "out_of_place", "leaf_functions"]
