"""From a model to a graph of unit layers, with torch.fx.

Residual adds and concatenations are not modules, so a graph built from
``named_modules()`` would miss every skip connection; tracing with ``torch.fx`` sees them.
Each fx node that carries a tensor is assigned :class:`Units`: the unit layer its values
belong to, which dimensions of the tensor index the units, and which unit each index is.

- layer-defining ops start a new layer (their kinds are in :mod:`connectome.kinds`): the
  input, ``Conv2d`` / ``Linear`` modules and ``F.conv2d`` / ``F.linear`` calls (a Linear over
  the last dim of a channels-last tensor is a layer like a 1x1 conv), residual ``add``/``sub``
  of two data tensors, ``torch.cat`` along the units, a product of two data tensors that is
  neither a gate nor attention (a product layer), and attention across channels (XCA: a mix
  layer, the per-image pattern a dense map between units);
- per-unit ops keep the units of their input; each is a rule of :mod:`.rules` (BatchNorm
  folded, clamps, gates, smooth activations, normalisations, products and sums with
  parameters) or needs none (ReLU-likes, pooling, dropout, padding);
- layout ops (``permute``, ``transpose``, ``view``/``reshape``/``flatten``, ``chunk``,
  ``split``, channel indexing ``x[:, a:b]``, ``squeeze``, spatial means) move or select units:
  they are run once on a tensor of unit numbers, which tells where every unit went, so a
  channel shuffle or a channel split maps exactly, and a flatten keeps each channel's
  positions with its unit.

Subclasses that compute their padding from the input's shape at run time (timm's
``Conv2dSame``) cannot be traced by fx; fixed padding (``F.pad`` then ``F.conv2d``) can.

Anything else (a softmax over units outside attention) raises an :class:`~connectome.errors.ExtractionError` naming the op, its module and
the rule it would need.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.errors import ExtractionError
from connectome.extract import dense
from connectome.extract.attention import attend
from connectome.extract.fx_root import real_target
from connectome.extract.tracer import graph_for, trace_graph
from connectome.extract.unitgraph import LayerSpec, Operand, UnitGraph, Units
from connectome.extract import ops
from connectome.extract.rules import DATA_MASK, RULES, ChainOp
from connectome.kinds import Kind

__all__ = ["UnitGraph", "LayerSpec", "Operand", "ChainOp", "Units", "trace_units", "run_nodes"]

# dense layers are strategies of connectome.extract.dense; the op registry, connectome.extract.ops, holds every other op


# ----------------------------------------------------------------------------- tracing
def _module_path(node: fx.Node, target: Any = None) -> str:
    """The caller's module path of a ``call_module`` node (or of ``target``), whatever alias fx traced it under."""
    gm = node.graph.owning_module
    t = str(node.target if target is None else target)
    return real_target(gm, t) if gm is not None else t


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {_module_path(node)!r}"
    s = _scope(node)
    return f"fx node {node.name!r}" + (f" in module {s!r}" if s else "")


def run_nodes(
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    override: Callable[[fx.Node, list[Any], dict[str, Any]], Any] | None = None,
    keep: set[str] | None = None,
    on_value: Callable[[fx.Node, Any], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Run the traced graph node by node.

    ``override(node, args, kwargs)`` may return a value to use instead of running the node
    (``NotImplemented`` to run it). ``on_value(node, value)`` may replace a node's value.
    Values of nodes in ``keep`` are returned; others are freed once their last user ran.
    A failure names the module where it happened.
    """
    gm = graph_for(gm, inputs[0]) if inputs else gm  # the same nodes, traced for this input shape
    env: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    modules = dict(gm.named_modules())
    last_use: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        for a in node.all_input_nodes:
            last_use[a.name] = node
    it = iter(inputs)
    out = None
    for node in gm.graph.nodes:
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        try:
            value = NotImplemented
            if override is not None and node.op in ("call_module", "call_function", "call_method"):
                value = override(node, args, kwargs)
            if value is NotImplemented:
                if node.op == "placeholder":
                    try:
                        value = next(it)
                    except StopIteration:
                        value = node.args[0] if node.args else None
                elif node.op == "get_attr":
                    value = gm
                    for part in str(node.target).split("."):
                        value = getattr(value, part)
                elif node.op == "call_module":
                    value = modules[node.target](*args, **kwargs)
                elif node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "output":
                    out = args[0]
                    break
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise ExtractionError(
                f"the model failed at {_where(node)} on inputs of shape {shapes}: {msg}. "
                "Check input_shape (channels, height, width) against what the model expects"
            ) from None
        if on_value is not None:
            value = on_value(node, value)
        env[node.name] = value
        if keep is not None and node.name in keep:
            kept[node.name] = value
        for a in node.all_input_nodes:
            if last_use.get(a.name) is node and (keep is None or a.name not in keep):
                env.pop(a.name, None)
    return out, kept


def _record(gm: fx.GraphModule, example: torch.Tensor) -> tuple[dict[str, tuple[int, ...]], dict[str, Any],
                                                               dict[str, torch.Tensor], set[str], list[str]]:
    """Run once: tensor shapes, plain values (sizes), constant tensors, which nodes carry data,
    and where the data is cast to a floating type of less precision than the input's."""
    shapes: dict[str, tuple[int, ...]] = {}
    values: dict[str, Any] = {}
    consts: dict[str, torch.Tensor] = {}
    data: set[str] = set()  # tensors computed from the input (sizes read off it are plain values)
    fine: set[str] = set()  # data of the input's precision
    eps = torch.finfo(example.dtype).eps if example.dtype.is_floating_point else None
    casts: list[str] = []

    def record(node: fx.Node, value: Any) -> Any:
        from_data = node.op == "placeholder" or any(a.name in data for a in node.all_input_nodes)
        if from_data and (isinstance(value, torch.Tensor) or _holds_tensor(value)):
            data.add(node.name)
        if isinstance(value, torch.Tensor):
            shapes[node.name] = tuple(value.shape)
            if node.name not in data:
                consts[node.name] = value.detach()
            elif eps is not None and value.dtype.is_floating_point:
                if torch.finfo(value.dtype).eps <= eps:
                    fine.add(node.name)
                elif any(a.name in fine for a in node.all_input_nodes):
                    casts.append(node.name)
        elif not _holds_tensor(value):
            values[node.name] = value
        return value

    with torch.inference_mode():
        run_nodes(gm, (example,), on_value=record)
    return shapes, values, consts, data, casts


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_holds_tensor(x) for x in v)
    return False


# ----------------------------------------------------------------------------- classification
def _shadow(node: fx.Node, op: str, target: Any) -> Any:
    """``node`` seen as another op (``x.add(y)`` as ``x + y``), without touching the graph:
    a real fx.Node would register itself among its inputs' users."""
    from types import SimpleNamespace

    return SimpleNamespace(name=node.name, op=op, target=target, args=node.args, kwargs=node.kwargs,
                           all_input_nodes=node.all_input_nodes, graph=node.graph, meta=node.meta)


def _const(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


@dataclass
class _Ctx:
    modules: dict[str, nn.Module]
    shapes: dict[str, tuple[int, ...]]
    values: dict[str, Any]
    consts: dict[str, torch.Tensor]
    data: set[str]

    def is_data(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a.name in self.data and a.name in self.shapes

    def const(self, a: Any) -> torch.Tensor | None:
        if isinstance(a, fx.Node) and a.name in self.consts:
            return self.consts[a.name].detach().clone()
        return None

    def data_args(self, node: Any) -> list[fx.Node]:
        """Data tensor operands in argument order (``input`` before ``other``), repeats kept."""
        args = list(node.args) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
        return [a for a in args if self.is_data(a)]


class _Unmapped(ExtractionError):
    """A node reads a tensor that has no units (it failed to map, or comes from no mapped op)."""


def _op_of(node: Any, c: _Ctx) -> ops.Op | None:
    return ops.op_for_node(node, c.modules) if node.op in ("call_module", "call_function", "call_method") else None


def _call(node: Any, c: _Ctx, module: nn.Module | None = None) -> ops.Call:
    """``node`` as the registry's params and geometry functions read it."""
    return ops.Call(node, module, const_of=c.const, value_of=lambda a: c.values.get(a.name, a), is_data=c.is_data,
                    shape_of=lambda a: c.shapes.get(a.name) if isinstance(a, fx.Node) else None)


def _classify(node: Any, c: _Ctx) -> tuple[str, Any]:
    """What an fx node does to units: ('layer', kind) | ('residual', signs) | ('concat', dim)
    | ('chain', ChainOp or None) | ('layout', None) | ('skip', None) | ('unsupported', why)."""
    t = node.target
    if node.name in c.values:
        return ("skip", None)  # a plain value (a size, a tuple of sizes)
    if node.op in ("call_function", "call_method"):
        op = _op_of(node, c)
        if op is not None and op.multi_output and node.name in c.data:
            return ("layout", None)  # may give a tuple of tensors: not in shapes
    if node.op == "call_module" and isinstance(c.modules.get(t), nn.RNNBase) and node.name in c.data:
        return ("unsupported", f"recurrent layers ({type(c.modules[t]).__name__}) are not supported: their gates "
                               "multiply data by data over the steps of a sequence")
    if node.name not in c.shapes or node.name not in c.data:
        return ("skip", None)  # not a tensor (sizes, tuples of sizes ...), or a constant
    if node.op == "call_module":
        return _classify_module(node, c.modules[t], c)
    if node.op == "call_function":
        return _classify_function(node, c)
    if node.op == "call_method":
        op = ops.op_for_method(t)
        if op is not None:
            return _registered(op, node, c)
        if t in ("softmax", "log_softmax", "matmul", "bmm"):
            return _classify_function(_shadow(node, "call_function", getattr(torch, t)), c)
        return ("unsupported", f"method .{t}() is not a per-unit op we can map (no entry in connectome.extract.ops; "
                               "register a module that calls it with connectome.extract.register_op)")
    return ("skip", None)


def _registered(op: ops.Op, node: Any, c: _Ctx, module: nn.Module | None = None) -> tuple[str, Any]:
    """What a registered op does to units: its rule's :class:`ChainOp` from its params."""
    if op.rule == ops.LAYOUT:
        return ("layout", None)
    if op.rule == ops.CONSTRUCT:
        if node.op == "call_method":  # x.add(y) as x + y
            node = _shadow(node, "call_function", op.functions[0])
        return _CONSTRUCTS[op.construct](node, c)
    try:
        params = op.params(_call(node, c, module)) if op.params is not None else None
    except ops.Unsupported as exc:
        return ("unsupported", str(exc))
    if op.rule == ops.NONE or params is None:
        return ("chain", None)
    if RULES[op.rule].named_input:  # the params name the data input
        x, params = params
        return ("chain", ChainOp(node.name, op.rule, x, params))
    return ("chain", ChainOp(node.name, op.rule, "", params))


def _classify_module(node: Any, m: nn.Module, c: _Ctx) -> tuple[str, Any]:
    d = dense.of_module(m)
    if d is not None:
        return ("layer", d)
    op = ops.op_for_module(m)
    if op is not None:
        return _registered(op, node, c, m)
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d)):
        return ("unsupported", f"{type(m).__name__} layers are not supported yet (Conv1d, Conv2d, ConvTranspose2d "
                               "and Linear are)")
    if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return ("unsupported", f"{type(m).__name__} mixes units (it normalises across them); no rule fits it "
                               "outside attention (softmax(...) @ v), where the attention rule holds the pattern constant")
    return ("unsupported", f"module type {type(m).__name__} is not a per-unit op we can map (no entry in "
                           "connectome.extract.ops; register it with connectome.extract.register_op)")


def _classify_function(node: Any, c: _Ctx) -> tuple[str, Any]:
    t = node.target
    d = dense.of_function(t)
    if d is not None:
        return ("layer", d)
    op = ops.op_for_function(t)
    if op is not None:
        return _registered(op, node, c)
    from connectome.extract import windows

    if t is torch.addcmul:
        return _classify_addcmul(node, c)
    if t is windows.window_pad:
        return ("chain", None)  # zero padding of positions
    if t is windows.window_crop:
        return ("layout", None)
    if t is windows.window_attend:
        return ("window", None)
    if t is attend:
        q, k, v = (node.args + (None, None, None))[:3]
        if not c.is_data(v) or not all(isinstance(a, fx.Node) for a in (q, k)):
            return ("unsupported", "attention on constant values")
        # constant queries (an attention-pooling probe) or keys: the pattern is held constant anyway
        return ("chain", ChainOp(node.name, "attention", v.name, (q.name, k.name, int(node.kwargs["heads"]))))
    if t is F.scaled_dot_product_attention:
        q = _const(node, 0, "query", None)
        k = _const(node, 1, "key", None)
        v = _const(node, 2, "value", None)
        if not c.is_data(v) or not all(isinstance(a, fx.Node) for a in (q, k)):
            return ("unsupported", "attention on constant values")
        mask = _const(node, 3, "attn_mask", None)
        if isinstance(mask, fx.Node):
            if mask.name in c.values:
                mask = c.values[mask.name]  # an optional argument left at None
            elif c.const(mask) is not None:
                mask = c.const(mask)
            else:
                # computed from the data (SAM's relative positions from q): added to the scores
                # before the softmax, it is part of the pattern, held constant with it; the rule
                # reads its value at each step
                mask = DATA_MASK(mask.name)
        dropout = _const(node, 4, "dropout_p", 0.0)
        dropout = c.values.get(dropout.name, 1.0) if isinstance(dropout, fx.Node) else dropout
        if dropout:
            return ("unsupported", "attention dropout is on (the model must run in eval mode)")
        plain = lambda a: c.values.get(a.name) if isinstance(a, fx.Node) else a  # noqa: E731  arguments left at defaults
        kw = {"attn_mask": mask, "is_causal": bool(plain(_const(node, 5, "is_causal", False))),
              "scale": plain(_const(node, 6, "scale", None))}
        return ("chain", ChainOp(node.name, "attention", v.name, (q.name, k.name, kw)))
    if t in (torch.matmul, torch.bmm, operator.matmul) and len(c.data_args(node)) == 2:
        return ("unsupported", "a matrix product of two data tensors that sums over the units of both (a Gram "
                               "matrix): neither can be held constant as a pattern while the units of the other "
                               "pass through, as in attention, linear or state-space attention")
    if t in (torch.softmax, F.softmax, torch.matmul, torch.bmm, operator.matmul):
        return ("unsupported", f"{getattr(t, '__name__', t)} mixes units outside an attention form (the attention "
                               "rule maps softmax(...) @ v, F.scaled_dot_product_attention and nn.MultiheadAttention)")
    return ("unsupported", f"function {getattr(t, '__name__', t)!s} is not a per-unit op we can map (no entry in "
                           "connectome.extract.ops; register a module that calls it with "
                           "connectome.extract.register_op)")


def _classify_addcmul(node: Any, c: _Ctx) -> tuple[str, Any]:
    """``torch.addcmul(a, b, x, value=v)`` = ``a + v * b * x`` with data ``x`` and constants ``a``,
    ``b`` (timm's GlobalResponseNorm: bias + weight * (x * Nx)): an affine op."""
    a, b, x = (_const(node, i, k, None) for i, k in enumerate(("input", "tensor1", "tensor2")))
    v = _const(node, 3, "value", 1)
    if c.is_data(a) or not c.is_data(x) and not c.is_data(b):
        return ("unsupported", "addcmul with data in its first operand (a + b * x is mapped for constant a)")
    if c.is_data(b):
        b, x = x, b
    if c.is_data(b) or not isinstance(v, (int, float)):
        return ("unsupported", "addcmul of two data tensors (write the product, a * b, and the sum apart)")
    shape = c.shapes[node.name]
    if c.shapes[x.name] != shape:
        return ("unsupported", "an addcmul that broadcasts the data to a larger shape mixes units")
    scale = _batchless(c.const(b), shape) if isinstance(b, fx.Node) else b
    shift = _batchless(c.const(a), shape) if isinstance(a, fx.Node) else a
    if scale is None or shift is None:
        return ("unsupported", "an addcmul with an operand that is neither data nor a constant")
    scale = scale * v if v != 1 else scale
    shift = torch.as_tensor(shift) if not isinstance(shift, torch.Tensor) else shift
    return ("chain", ChainOp(node.name, "affine", x.name, (torch.as_tensor(scale), shift)))


def _classify_cat(node: Any, c: _Ctx) -> tuple[str, Any]:
    dim = _const(node, 1, "dim", 0)
    t = node.target
    if not isinstance(dim, int) or not isinstance(node.args[0], (list, tuple)):
        return ("unsupported", f"{getattr(t, '__name__', t)} with a computed dim")
    return ("stack" if t is torch.stack else "concat", dim % len(c.shapes[node.name]))


def _batchless(v: Any, data_shape: tuple[int, ...]) -> Any:
    """A constant expanded over the traced batch (``pos.expand(x.shape[0], -1, -1)``) as one
    row that broadcasts over any batch; None when its rows differ (it depends on the image)."""
    if isinstance(v, torch.Tensor) and v.dim() == len(data_shape) and v.shape[0] == data_shape[0] and v.shape[0] > 1:
        if not torch.equal(v, v[:1].expand_as(v)):
            return None
        return v[:1].clone()
    return v


def _classify_sum(node: Any, c: _Ctx) -> tuple[str, Any]:
    t = node.target
    neg = t in (operator.sub, operator.isub, torch.sub)
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if not isinstance(alpha, (int, float)):
        return ("unsupported", "an add/sub whose alpha is a tensor")
    targs = c.data_args(node)
    first = node.args[0] if node.args else node.kwargs.get("input")
    out_shape = c.shapes[node.name]
    if len(targs) == 2:
        if c.shapes[targs[0].name] == c.shapes[targs[1].name] == out_shape:
            return ("residual", (1.0, -float(alpha) if neg else float(alpha)))
        return ("unsupported", "an add/sub of data tensors whose shapes differ (broadcasting) mixes units")
    if len(targs) != 1 or c.shapes[targs[0].name] != out_shape:
        return ("unsupported", "an add/sub that broadcasts the data to a larger shape mixes units")
    x_first = first is targs[0]
    other = [a for a in [*node.args[:2], node.kwargs.get("other")] if a is not None and a is not targs[0]]
    if not other:
        return ("unsupported", "an add/sub without a second operand")
    o = other[0]
    k = float(alpha)
    cval = c.const(o) if isinstance(o, fx.Node) else (float(o) if isinstance(o, (int, float)) and not isinstance(o, bool) else None)
    cval = _batchless(cval, out_shape)
    if cval is None:
        return ("unsupported", "an add/sub with an operand that is neither data nor a constant")
    # y = a * x + b with constants a, b
    if x_first:
        a, b = (1.0, -k * cval) if neg else (1.0, k * cval)
    else:
        a, b = (-k, cval) if neg else (k, cval)
    if isinstance(b, float) and a == 1.0:
        return ("chain", ChainOp(node.name, "shift", "", (b,)))
    return ("chain", ChainOp(node.name, "affine", "", (a, b)))


def _derives_from(a: fx.Node, b: fx.Node, c: _Ctx, elementwise: bool, limit: int = 400) -> bool:
    """Whether ``a`` is computed from ``b``: through element-wise single-input ops only
    (``sigmoid(b)``), or through any data ops (a squeeze-and-excitation branch of ``b``)."""
    if elementwise:
        cur = a
        for _ in range(8):
            ins = [n for n in cur.all_input_nodes if c.is_data(n)]
            if len(ins) != 1 or c.shapes.get(cur.name) != c.shapes.get(b.name):
                return False
            cur = ins[0]
            if cur is b:
                return True
        return False
    seen, todo = set(), [a]
    while todo and len(seen) < limit:
        cur = todo.pop()
        for n in cur.all_input_nodes:
            if n is b:
                return True
            if n.name in c.data and n.name not in seen:
                seen.add(n.name)
                todo.append(n)
    return False


def _classify_product(node: Any, c: _Ctx) -> tuple[str, Any]:
    t = node.target
    is_div = t in (operator.truediv, operator.itruediv, torch.div) or (node.op == "call_method" and t in ("div", "divide"))
    targs = c.data_args(node)
    if is_div and (node.kwargs.get("rounding_mode") is not None or (t is torch.div and len(node.args) > 2)):
        return ("unsupported", "a division with rounding (rounding_mode='floor' or 'trunc') is not linear in "
                               "the data; divide without rounding")
    out_shape = c.shapes[node.name]
    first = node.args[0] if node.args else node.kwargs.get("input")
    if len(targs) == 1:
        x = targs[0]
        if c.shapes[x.name] != out_shape:
            return ("unsupported", "a product that broadcasts the data to a larger shape mixes units")
        if is_div and first is not x:
            return ("unsupported", "a constant divided by data is not linear in the data (no rule for 1/x)")
        other = [a for a in [*node.args[:2], node.kwargs.get("other")] if a is not None and a is not x]
        o = other[0] if other else None
        if isinstance(o, (int, float)) and not isinstance(o, bool):
            return ("chain", ChainOp(node.name, "scale", "", (1.0 / float(o) if is_div else float(o),)))
        cval = _batchless(c.const(o), out_shape)
        if cval is None:
            return ("unsupported", "a product with an operand that is neither data nor a constant")
        return ("chain", ChainOp(node.name, "affine", "", (1.0 / cval if is_div else cval, None)))
    if len(targs) == 2 and not is_div:
        a, b = targs
        sa, sb = c.shapes[a.name], c.shapes[b.name]
        na, nb = _unexpanded_numel(a, c), _unexpanded_numel(b, c)
        gate = None
        if sa == out_shape and nb < na:
            gate = 1
        elif sb == out_shape and na < nb:
            gate = 0
        elif sa == sb == out_shape and a is not b:
            # A self-gate such as x * sigmoid(x) (hand-written SiLU), or a squeeze-and-excitation
            # gate on a 1x1 map (same shape as the signal, computed from it): the factor that is
            # computed from the other operand is the gate.
            # (a 1x1 map, channels first or last: one dim beside the batch larger than 1)
            pooled = len(out_shape) > 2 and sum(v != 1 for v in out_shape[1:]) <= 1
            if _derives_from(b, a, c, elementwise=True) or (pooled and _derives_from(b, a, c, elementwise=False)):
                gate = 1
            elif _derives_from(a, b, c, elementwise=True) or (pooled and _derives_from(a, b, c, elementwise=False)):
                gate = 0
        if gate is not None:
            data = targs[1 - gate]
            return ("chain", ChainOp(node.name, "gate", data.name, (targs[gate].name,)))
        if len(sa) == len(sb) == len(out_shape) and tuple(torch.broadcast_shapes(sa, sb)) == out_shape:
            # two factors, neither computed from the other nor a gate of the other (starnet's
            # act(x1) * x2, a gated MLP, focalnet's global context times a per-position gate):
            # a layer of its own, each operand linearised with the other held constant
            return ("product", None)
    if is_div and len(targs) == 2:
        a, b = targs
        if first is a and c.shapes[a.name] == out_shape and _unexpanded_numel(b, c) < _unexpanded_numel(a, c):
            # data over a smaller data tensor (a normaliser: linear attention's q k^T 1, a hand-written
            # x / |x|): a gate whose signal, the divisor, is held constant
            return ("chain", ChainOp(node.name, "gate", a.name, (b.name,)))
        return ("unsupported", "a division of two data tensors fits no rule (1/x is not linear in the data; "
                               "the product rule maps a * b, and a divisor smaller than the data is held constant)")
    return ("unsupported", "a product of data tensors that neither broadcast to its output nor gate one "
                           "another fits no rule (the product rule needs two factors of the output's rank)")


#: The registry's constructs (``Op.construct``): mapped by code of their own.
_CONSTRUCTS: dict[str, Callable[[Any, _Ctx], tuple[str, Any]]] = {
    "sum": _classify_sum, "product": _classify_product, "concat": _classify_cat,
}


def _unexpanded_numel(n: fx.Node, c: _Ctx) -> int:
    """Elements of ``n``'s value before an ``expand``/``expand_as`` (a gate written broadcast out:
    ECA's ``x * y.expand_as(x)``)."""
    if n.op == "call_method" and n.target in ("expand", "expand_as") and isinstance(n.args[0], fx.Node) \
            and n.args[0].name in c.shapes:
        return math.prod(c.shapes[n.args[0].name])
    return math.prod(c.shapes[n.name])


def _distinct_rows(node: fx.Node, cols: Any, what: str) -> None:
    """Refuse a layer over heads folded into the batch whose rows repeat units (windows of
    positions folded in as well): its units would be the windows."""
    cols = np.asarray(cols).reshape(-1)
    if np.unique(cols).size != cols.size:
        raise ExtractionError(f"{_where(node)} {what} heads folded into the batch with windows of positions (the rows "
                              "of an image repeat its units); units cannot be followed - fold the windows back first")


def _same_units(a: Units, b: Units) -> bool:
    return (a.layer, a.dims, a.batch, a.windows) == (b.layer, b.dims, b.batch, b.windows) and (
        a.index is b.index or (a.index is not None and b.index is not None and np.array_equal(a.index, b.index)))


def _const_cat(node: fx.Node, dim: int, c: _Ctx, units: dict[str, Units], layers: list[LayerSpec]) -> bool:
    """``torch.cat`` of data with constants along a dim that does not hold the units (a ViT's
    class token joined to the patch tokens; register tokens put between the class token and
    the patches): the data keeps its units and the constant positions are a constant part of
    them (a bias term). All data parts must lay out the same units (slices of one tensor).
    Returns whether it was that case."""
    parts = list(node.args[0])
    data = [a for a in parts if c.is_data(a)]
    if not data or any(a.name not in units for a in data) or dim in units[data[0].name].dims:
        return False
    x = data[0]
    if len(data) == len(parts) or not all(_same_units(units[a.name], units[x.name]) for a in data[1:]):
        return False  # data parts of several layouts (several layers): a concat layer's business
    batch = c.shapes[x.name][0]
    pieces, offset = [], 0
    for a in parts:
        width = c.shapes[a.name][dim] if isinstance(a, fx.Node) and a.name in c.shapes else None
        if width is None:
            return False
        if a not in data:
            v = c.const(a)
            if v is None:
                return False
            if v.dim() == len(c.shapes[x.name]) and v.shape[0] == batch:
                v = v[:1]  # expanded over the batch when traced
            pieces.append((offset, width, v))
        offset += width
    units[node.name] = units[x.name]
    op = ChainOp(node.name, "const_cat", x.name, (dim, pieces))
    layers[units[x.name].layer].bias_ops.append(op)
    return True


_SOFTMAX = {F.softmax, torch.softmax}
_MATMUL = {torch.matmul, torch.bmm, operator.matmul, torch.einsum}


def _is_softmax(n: fx.Node, c: "_Ctx") -> bool:
    return (n.op == "call_function" and n.target in _SOFTMAX) or (n.op == "call_method" and n.target == "softmax") \
        or (n.op == "call_module" and isinstance(c.modules.get(n.target), nn.Softmax))


def _patches(node: fx.Node, c: "_Ctx") -> tuple[str, int] | None:
    """("unfold" | "fold", kernel offsets per channel) for an im2col op or its inverse, else None."""
    m = c.modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, (nn.Unfold, nn.Fold)):
        return type(m).__name__.lower(), math.prod(_pair(m.kernel_size))
    if node.op == "call_function" and node.target is F.unfold:
        return "unfold", math.prod(_pair(_const(node, 1, "kernel_size", 1)))
    if node.op == "call_function" and node.target is F.fold:
        return "fold", math.prod(_pair(_const(node, 2, "kernel_size", 1)))
    return None


def _pair(v: Any) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _patch_units(node: fx.Node, patches: tuple[str, int], u: Units | None, shape: tuple[int, ...],
                 size_of: Callable[[Units], int]) -> Units:
    """Units after ``unfold`` (im2col) or ``fold`` (col2im).

    ``unfold`` copies each channel's values at the ``K`` kernel offsets of every patch into
    ``K`` consecutive slots of dim 1 (``C * K`` of them, channel-major): the units stay the
    channels, each now over ``K`` slots and the patches; a Linear that reads those ``C * K``
    features reads each unit through ``K`` columns (``group = K``) and is a convolution.
    ``fold`` adds the ``K`` slots of each channel back into its positions: a sum over positions
    of one unit. Neither holds anything constant (zero padding adds no flow).
    """
    kind, k = patches
    if u is None or len(u.dims) != 1 or u.dims[0] != 1 or u.batch != 0:
        raise ExtractionError(f"cannot map {_where(node)}: {kind} of a tensor whose units are not along dim 1")
    idx = u.along(1, shape[1], size_of(u))
    if kind == "unfold":
        return Units(u.layer, (1,), np.repeat(idx, k), 0, u.windows)
    per = idx.reshape(-1, k) if idx.size % k == 0 else None
    if per is None or not np.all(per == per[:, :1]):
        raise ExtractionError(f"cannot map {_where(node)}: fold adds slots of different units (each channel's "
                              f"{k} kernel offsets must be consecutive, as unfold leaves them)")
    chans = per[:, 0]
    natural = chans.size == size_of(u) and np.array_equal(chans, np.arange(chans.size))
    return Units(u.layer, (1,), None if natural else chans, 0, u.windows)


def _is_resize(node: fx.Node, c: "_Ctx") -> bool:
    op = _op_of(node, c)
    return op is not None and op.resizes


def _pooled_dims(node: fx.Node, c: "_Ctx", nd: int) -> set[int]:
    """The dims a pooling, padding or resizing op works over: the last one or two (a resize: all after the channels)."""
    op = _op_of(node, c) if node.op != "call_method" else None
    k = op.pooled if op is not None else 0
    if op is not None and op.resizes:
        k = nd - 2  # every dim after (batch, channels)
    return set(range(nd - k, nd)) if k else set()


def _mixed_dims(node: fx.Node, v: fx.Node, nd: int) -> set[int]:
    """The dims of the value ``v`` that an attention product sums over (its tokens)."""
    if node.op == "call_function" and node.target is torch.einsum and isinstance(node.args[0], str):
        eq = node.args[0].replace(" ", "")
        ins, out = eq.split("->") if "->" in eq else (eq, "")
        subs = ins.split(",")
        pos = [i for i, a in enumerate(node.args[1:]) if a is v]
        if not pos or "." in eq or pos[0] >= len(subs):
            return set(range(nd))  # not parsed: refuse rather than guess
        sv = subs[pos[0]]
        return {d for d, ch in enumerate(sv) if ch not in out}
    if _is_matmul(node) and node.args and node.args[0] is v and v is not node.args[1]:
        return {nd - 1}  # matmul(v, pattern^T): v's tokens are its last dim
    return {nd - 2}  # matmul(pattern, v), attention functions: the token dim of v


def _mix_layer(node: fx.Node, v: fx.Node, u: Units, pattern: str, shapes: dict[str, tuple[int, ...]], index: int,
               v_size: int) -> tuple[LayerSpec, Units]:
    """The layer of ``pattern @ v`` (or ``v @ pattern``) when the pattern mixes v's units (XCA).

    v holds the batch, its units on every other dim but one (heads and the channels the
    pattern mixes), and the tokens; each head is a group, as in a grouped convolution, and the
    per-image pattern is the weight of the group (:data:`connectome.kinds.Kind.MIX`).
    """
    nd = len(shapes[v.name])
    mixed = _mixed_dims(node, v, nd)
    right = node.args[0] is v  # v @ pattern: v's units on its last dim
    if not _is_matmul(node) or node.target is torch.einsum or len(mixed) != 1 or u.batch != 0 or len(u.dims) != nd - 2:
        raise ExtractionError(
            f"cannot map {_where(node)}: its pattern mixes the units of v in a form we cannot follow (attention "
            "across channels is mapped for pattern @ v with v shaped (batch, heads..., channels, tokens))")
    k = next(iter(mixed))
    out_shape = shapes[node.name]
    p_shape = shapes[pattern]
    if len(out_shape) != nd or out_shape[:k] != shapes[v.name][:k] or p_shape[:-2] != out_shape[:-2]:
        raise ExtractionError(f"cannot map {_where(node)}: its per-image pattern broadcasts over heads or images")
    sizes = [shapes[v.name][d] for d in u.dims]
    idx = np.arange(v_size, dtype=np.int64) if u.index is None else np.asarray(u.index, np.int64)
    idx = np.moveaxis(idx.reshape(sizes), u.dims.index(k), -1)  # (heads..., channels mixed)
    groups, width = int(np.prod(idx.shape[:-1], dtype=np.int64)), int(idx.size)
    rows = out_shape[k]
    out_index = np.moveaxis(np.arange(groups * rows, dtype=np.int64).reshape(*idx.shape[:-1], rows), -1,
                            u.dims.index(k))
    cols = idx.reshape(-1)
    if np.array_equal(cols, np.arange(v_size)):
        cols = None
    scope = _scope(node)
    spec = LayerSpec(name=f"{scope}.mix" if scope else "mix", kind=Kind.MIX, size=groups * rows, node=node.name,
                     module=scope or None, groups=groups, dim=k,
                     operands=[Operand(layer=u.layer, node=v.name, cols=cols, width=width)],
                     call={"pattern": pattern, "right": right})
    return spec, Units(index, u.dims, out_index)


def _is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MATMUL) or (n.op == "call_method" and n.target in ("matmul", "bmm"))


# Ops a pattern may pass through between its softmax and the product with v: dropout, layout
# (transposes, head reshapes), and mixes over heads (talking heads: a Linear or a 1x1 conv).
_PATTERN_STEP_METHODS = {"transpose", "permute", "reshape", "view", "contiguous", "flatten", "unflatten",
                         "swapaxes", "movedim", "masked_fill", "float", "double", "to", "type_as"}
_PATTERN_STEP_FUNCS = {F.dropout, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.swapaxes,
                       torch.movedim, torch.masked_fill, F.linear, F.conv2d, torch.conv2d}
_PATTERN_STEP_MODULES = (nn.Dropout, nn.Identity, nn.Linear, nn.Conv2d)


def _pattern_step(n: fx.Node, c: "_Ctx") -> fx.Node | None:
    """The one data input of ``n`` when ``n`` is an op a pattern may pass through, else None."""
    ins = [a for a in n.all_input_nodes if c.is_data(a)]
    if len(ins) != 1:
        return None
    if n.op == "call_module" and isinstance(c.modules[n.target], _PATTERN_STEP_MODULES) or \
            n.op == "call_function" and n.target in _PATTERN_STEP_FUNCS or \
            n.op == "call_method" and n.target in _PATTERN_STEP_METHODS:
        return ins[0]
    return None


def _of_softmaxes(n: fx.Node, c: "_Ctx", memo: dict[str, bool], depth: int = 24) -> bool:
    """Whether ``n`` is computed from softmaxes and constants only, by ops that are not layers
    (ConViT's gated sum of a content and a position softmax, renormalised)."""
    if n.name in memo:
        return memo[n.name]
    if _is_softmax(n, c):
        out = True
    elif depth == 0 or _is_layer(n, c) or n.op not in ("call_function", "call_method", "call_module"):
        out = False
    else:
        ins = [a for a in n.all_input_nodes if c.is_data(a)]
        out = bool(ins) and all(_of_softmaxes(a, c, memo, depth - 1) for a in ins)
    memo[n.name] = out
    return out


def _attention_products(nodes: list[fx.Node], c: "_Ctx") -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Products ``softmax(...) @ v`` (matmul, bmm, einsum, either side) of a hand-written
    attention, and the nodes that only compute their patterns.

    Between its softmax and the product a pattern may pass through dropout, layout ops and a
    mix over heads (talking heads); before the softmax anything (scale, biases, masks).
    Returns ``{product: (pattern node, value node)}`` and the set of pattern-only nodes: the
    attention rule holds the pattern constant, so those nodes need no units.
    """
    products: dict[str, tuple[str, str]] = {}
    made: dict[str, bool] = {}  # _of_softmaxes, per node
    for n in nodes:
        if not _is_matmul(n) or n.name not in c.data:
            continue
        ops = [a for a in n.args if c.is_data(a)]
        if len(ops) != 2:
            continue
        for s_, v_ in ((ops[0], ops[1]), (ops[1], ops[0])):
            cur: fx.Node | None = s_
            for _ in range(12):
                if cur is None or _is_softmax(cur, c):
                    break
                cur = _pattern_step(cur, c)
            stepped = cur is not None and _is_softmax(cur, c)
            if stepped or (_of_softmaxes(s_, c, made) and not _of_softmaxes(v_, c, made)):
                products[n.name] = (s_.name, v_.name)
                break
    pattern: set[str] = {p for p, _ in products.values()}
    # Nodes computed from a product of two data tensors that is not an attention product (the
    # scores q k^T): layers among them (talking heads) belong to the pattern, while q's and k's
    # own projections stay layers (dead ends that carry no flow).
    scores: set[str] = set()
    for n in nodes:
        if n.name in products or n.name not in c.data:
            continue
        if _is_matmul(n) and len([a for a in n.args if c.is_data(a)]) == 2 or \
                any(a.name in scores for a in n.all_input_nodes):
            scores.add(n.name)

    for n in reversed(nodes):
        if n.name in pattern or n.name not in c.data or not n.users or (n.name not in scores and _is_layer(n, c)):
            continue
        if all(u.name in pattern or (u.name in products and products[u.name][0] == n.name) for u in n.users):
            pattern.add(n.name)
    return products, pattern


def _data_products(nodes: list[fx.Node], c: "_Ctx", products: dict[str, tuple[str, str]],
                   pattern: set[str]) -> tuple[set[str], set[str]]:
    """Matrix products of two data tensors that no softmax makes an attention (linear, factorised
    and state-space attention: ``q @ (k^T @ v)``, ``x @ (a * b)^T``), and the nodes that only
    compute their operands. Which operand is the pattern (held constant) is decided when the
    product is mapped, by where the units of each are (:func:`_pattern_operand`); until then the
    nodes that only feed such operands may fail to map (a softmax over positions of the state's
    channels) and be left without units, as the signal of a gate is."""
    candidates = {n.name for n in nodes if _is_matmul(n) and n.name in c.data and n.name not in products
                  and len(c.data_args(n)) == 2}
    feeds: set[str] = set()
    for n in reversed(nodes):
        if n.name in pattern or n.name not in c.data or not n.users or _is_layer(n, c):
            continue
        if all(u.name in feeds or u.name in pattern or u.name in candidates for u in n.users):
            feeds.add(n.name)
    return candidates, feeds


def _contracted(node: fx.Node, a: fx.Node, nd: int) -> int:
    """The dim of operand ``a`` that the matrix product ``node`` sums over."""
    return nd - 1 if node.args[0] is a else nd - 2


def _pattern_operand(node: fx.Node, units: dict[str, Units], shapes: dict[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """``(pattern, value)`` for a matrix product of two data tensors: the value is an operand
    whose units lie off the dim summed over (its positions are mixed, as v's by an attention
    pattern); the other is held constant. When both could be the value, the right operand is
    (``pattern @ value``, as attention is written); an operand without units (it failed to map)
    can only be the pattern. None when neither can be the value; an ExtractionError when the
    product sums over the batch dim."""
    a, b = node.args[0], node.args[1]
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or a is b:
        return None
    if any(_contracted(node, n, len(shapes[n.name])) == 0 for n in (a, b)):
        raise ExtractionError(f"cannot map {_where(node)}: a matrix product that sums over the batch dim "
                              "mixes the images of a batch")
    out = shapes[node.name]
    for n in (a, b):  # both hold the images along dim 0
        s = shapes[n.name]
        u = units.get(n.name)
        if len(s) < 3 or s[0] != out[0] or (u is not None and (u.batch != 0 or u.windows != 1)):
            return None
    for v, p in ((b, a), (a, b)):
        u = units.get(v.name)
        if u is not None and _contracted(node, v, len(shapes[v.name])) not in u.dims:
            return p.name, v.name
    return None


def _is_layer(n: fx.Node, c: "_Ctx") -> bool:
    if n.op == "call_module":
        return isinstance(c.modules[n.target], dense.DENSE_MODULES)
    return n.op == "call_function" and n.target in dense.DENSE_FUNCTIONS


def _signal_only(nodes: list[fx.Node], c: "_Ctx", pattern: set[str],
                 classified: dict[str, tuple[str, Any]]) -> tuple[set[str], set[str]]:
    """Nodes that only compute the signal of a gate (``x * s``, ``s`` held constant) or the
    queries and keys of an attention (its pattern held constant): a softmax over a selective
    kernel's branches, a norm over channels in a gate, rotary embeddings of q and k. The rules
    need their values, not their units, so they may be left unmapped when they mix units.
    Layers on the way stay layers (dead ends that carry no flow). The products and attentions
    it classifies are put in ``classified`` (for the mapping, which needs them again). Also
    returns the nodes that only compute such values through layers too: they may be left
    without units when one before them fails to map (a signal computed from a mean over the
    units), the layers with them."""
    signals: dict[str, set[str]] = {}  # op -> the operands it holds constant
    for n in nodes:
        if n.name not in c.data:
            continue
        op = _op_of(n, c)
        product = op is not None and op.rule == ops.CONSTRUCT and op.construct == "product"
        if not product and not (n.op == "call_function" and n.target in (F.scaled_dot_product_attention, attend)):
            continue
        what, info = classified[n.name] = _classify(n, c)
        if what == "chain" and isinstance(info, ChainOp) and info.kind == "gate":
            signals[n.name] = {info.params[0]}
        elif what == "chain" and isinstance(info, ChainOp) and info.kind == "attention":
            signals[n.name] = {info.params[0], info.params[1]} - {info.input_node}  # q and k, not v
            if isinstance(info.params[2], dict) and isinstance(info.params[2]["attn_mask"], DATA_MASK):
                signals[n.name].add(str(info.params[2]["attn_mask"]))
    out: set[str] = set()
    deep: set[str] = set()  # the same through layers (CSATv2's gate: a small transformer on channel means)
    for n in reversed(nodes):
        if n.name not in c.data or not n.users:
            continue
        # (reads of its size, plain values, do not need its units)
        if all(u.name in deep or u.name in pattern or n.name in signals.get(u.name, ())
               or (u.name not in c.data and u.op != "output") for u in n.users):
            deep.add(n.name)
            if not _is_layer(n, c) and all(u.name in out or u.name in pattern or n.name in signals.get(u.name, ())
                                           for u in n.users):
                out.add(n.name)
    return out, deep


def _inplace_flag(n: fx.Node, pos: int | None) -> bool:
    """Whether a function with an ``inplace`` flag at ``pos`` is called with it on."""
    return pos is not None and (n.kwargs.get("inplace") is True or (len(n.args) > pos and n.args[pos] is True))


def _check_in_place(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> None:
    """Refuse an in-place op whose input is read again after it: connectome runs in-place ops
    out of place (the values it keeps must not be overwritten), which would change what those
    later reads see. (Tracing rewrote those it could out of place:
    :func:`connectome.extract.graph_passes.functionalise`.)"""
    order = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        t = n.target
        inplace = (
            (n.op == "call_method" and isinstance(t, str) and t.endswith("_") and not t.startswith("_"))
            or (n.op == "call_function" and (ops.is_inplace_function(t) or getattr(t, "__name__", "").endswith("_")
                                            or _inplace_flag(n, ops.inplace_position(t))))
            or (n.op == "call_module" and (getattr(modules.get(t), "inplace", False) is True
                                           or getattr(modules.get(t), "_connectome_inplace", False)))
        )
        if not inplace or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        later = [u for u in n.args[0].users if u is not n and order.get(u, -1) > order[n]]
        if later:
            raise ExtractionError(
                f"{_where(n)} changes {n.args[0].name!r} in place and {later[0].name!r} reads it afterwards; "
                "connectome runs in-place ops out of place, so write it out of place (y = f(x)) and read y"
            )


# ----------------------------------------------------------------------------- layouts
def _unit_tensor(u: Units, shape: tuple[int, ...], layer_size: int) -> torch.Tensor:
    """A float64 tensor of ``shape`` whose every element is the number of its unit, plus
    ``layer_size`` times its image's index, so that the batch dim can be found again."""
    if u.dims == ():
        t = torch.full(shape, float(np.asarray(u.index)), dtype=torch.float64)
    else:
        idx = torch.arange(layer_size, dtype=torch.float64) if u.index is None else torch.as_tensor(
            np.asarray(u.index), dtype=torch.float64)
        view = [1] * len(shape)
        for d, s in zip(u.dims, idx.shape):
            view[d] = s
        if u.batch in u.dims:  # units that vary with the row of an image (heads folded into the batch)
            rows = list(shape)
            rows[u.batch] = u.windows
            reps = [1] * len(shape)
            reps[u.batch] = shape[u.batch] // u.windows
            t = idx.reshape(view).expand(rows).repeat(reps)
        else:
            t = idx.reshape(view).expand(shape)
    view = [1] * len(shape)
    view[u.batch] = shape[u.batch]
    image = torch.div(torch.arange(shape[u.batch]), u.windows, rounding_mode="floor").to(torch.float64)
    return t + float(layer_size) * image.reshape(view)


def _units_from(U: torch.Tensor, layer: int, layer_size: int, batch: int, where: str) -> Units:
    """Read back where the units (and the batch) went from a tensor that went through layout ops."""
    shape = tuple(U.shape)
    if U.numel() == 0:  # nothing to follow (narrow() of an empty dim was a RuntimeError inside torch)
        raise ExtractionError(f"{where} gives an empty tensor {list(shape)} (a slice of no tokens or channels); "
                              "units cannot be followed through it - build the model without the empty part")
    mixed = (f"{where} mixes the images of a batch (its batch dim does not hold whole images, one after "
             "another); units cannot be followed")
    # the image of every element: unit numbers are below layer_size, images add layer_size each
    image = torch.div(U, float(layer_size), rounding_mode="floor")
    bdim, windows = None, 1
    for d in range(len(shape)):
        if batch > 1 and shape[d] % batch == 0:
            # whole images one after another along d: row r of d belongs to image r // windows
            w = shape[d] // batch
            view = [1] * len(shape)
            view[d] = shape[d]
            rows = torch.div(torch.arange(shape[d]), w, rounding_mode="floor").to(torch.float64).reshape(view)
            if torch.equal(image, rows.expand_as(image)):
                bdim, windows = d, w
                break
    if bdim is None:
        raise ExtractionError(mixed)
    U = U - float(layer_size) * image
    # every image's rows hold the same units; the rows of one image may hold different units
    # (heads folded into the batch: row r holds head r % windows), then the units vary along
    # the batch dim and its index has one entry per row of an image
    reps = [1] * len(shape)
    reps[bdim] = batch
    first = U.narrow(bdim, 0, windows)
    if not torch.equal(U, first.repeat(reps)):
        raise ExtractionError(mixed)
    U = first
    shape = tuple(U.shape)
    varying = [d for d in range(len(shape)) if shape[d] > 1 and not torch.equal(U, U.narrow(d, 0, 1).expand_as(U))]
    base = U
    for d in range(len(shape) - 1, -1, -1):
        if d not in varying:
            base = base.narrow(d, 0, 1)
    if not torch.equal(base.expand_as(U), U):
        raise ExtractionError(f"{where} mixes units with positions in a way that cannot be followed")
    idx = base.reshape([shape[d] for d in varying])
    if not torch.equal(idx, idx.round()) or (idx.numel() and (idx.min() < 0 or idx.max() >= layer_size)):
        raise ExtractionError(f"{where} averages over units (a mean or pooling across channels mixes units)")
    index = idx.to(torch.int64).numpy()
    if len(varying) == 1 and index.shape[0] == layer_size and np.array_equal(index, np.arange(layer_size)):
        return Units(layer, (varying[0],), None, bdim, windows)
    if not varying:
        return Units(layer, (), index.reshape(()), bdim, windows)
    return Units(layer, tuple(varying), index, bdim, windows)


class _NoKey(Exception):
    pass


def _layout_key(node: fx.Node, units: dict[str, Units], values: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                size_of: Callable[[Units], int], multi: dict[str, list[Units]] | None = None) -> Any:
    """What the units a layout op gives depend on: the op, its plain arguments (sizes read off
    shapes included), and per data input its units (the layer as the order it first appears in)
    and shape (of each tensor, for an input that is several: ``multi``, an unbind's); None when
    an input has no units or an argument is no plain value (not remembered)."""
    if node.op not in ("call_function", "call_method"):
        return None
    layers: dict[int, int] = {}
    multi = multi or {}

    def of(u: Units, shape: tuple[int, ...]) -> Any:
        index = None if u.index is None else (np.asarray(u.index).shape, np.asarray(u.index).tobytes())
        return ("units", layers.setdefault(u.layer, len(layers)), u.dims, index, u.batch, u.windows,
                tuple(shape), size_of(u))

    def part(a: Any) -> Any:
        if isinstance(a, fx.Node) and a.name not in units and a.name in values:
            return ("value", part(values[a.name]))  # a size read off a shape
        if isinstance(a, fx.Node) and a.name not in units and a.name in multi:
            return ("multi", tuple(of(u, shapes[f"{a.name}#{i}"]) for i, u in enumerate(multi[a.name])))
        if isinstance(a, fx.Node):
            u = units.get(a.name)
            if u is None:
                raise _NoKey
            return of(u, shapes[a.name])
        if isinstance(a, (tuple, list)):
            return (type(a).__name__, tuple(part(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, part(v)) for k, v in sorted(a.items())))
        if isinstance(a, slice):
            return ("slice", part(a.start), part(a.stop), part(a.step))
        if a is None or a is Ellipsis or isinstance(a, (bool, int, float, str, torch.dtype, torch.device)):
            return (type(a).__name__, a)
        raise _NoKey

    try:
        key = (node.op, node.target, part(node.args), part(node.kwargs))
        hash(key)
    except (_NoKey, TypeError):
        return None
    return key


def _split_group(idx: np.ndarray, layer_size: int) -> tuple[int, np.ndarray | None]:
    """(positions per unit, unit of each group) for a flat index: runs of equal length P."""
    n = idx.size
    if n == 0:
        return 1, None
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    lengths = np.diff(np.r_[starts, n])
    p = int(lengths[0])
    group = p if np.all(lengths == p) else 1
    base = idx[::group]
    if base.size == layer_size and np.array_equal(base, np.arange(layer_size)):
        return group, None
    return group, base.astype(np.int64)


# ----------------------------------------------------------------------------- building
def trace_units(model: nn.Module, example: torch.Tensor) -> UnitGraph:
    """Trace ``model`` and map its data flow to layers of units.

    Parameters
    ----------
    model : nn.Module
        In eval mode (the caller switches it).
    example : Tensor, shape (1, C, H, W) or (1, F)
        An input used to learn every tensor's shape.

    Returns
    -------
    UnitGraph

    Raises
    ------
    ExtractionError
        The model is untraceable, fails on the example, or uses an op that fits no rule.
    """
    # tracing makes many small Python objects (fx nodes, unit indices) and frees few: the
    # collector's passes over them and the model are wasted work there (3-5% of a one-batch
    # run of deit_tiny at 224 px on this machine), so it is paused for the trace alone
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _trace_units(model, example)
    finally:
        if enabled:
            gc.enable()


def _trace_units(model: nn.Module, example: torch.Tensor) -> UnitGraph:
    """:func:`trace_units`, with the collector paused."""
    if example.dim() >= 1 and example.shape[0] == 1:
        # a batch of two, so that a squeeze() cannot be mistaken for a change of batch size
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    gm = trace_graph(model, example)
    batch = int(example.shape[0])
    shapes, values, consts, data, casts = _record(gm, example)
    ctx = _Ctx(dict(gm.named_modules()), shapes, values, consts, data)
    nodes = list(gm.graph.nodes)
    _check_in_place(nodes, ctx.modules)
    by_name = {n.name: n for n in nodes}
    layers: list[LayerSpec] = []
    units: dict[str, Units] = {}
    multi: dict[str, list[Units]] = {}  # layout ops that give several tensors (chunk, split)
    used_names: dict[str, int] = {}
    rules: set[str] = set()

    def unique(name: str) -> str:
        # a name given already (a module called again, or `c_1` after a second call of `c`) gets
        # the next free suffix
        if name not in used_names:
            used_names[name] = 0
            return name
        while True:
            used_names[name] += 1
            out = f"{name}_{used_names[name]}"
            if out not in used_names:
                used_names[out] = 0
                return out

    def source(node: fx.Node, arg: fx.Node) -> Units:
        if arg.name not in units:
            raise _Unmapped(
                f"{_where(node)} reads {arg.name!r}, which does not come from the model input through ops we can map"
            )
        return units[arg.name]

    def size_of(u: Units) -> int:
        return layers[u.layer].size

    seen_layouts: dict[Any, Any] = {}  # key -> Units, or [(Units, shape)] for several tensors

    # Layout steps whose result no Units can say (channels folded into the batch on the way to
    # MobileViT's patches), followed by one more layout step: their tensors of unit numbers,
    # read by that step, whose result may be followable again.
    pending: dict[str, tuple[int, torch.Tensor]] = {}

    def layout(node: fx.Node) -> None:
        src = [a for a in node.all_input_nodes if a.name in units or a.name in multi or a.name in pending]
        if not src:
            raise ExtractionError(f"{_where(node)} reads no mapped tensor")
        first = src[0].name
        layer = units[first].layer if first in units else multi[first][0].layer if first in multi else pending[first][0]

        def arg(n: fx.Node) -> Any:
            if n.name in pending:
                return pending[n.name][1]
            if n.name in units:
                u = units[n.name]
                return _unit_tensor(u, shapes[n.name], size_of(u))
            if n.name in multi:
                return tuple(_unit_tensor(u, shapes.get(f"{n.name}#{i}", ()), size_of(u)) for i, u in enumerate(multi[n.name]))
            if n.name in values:
                return values[n.name]
            if n.name in consts:
                return consts[n.name].detach().cpu()
            raise ExtractionError(f"{_where(node)} reads {n.name!r}, which is neither mapped data nor a constant")

        patches = _patches(node, ctx)
        if patches is not None:
            units[node.name] = _patch_units(node, patches, units.get(src[0].name), shapes[src[0].name], size_of)
            return
        key = None if any(a.name in pending for a in src) else _layout_key(node, units, values, shapes, size_of, multi)
        if key is not None and key in seen_layouts:
            # the same op on units laid out the same way (the blocks of a transformer): the same
            # result, in this node's layer, without running the op on unit numbers again
            seen = seen_layouts[key]
            if isinstance(seen, Units):
                units[node.name] = dataclasses.replace(seen, layer=layer)
            else:  # several tensors (unbind, split): their units and shapes
                multi[node.name] = [dataclasses.replace(u, layer=layer) for u, _ in seen]
                for i, (_, shape) in enumerate(seen):
                    shapes[f"{node.name}#{i}"] = shape
            return
        layout_op(node, src, layer, arg)
        if key is not None and kinds.get(node.name, ("",))[0] == "layout":
            if node.name in units:
                seen_layouts[key] = units[node.name]
            elif node.name in multi:
                seen_layouts[key] = [(u, shapes[f"{node.name}#{i}"]) for i, u in enumerate(multi[node.name])]

    def layout_op(node: fx.Node, src: list[fx.Node], layer: int, arg: Callable[[fx.Node], Any]) -> None:
        op = _op_of(node, ctx)
        if op is not None and op.reduces:
            dims = _const(node, 1, "dim", None)
            u = units.get(src[0].name)
            nd = len(shapes[src[0].name])
            dims = (dims,) if isinstance(dims, int) else dims
            if op.name in ("sum", "mean") and u is not None and dims is not None and len(dims) == 1 \
                    and sum_of_slices(node, src[0], u, dims[0] % nd, op.name):
                return
            if dims is None or u is None or any(d % nd in (0, u.batch) or d % nd in u.dims for d in dims):
                raise ExtractionError(f"cannot map {_where(node)} to units: a {op.name} over the "
                                      "units or the batch mixes units (over positions it maps)")
        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        try:
            with torch.no_grad():
                # a mean or a sum over positions keeps each unit: the mean of unit numbers says where they went
                if op is not None and op.reduces:
                    out = torch.mean(args[0], dim=tuple(dims), keepdim=bool(_const(node, 2, "keepdim", False)))
                elif node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_module":
                    out = ctx.modules[node.target](*args, **kwargs)
                else:
                    out = node.target(*args, **kwargs)
        except ExtractionError:
            raise
        except Exception as exc:  # the op did not accept unit numbers the way it accepts data
            raise ExtractionError(f"cannot follow units through {_where(node)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        where = _where(node)
        if isinstance(out, torch.Tensor):
            if out.dtype != torch.float64:
                raise ExtractionError(f"cannot follow units through {where}")
            try:
                units[node.name] = _units_from(out, layer, layers[layer].size, batch, where)
            except ExtractionError:
                users = list(node.users)
                nxt = _op_of(users[0], ctx) if len(users) == 1 else None
                if nxt is None or nxt.rule != ops.LAYOUT or nxt.multi_output or nxt.reduces or \
                        [a for a in users[0].all_input_nodes if ctx.is_data(a)] != [node]:
                    raise
                pending[node.name] = (layer, out)  # the next layout step may make it followable
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            multi[node.name] = [_units_from(o, layer, layers[layer].size, batch, where) for o in out]
            for i, o in enumerate(out):
                shapes[f"{node.name}#{i}"] = tuple(o.shape)
        else:
            raise ExtractionError(f"cannot follow units through {where}")

    def sum_of_slices(node: fx.Node, x: fx.Node, u: Units, d: int, how: str) -> bool:
        """A sum (mean) over dim ``d`` of a tensor whose units lie along ``d`` and one more dim
        (ResNeSt's radix groups, ``(B, R, C, H, W).sum(1)``): an add layer of the ``R`` slices,
        unit ``c`` of the result reading unit ``(r, c)`` of each. Returns False for other layouts."""
        if bool(_const(node, 2, "keepdim", False)):
            return False  # (its slices would keep the summed dim)
        if len(u.dims) != 2 or d not in u.dims or u.windows != 1 or u.batch != 0 or u.index is None:
            return False
        other = next(dd for dd in u.dims if dd != d)
        index = np.moveaxis(np.asarray(u.index), u.dims.index(d), 0)  # (R, C)
        r, width = index.shape
        out_dim = other - 1 if other > d else other
        scope = _scope(node)
        operands = [Operand(layer=u.layer, node=x.name, sign=1.0 / r if how == "mean" else 1.0,
                            cols=None if np.array_equal(index[k], np.arange(size_of(u))) else index[k],
                            width=width, dim=out_dim, select=(d, k)) for k in range(r)]
        layers.append(LayerSpec(name=unique(f"{scope}.sum" if scope else "sum"), kind=Kind.RESIDUAL, size=width,
                                node=node.name, module=scope or None, operands=operands, dim=out_dim))
        units[node.name] = Units(len(layers) - 1, (out_dim,), None)
        kinds[node.name] = ("residual", None)
        return True

    def join_positions(node: fx.Node, stacked: bool, dim: int) -> bool:
        """``torch.cat`` along a dim that does not hold the units, or ``torch.stack``: each unit
        of the result holds the values of that unit of every operand, at different positions.
        Operands of one layer make a layout op; of several layers, a concat layer whose
        operands each fill all its units (identity edges) at their own positions. Returns
        False for a cat along the units (a concat of units, handled by the caller)."""
        parts = list(node.args[0])
        if not all(isinstance(a, fx.Node) and a.name in units for a in parts):
            if stacked:
                raise ExtractionError(f"cannot map {_where(node)}: torch.stack of a constant with data "
                                      "(stack data tensors only, or cat the constant along positions)")
            return False
        us = [units[a.name] for a in parts]
        if not stacked and any(dim in u.dims for u in us):
            return False
        if len({u.layer for u in us}) == 1:
            layout(node)
            kinds[node.name] = ("layout", None)
            return True
        if stacked and dim != 0 and all(u.dims == () and u.batch == 0 for u in us):
            # one unit each (the Y, Cb and Cr channels computed from RGB): stacked, they are the
            # units of a concat layer along the new dim, one operand per unit
            folds = {u.windows for u in us}
            if len(folds) > 1:
                raise ExtractionError(f"{_where(node)} stacks tensors whose batch dims hold different numbers "
                                      "of windows per image; units cannot be followed")
            scope = _scope(node)
            operands = [Operand(layer=u.layer, node=a.name, offset=k, cols=np.array([int(u.index)]), width=1, dim=dim,
                                dims=()) for k, (a, u) in enumerate(zip(parts, us))]
            layers.append(LayerSpec(name=unique(f"{scope}.stack" if scope else "stack"), kind=Kind.CONCAT,
                                    size=len(parts), node=node.name, module=scope or None, operands=operands, dim=dim))
            units[node.name] = Units(len(layers) - 1, (dim,), None, windows=folds.pop())
            kinds[node.name] = ("concat", dim)
            return True
        operands, start = [], 0
        for a, u in zip(parts, us):
            if len(u.dims) != 1 or u.batch != 0:
                raise ExtractionError(f"{_where(node)} joins tensors whose units are not along one dim; "
                                      "units cannot be followed")
            d = u.dims[0] % len(shapes[a.name])
            idx = u.along(d, shapes[a.name][d], size_of(u))
            cols = None if (idx.size == size_of(u) and np.array_equal(idx, np.arange(idx.size))) else idx
            length = 1 if stacked else shapes[a.name][dim]
            operands.append(Operand(layer=u.layer, node=a.name, cols=cols, width=idx.size, dim=d,
                               span=(dim, start, length, stacked)))
            start += length
        out_dims = {o.dim + (1 if stacked and o.dim >= dim else 0) for o in operands}
        windows = {u.windows for u in us}
        if len(out_dims) != 1 or len(windows) != 1 or len({o.width for o in operands}) != 1:
            raise ExtractionError(f"{_where(node)} joins tensors whose units lie along different dims; "
                                  "units cannot be followed")
        scope = _scope(node)
        base = "stack" if stacked else "cat"
        out_dim = out_dims.pop()
        layers.append(LayerSpec(name=unique(f"{scope}.{base}" if scope else base), kind=Kind.CONCAT,
                                size=operands[0].width, node=node.name, module=scope or None, operands=operands, dim=out_dim))
        units[node.name] = Units(len(layers) - 1, (out_dim,), None, windows=windows.pop())
        return True

    def pad_units(node: fx.Node, x: fx.Node, u: Units, pad: tuple[int, ...], value: float) -> bool:
        """``F.pad`` along a dim of the units with a constant (EfficientViT's column of ones beside
        v, whose product with the keys is linear attention's normaliser): a layer of the units and
        the padded ones, which hold the constant (a bias, the ``pad`` rule's constant). With units
        on several dims (heads and channels) the padded ones come after all the others, and only
        a pad after the data is mapped. Returns False for a pad of positions."""
        s_in, s_out = shapes[x.name], shapes[node.name]
        nd = len(s_in)
        dims = tuple(d % nd for d in u.dims)
        changed = [d for d in range(nd) if d >= len(s_out) or s_in[d] != s_out[d]]
        if len(s_out) != nd or u.batch != 0 or len(changed) != 1 or changed[0] not in dims:
            return False
        d = changed[0]
        k = nd - 1 - d  # F.pad lists (before, after) from the last dim back
        front, back = (int(pad[2 * k]), int(pad[2 * k + 1])) if len(pad) > 2 * k + 1 else (0, 0)
        if front < 0 or back < 0 or not math.isfinite(value) or (len(dims) > 1 and front):
            return False
        scope = _scope(node)
        if len(dims) == 1:
            idx = u.along(d, s_in[d], size_of(u))
            if idx is None:
                return False
            cols, width, size, out = idx, s_in[d], s_out[d], Units(0, (d,), None, windows=u.windows)
        else:  # the data's places first, in order along the dims, then the padded ones
            cols = np.asarray(u.index, dtype=np.int64).reshape(-1)
            width = cols.size
            if 0 in dims:
                _distinct_rows(node, cols, "pads")
            ext = lambda s, e: u.windows if e == 0 else s[e]  # noqa: E731  heads folded into the batch
            index = np.full([ext(s_out, e) for e in dims], -1, dtype=np.int64)
            data = tuple(slice(0, ext(s_in, e)) for e in dims)
            index[data] = np.arange(width).reshape([ext(s_in, e) for e in dims])
            rest = index < 0
            index[rest] = width + np.arange(int(rest.sum()))
            size, out = index.size, Units(0, dims, index, windows=u.windows)
        if cols is not None and cols.size == size_of(u) and np.array_equal(cols, np.arange(cols.size)):
            cols = None
        op = ChainOp(node.name, "pad", x.name, (pad, value))  # the padded units' constant, a bias
        layers.append(LayerSpec(name=unique(f"{scope}.pad" if scope else "pad"), kind=Kind.CONCAT, size=size,
                                node=node.name, module=scope or None, dim=d, bias_ops=[op],
                                operands=[Operand(layer=u.layer, node=x.name, offset=front, cols=cols, width=width,
                                                  dim=d, dims=dims if len(dims) > 1 else None)]))
        out.layer = len(layers) - 1
        units[node.name] = out
        return True

    output_node = None
    kinds: dict[str, tuple[str, Any]] = {}
    products, pattern = _attention_products(nodes, ctx)
    classified: dict[str, tuple[str, Any]] = {}
    signal_only, signal_deep = _signal_only(nodes, ctx, pattern, classified)
    data_products, feeds = _data_products(nodes, ctx, products, pattern)
    tolerant = signal_only | signal_deep | feeds  # may be left without units when they fail to map
    failed: dict[str, ExtractionError] = {}  # why a tolerant node was left without units

    def map_node(node: fx.Node) -> None:
        nonlocal output_node
        if node.op == "placeholder":
            if node.name not in shapes:
                return
            if any(l.kind == Kind.INPUT for l in layers):
                raise ExtractionError("the model takes several tensor inputs; connectome maps single-input models")
            size = shapes[node.name][1] if len(shapes[node.name]) > 1 else 1
            layers.append(LayerSpec(name=unique("input"), kind=Kind.INPUT, size=size, node=node.name))
            units[node.name] = Units(0, (1,), None) if len(shapes[node.name]) > 1 else Units(0, (), np.array(0))
            return
        if node.op == "output":
            output_node = node
            return
        if node.op == "get_attr":
            return
        if node.name in pattern:
            return  # computes an attention pattern, which the attention rule holds constant
        if node.name in data_products and node.name not in products:
            choice = _pattern_operand(node, units, shapes)
            if choice is not None:
                products[node.name] = choice
            else:  # an operand left without units may say why
                for a in node.all_input_nodes:
                    if a.name in failed:
                        raise failed[a.name]
        if node.name in products:
            pn, vn = products[node.name]
            what, info = "chain", ChainOp(node.name, "pattern", vn, (pn,))
        else:
            what, info = classified.pop(node.name, None) or _classify(node, ctx)
        kinds[node.name] = (what, info)
        if what == "skip":
            return
        if what == "unsupported":
            raise ExtractionError(
                f"cannot map {_where(node)} to units: {info}. Pass a model (or a sub-model) that "
                "ends before this op, or replace the op"
            )
        if what == "layout":
            layout(node)
        elif what == "layer":
            x = node.args[0] if node.args else node.kwargs.get("input")
            if not isinstance(x, fx.Node):
                raise ExtractionError(f"{_where(node)} has no tensor input")
            u = source(node, x)
            s_in, s_out = shapes[x.name], shapes[node.name]
            if info is dense.CONV1D and len(s_in) == 3 and s_in[1] == 1 and s_out[1] == 1 and u.batch == 0 \
                    and u.dims == (2,):
                info = dense.CONV1D_UNITS  # one channel convolved across the units (ECA attention)
            elif info is dense.CONV1D and len(s_in) == 3 and u.batch == 0 and u.dims == (2,) and \
                    s_in[2] == s_out[2] and _pointwise_conv1d(node, ctx):
                # a 1x1 Conv1d whose channels are positions and whose length holds the units (CoaT's
                # head mixing the class tokens of three scales): a Linear over positions
                _positions_linear(node, x, u, info, ctx, gm, layers, units, kinds, bias_dim=1)
                return
            dim_in = info.units_dim(len(s_in))
            if info.grouped_input and len(s_in) > 2 and u.batch == 0 and len(u.dims) == 1 \
                    and 0 < u.dims[0] < len(s_in) - 1:
                # a Linear over positions (token mixing): the units stay, each mixed over its positions
                _positions_linear(node, x, u, info, ctx, gm, layers, units, kinds)
                return
            if node.op == "call_module":
                m = ctx.modules[node.target]
                module_name = _module_path(node)
                if len(node.args) > 1 or node.kwargs:
                    raise ExtractionError(f"{_where(node)} is called with more than its input (output_size?); "
                                          "call it with the input alone")
                # a module called again (CoaT's position encoding shared by a stage's blocks) is a
                # layer per call, with the same weights: each call's W * dW is its own (the
                # accumulator gives a weight read by several nodes a leaf per node)
                groups, in_feat, call = info.module_call(m)
                wnode = None
            else:
                wnode = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if not isinstance(wnode, fx.Node):
                    raise ExtractionError(f"{_where(node)}: the weight is not a tensor of the model")
                wshape = shapes.get(wnode.name) or tuple(_attr_value(gm, wnode).shape)
                module_name = node.meta.get("connectome_name") or (
                    _module_path(node, wnode.target).rsplit(".", 1)[0] if wnode.op == "get_attr"
                    else (_scope(node) or node.name))
                groups, in_feat, call = info.function_call(lambda i, k, d: _const(node, i, k, d), wshape)
            if info.units_along:
                in_feat = s_in[dim_in]  # its positions are the units it reads
            idx = u.along(dim_in, s_in[dim_in], size_of(u))
            heads = 1
            if idx is None and info is dense.CONV2D and node.op == "call_module" and u.batch == 0 and u.windows > 1 \
                    and u.dims == (0, dim_in) and u.index is not None and call.get("padding_mode", "zeros") == "zeros":
                # heads folded into the batch, the same weights for each (MViTv2's pooling of q, k
                # and v): a grouped convolution over (batch, heads x channels), its weight tiled
                # per head, so each head's W * dW is its own (the accumulator runs it per head)
                heads = u.windows
                idx = np.asarray(u.index, dtype=np.int64).reshape(-1)
                _distinct_rows(node, idx, "reads")
                groups, in_feat = groups * heads, in_feat * heads
                call = dict(call, heads=heads, groups=groups)
            if idx is None:
                if info is dense.CONV1D and len(s_in) == 3 and u.batch == 0 and u.dims == (2,):
                    raise ExtractionError(
                        f"cannot map {_where(node)} to units: it convolves along the units with {s_in[1]} input "
                        f"and {s_out[1]} output channels; a Conv1d across units maps with one channel in and out "
                        "(as in ECA attention)"
                    )
                if u.batch in u.dims:
                    raise ExtractionError(
                        f"{_where(node)} reads a tensor whose units are partly in its batch dim (heads or channels "
                        "folded into the batch, its weights shared by them); units cannot be followed - fold them "
                        "back out of the batch before this layer")
                raise ExtractionError(
                    f"{_where(node)} reads a tensor whose units are not along its "
                    + ("last dim" if info.grouped_input else "channel dim") + "; units cannot be followed"
                )
            group, cols = _split_group(idx, size_of(u))
            if not info.grouped_input and group != 1:
                if info is dense.CONV2D and u.dims == () and group == idx.size and groups == 1:
                    info = dense.CONV2D_ONE_UNIT  # its channels are positions of one unit
                else:
                    raise ExtractionError(f"{_where(node)} convolves a flattened tensor; units cannot be followed")
            if idx.size != in_feat:
                raise ExtractionError(
                    f"{_where(node)} expects {in_feat} input features but its input carries {idx.size}"
                )
            name = unique(module_name)
            dim_out = info.units_dim(len(s_out))
            if wnode is not None and wnode.op != "get_attr":
                bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                wv = ctx.const(wnode)
                if wv is None:
                    raise ExtractionError(f"{_where(node)}: the weight is computed from the data; no unit graph maps it")
                call["weight_value"] = (wv, ctx.const(bnode) if isinstance(bnode, fx.Node) else None)
            layers.append(LayerSpec(
                name=name, kind=info.kind, size=s_out[dim_out] * heads, node=node.name, module=module_name,
                operands=[Operand(layer=u.layer, node=x.name, group=group, cols=cols, width=idx.size // group)],
                groups=groups, weight_node=wnode.name if wnode is not None else None, call=call, dim=dim_out,
                dense=info.name,
            ))
            if heads > 1:  # unit h * O + o: output channel o of head h
                units[node.name] = Units(len(layers) - 1, (0, dim_out),
                                         np.arange(heads * s_out[dim_out]).reshape(heads, s_out[dim_out]), 0, heads)
                layers[-1].call["head_of"] = np.repeat(np.arange(heads), s_out[dim_out])
            else:
                units[node.name] = Units(len(layers) - 1, (dim_out,), None, windows=u.windows)
            if node.meta.get("connectome_heads"):  # q, k, v of nn.MultiheadAttention: heads side by side
                h = int(node.meta["connectome_heads"])
                layers[-1].call["head_of"] = np.arange(layers[-1].size) // (layers[-1].size // h)
        elif what == "window":
            q = node.args[0]
            u = source(node, q)
            c3 = shapes[q.name][-1]
            if not (u.natural and u.dims == (len(shapes[q.name]) - 1,)):
                raise ExtractionError(f"{_where(node)} reads q, k, v that are not one Linear's units")
            units[node.name] = Units(u.layer, u.dims, np.arange(2 * c3 // 3, c3, dtype=np.int64))
            layers[u.layer].bias_ops.append(ChainOp(node.name, "window", q.name, ()))
            rules.add(RULES["window"].name)
        elif what == "concat" and _const_cat(node, info, ctx, units, layers):
            pass  # constants (a class token) joined to data along positions: a per-unit op
        elif what in ("concat", "stack") and join_positions(node, what == "stack", info):
            pass  # data joined along positions (a class token, the branches of a selective kernel)
        elif what in ("residual", "concat", "product"):
            targs = ctx.data_args(node) if what != "concat" else list(node.args[0])
            nd = len(shapes[node.name])
            # units on several dims of every operand (heads and channels), or on none (one unit each)
            several: tuple[int, ...] | None = None
            if what != "concat":
                us = [source(node, a) for a in targs]
                one = [v.dims for v in us if len(v.dims) == 1]
                dim = one[0][0] if one else 1
                if not one and all(v.dims == us[0].dims and v.batch == 0 for v in us) \
                        and all(shapes[a.name][d] == shapes[node.name][d] for a in targs for d in us[0].dims):
                    several = tuple(d % nd for d in us[0].dims)
                    dim = several[0] if several else 1
            else:
                dim = info
            operands, offset = [], 0
            folds = {source(node, a).windows for a in targs if isinstance(a, fx.Node) and a.name in units}
            if len(folds) > 1:
                raise ExtractionError(f"{_where(node)} combines tensors whose batch dims hold different numbers "
                                      "of windows per image; units cannot be followed")
            for k, a in enumerate(targs):
                if not isinstance(a, fx.Node) or a.name not in data:
                    raise ExtractionError(f"{_where(node)} concatenates a constant; units cannot be followed "
                                          "(a class token needs the transformer rules)")
                u = source(node, a)
                width = shapes[a.name][dim] if what != "product" else shapes[node.name][dim]  # a factor broadcast
                idx = u.along(dim, width, size_of(u))
                if several is not None:  # the unit at each place along those dims, in the order of the layer's units
                    idx = np.asarray(u.index, dtype=np.int64).reshape(-1)
                    width = idx.size
                if idx is None:
                    raise ExtractionError(f"{_where(node)} combines tensors along a dim that does not hold their units")
                cols = None if (idx.size == size_of(u) and np.array_equal(idx, np.arange(idx.size))) else idx
                sign = info[k] if what == "residual" else 1.0
                operands.append(Operand(layer=u.layer, node=a.name, offset=offset, sign=sign, cols=cols, width=width,
                                        dim=dim, dims=several))
                if what == "concat":
                    offset += width
            scope = _scope(node)
            if what == "residual":
                base = f"{scope}.{'sub' if info[1] < 0 else 'add'}" if scope else ("sub" if info[1] < 0 else "add")
                kind = Kind.RESIDUAL
            elif what == "product":
                base, kind = (f"{scope}.mul" if scope else "mul"), Kind.PRODUCT
                rules.add(RULES["product"].name)
            else:
                base, kind = (f"{scope}.cat" if scope else "cat"), Kind.CONCAT
            windows = folds.pop() if folds else 1
            if several is not None:  # (a unit per row of an image along the batch dim: heads folded into it)
                for o in operands:
                    if 0 in several and o.cols is not None:
                        _distinct_rows(node, o.cols, "combines")
                extent = [windows if d == 0 else shapes[node.name][d] for d in several]
                size = math.prod(extent)
            else:
                size = shapes[node.name][dim]
            layers.append(LayerSpec(name=unique(base), kind=kind, size=size, node=node.name,
                                    module=scope or None, operands=operands, dim=dim % nd))
            index = None if several is None else np.arange(size).reshape(extent)
            units[node.name] = Units(len(layers) - 1, (dim % nd,) if several is None else several, index,
                                     windows=windows)
        else:  # chain: keeps the units of its data input
            if isinstance(info, ChainOp) and RULES[info.kind].named_input:
                x = by_name[info.input_node]
            else:
                targs = ctx.data_args(node) if node.op != "call_module" else [a for a in node.all_input_nodes if ctx.is_data(a)]
                if len(targs) != 1:
                    raise ExtractionError(f"cannot map {_where(node)}: a per-unit op with {len(targs)} data inputs")
                x = targs[0]
            u = source(node, x)
            s_in, s_out = shapes[x.name], shapes[node.name]
            if isinstance(info, ChainOp) and RULES[info.kind].attention and \
                    set(u.dims) & _mixed_dims(node, x, len(s_in)):
                # attention across channels (XCA): the pattern, held constant, is a per-image
                # dense map between the units of v and those of a layer of its own
                spec, out_units = _mix_layer(node, x, u, info.params[0], shapes, len(layers), size_of(u))
                spec.name = unique(spec.name)
                layers.append(spec)
                units[node.name] = out_units
                kinds[node.name] = ("layer", Kind.MIX)
                rules.add(RULES["mix"].name)
                return
            pooled = _pooled_dims(node, ctx, len(s_in))
            if pooled & set(u.dims):
                raise ExtractionError(f"cannot map {_where(node)}: it pools over the dim that holds the units "
                                      f"(shape {s_in}); pool over positions, with the units on dim 1")
            padded = _constant_pad(node, info)
            if padded is not None and pad_units(node, x, u, *padded):
                return
            if len(s_in) != len(s_out) or any(s_in[d] != s_out[d] for d in u.dims) or s_in[0] != s_out[0]:
                raise ExtractionError(f"{_where(node)} changes the units' dims ({s_in} -> {s_out}) in a way that mixes units")
            units[node.name] = u
            if isinstance(info, ChainOp) and info.kind == "attention" and isinstance(info.params[2], dict):
                for a in (info.params[0], info.params[1], x.name):  # (batch, heads, tokens, head_dim)
                    ua = units.get(a)
                    if ua is not None and len(ua.dims) == 2 and ua.index is not None:
                        spec = layers[ua.layer]
                        heads = spec.call.setdefault("head_of", np.full(spec.size, -1, dtype=np.int64))
                        idx = np.asarray(ua.index)  # (heads, head_dim): the unit of each
                        heads[idx] = np.arange(idx.shape[0])[:, None]
            if info is not None:
                info.input_node = x.name
                layers[u.layer].bias_ops.append(info)
                if RULES[info.kind].name:
                    rules.add(RULES[info.kind].name)
                if RULES[info.kind].nonlinear:
                    layers[u.layer].nonlinear.append(_module_path(node) if node.op == "call_module" else _where(node))

    skipped: set[str] = set()
    for node in nodes:
        if node.name in tolerant and any(a.name in skipped for a in node.all_input_nodes):
            skipped.add(node.name)  # computes a gate signal from values that carry no units
            failed.update({node.name: failed[a.name] for a in node.all_input_nodes if a.name in failed})
            continue
        mark = (len(layers), set(rules))
        try:
            map_node(node)
        except ExtractionError as exc:
            if node.name not in tolerant:
                # a value that needed units from one left without them: the reason is that one's
                reason = next((failed[a.name] for a in node.all_input_nodes if a.name in failed), None)
                if reason is not None and isinstance(exc, _Unmapped):
                    raise reason from None
                raise
            failed[node.name] = exc
            # it only computes a gate signal, which the gate rule holds constant: it needs no units
            del layers[mark[0]:]
            rules.intersection_update(mark[1])
            units.pop(node.name, None)
            multi.pop(node.name, None)
            pending.pop(node.name, None)
            kinds.pop(node.name, None)
            skipped.add(node.name)

    if output_node is None:
        raise ExtractionError("the traced model has no output")
    out = output_node.args[0]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], fx.Node):
        warnings.warn(
            f"{type(model).__name__} returns {len(out)} outputs; connectome takes the first as the logits "
            "(wrap the model so that forward returns the logits if that is wrong)", stacklevel=3,
        )
        out = out[0]
    if not isinstance(out, fx.Node) or out.name not in units:
        raise ExtractionError(
            "the model's output is not a tensor of units (a dict or a tuple of several outputs?); "
            "wrap the model so that forward returns the logits tensor"
        )
    ou = units[out.name]
    if len(shapes[out.name]) != 2 or not (ou.natural and ou.dims == (1,)):
        raise ExtractionError(f"the model's output has shape {shapes[out.name]}; expected (batch, classes)")
    out_layer = ou.layer

    def keeps(name: str, layer: int) -> bool:
        kind = kinds.get(name, ("skip", None))[0]
        u = units.get(name)
        # a resize ends the chain: the units pass on their own grid (their receptive fields),
        # and the resized values reach the consumer through its read
        # (units not natural: where the layer's own value has them, as laid out there)
        d = units.get(layers[layer].node)
        same = u is not None and d is not None and _same_units(u, d) and shapes[name] == shapes[layers[layer].node]
        return kind in ("chain", "layout") and u is not None and u.layer == layer and (u.natural or same) and \
            not _is_resize(by_name[name], ctx)

    # The value a unit passes on: follow single-user per-unit ops from the defining node.
    for li, spec in enumerate(layers):
        cur = by_name[spec.node]
        chain: list[str] = []
        while True:
            users = [u for u in cur.users if u.op != "output"]
            if len(users) != 1 or len(cur.users) != 1 or not keeps(users[0].name, li):
                break
            chain.append(users[0].name)
            cur = users[0]
        spec.chain = chain
        spec.out_node = cur.name
    if out.name in [layers[out_layer].node, *layers[out_layer].chain]:
        layers[out_layer].out_node = out.name
    # The ops a consumer's read passes through after its source's branch point (a BatchNorm
    # on one branch only, as in pre-activation blocks): they scale that consumer's edges.
    for spec in layers:
        for op in spec.operands:
            src_out = layers[op.layer].out_node
            cur = by_name[op.node]
            path: list[str] = []
            while cur.name != src_out and kinds.get(cur.name, ("", None))[0] in ("chain", "layout"):
                path.append(cur.name)
                nxt = [a for a in cur.all_input_nodes if ctx.is_data(a) or a.name in multi]
                k = kinds[cur.name][1]
                if isinstance(k, ChainOp) and RULES[k.kind].named_input:
                    nxt = [by_name[k.input_node]]
                if len(nxt) != 1:
                    break
                cur = nxt[0]
            op.path = path[::-1]
    # casts on the way of the flows (not those of a pattern or a gate's signal, held constant)
    held = set(signal_only) | signal_deep | pattern | {p for p, _ in products.values()}
    for n in reversed(nodes):
        if n.name in feeds and n.users and all(u.name in held or (u.name in products and products[u.name][0] == n.name)
                                               for u in n.users):
            held.add(n.name)
    casts = [_where(by_name[n]) for n in casts if n in units and n not in held]
    return UnitGraph(gm=gm, layers=layers, units=units, output_layer=out_layer, output_node=out.name, shapes=shapes,
                     casts=casts,
                     rules=sorted(rules))


def _constant_pad(node: fx.Node, info: Any) -> tuple[tuple[int, ...], float] | None:
    """``(pad, value)`` of ``F.pad`` with a constant: the ``pad`` rule's params, or for zeros (which
    the registry leaves without a rule: exact as they are) the call's own; None for other ops."""
    if isinstance(info, ChainOp) and info.kind == "pad":
        return tuple(info.params[0]), float(info.params[1])
    if info is not None or node.op != "call_function" or node.target is not F.pad or \
            _const(node, 2, "mode", "constant") != "constant":
        return None  # not a pad, or a reflection of the data
    pad = _const(node, 1, "pad", ())
    return (tuple(pad), 0.0) if isinstance(pad, (tuple, list)) and all(isinstance(p, int) for p in pad) else None


def _pointwise_conv1d(node: fx.Node, c: _Ctx) -> bool:
    """Whether a Conv1d call has kernel size 1, stride 1, no padding and one group."""
    if node.op == "call_module":
        m = c.modules[node.target]
        return tuple(m.kernel_size) == (1,) and tuple(m.stride) == (1,) and m.groups == 1 and \
            (m.padding in ("valid", "same") or tuple(m.padding) == (0,))
    w = c.const(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    stride, pad, groups = (_const(node, i, k, d) for i, k, d in ((3, "stride", 1), (4, "padding", 0), (6, "groups", 1)))
    return w is not None and w.shape[-1] == 1 and stride in (1, (1,), [1]) and groups == 1 and \
        pad in (0, (0,), [0], "valid", "same")


def _positions_linear(node: fx.Node, x: fx.Node, u: Units, d: dense.Dense, ctx: _Ctx, gm: fx.GraphModule,
                      layers: list[LayerSpec], units: dict[str, Units], kinds: dict[str, tuple[str, Any]],
                      bias_dim: int = -1) -> None:
    """A Linear over positions of units along another dim (MLP-Mixer's token mixing): a per-unit op.

    Every unit's positions are mixed by the same weights and no unit reads another, so the units
    stay; the map is linear (exact as it is) and its bias, broadcast over the units, is a
    constant part (the ``shift`` rule)."""
    s_in, s_out = ctx.shapes[x.name], ctx.shapes[node.name]
    if s_in[0] != s_out[0] or s_in[u.dims[0]] != s_out[u.dims[0]]:
        raise ExtractionError(f"{_where(node)} changes the units' dims ({s_in} -> {s_out}) in a way that mixes units")
    if node.op == "call_module":
        bias = ctx.modules[node.target].bias
    else:
        bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = ctx.const(bnode) if isinstance(bnode, fx.Node) else None
        wnode = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not isinstance(wnode, fx.Node) or ctx.const(wnode) is None:
            raise ExtractionError(f"{_where(node)}: the weight is computed from the data; no unit graph maps it")
    units[node.name] = u
    b = dense.positions_bias(bias, len(s_out), bias_dim % len(s_out))
    op = ChainOp(node.name, "shift", x.name, (b,)) if b is not None else None
    kinds[node.name] = ("chain", op)
    if op is not None:
        layers[u.layer].bias_ops.append(op)


def _attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _own_weight(ug: UnitGraph, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.kind == Kind.MIX:  # a per-image pattern, no weights: a uniform one stands for it (rows sum to 1)
        width = spec.operands[0].width // spec.groups
        return torch.full((spec.size, width), 1.0 / width, dtype=torch.float64), None
    node = next(n for n in ug.gm.graph.nodes if n.name == spec.node)
    if node.op == "call_module":  # a stock dense module (see connectome.extract.dense)
        m = ug.gm.get_submodule(node.target)
        return m.weight.detach(), (m.bias.detach() if m.bias is not None else None)
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if wnode.op != "get_attr":
        if "weight_value" in spec.call:  # computed from parameters (a slice of a packed weight)
            return spec.call["weight_value"]
        raise ExtractionError(f"{_where(node)}: the weight is computed in forward; the weight graph needs stored weights")
    w = _attr_value(ug.gm, wnode).detach()
    b = _attr_value(ug.gm, bnode).detach() if isinstance(bnode, fx.Node) and bnode.op == "get_attr" else None
    return w, b


def layer_weight(ug: UnitGraph, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias tensors of a conv/linear layer (detached); for a layer over heads
    folded into the batch (``call["heads"]``), tiled once per head: the weight of the grouped
    convolution over (batch, heads x channels) that it is."""
    w, b = _own_weight(ug, spec)
    return tile_heads(spec, w, b)


def tile_heads(spec: LayerSpec, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w`` and ``b`` repeated once per head for a layer over heads folded into the batch."""
    h = int(spec.call.get("heads", 1))
    if h == 1:
        return w, b
    return w.repeat(h, *([1] * (w.dim() - 1))), (b.repeat(h) if b is not None else None)
