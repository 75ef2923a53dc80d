"""From a model to a graph of unit layers, with torch.fx.

Residual adds and concatenations are not modules, so a graph built from
``named_modules()`` would miss every skip connection; tracing with ``torch.fx`` sees them.
Each fx node that carries a tensor is assigned to the *unit layer* whose units its channels
(dim 1) are:

- layer-defining ops start a new layer: the input, ``Conv2d`` / ``Linear`` modules and
  ``F.conv2d`` / ``F.linear`` calls (models in the wild subclass convs with their own forward),
  residual ``add``/``sub`` of two tensors, and ``torch.cat`` on channels;
- per-channel ops keep the units of their input: BatchNorm (eval, folded), ReLU-like and
  other elementwise activations, pooling, dropout, padding, flatten (the positions of a
  channel collapse into the channel: ``group`` counts positions per unit).

Subclasses that compute their padding from the input's shape at run time (timm's
``Conv2dSame``) cannot be traced by fx; fixed padding (``F.pad`` then ``F.conv2d``) can.

Anything else (a product of two tensors, a softmax over channels, a permute) raises an
:class:`~connectome.errors.ExtractionError` naming the op and its module.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.errors import ExtractionError

__all__ = ["UnitGraph", "LayerSpec", "Operand", "ChainOp", "trace_units", "run_nodes"]

# ----------------------------------------------------------------------------- op tables
_CONV_MODULES = (nn.Conv2d, nn.Linear)
# Modules that keep each channel's units and are exact for flow (piecewise linear, or linear).
_PL_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Flatten,
    nn.ZeroPad2d,
)
# Elementwise but not piecewise linear: flows through them are first-order only.
_NONLINEAR_MODULES = (
    nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.CELU,
    nn.SELU, nn.Softplus, nn.Mish, nn.LogSigmoid,
)
_PL_FUNCS: set[Any] = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.max_pool1d, F.max_pool2d,
    torch.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout, F.dropout1d, F.dropout2d,
    torch.flatten, F.pad, torch.squeeze, torch.dropout, operator.getitem,
}
_NONLINEAR_FUNCS: set[Any] = {
    F.silu, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
    F.elu, F.celu, F.selu, F.softplus, F.mish, F.logsigmoid,
}
_CLAMP_FUNCS: set[Any] = {F.relu6, F.hardtanh, torch.clamp, torch.clip}
_PL_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous", "mean", "squeeze", "clone", "detach", "float", "double", "to"}
_NONLINEAR_METHODS = {"sigmoid", "tanh", "sigmoid_", "tanh_"}
_CLAMP_METHODS = {"clamp", "clamp_", "clip", "clip_"}
_SHAPE_METHODS = {"size", "dim", "numel", "shape"}


# ----------------------------------------------------------------------------- structures
@dataclass
class Operand:
    """One input of a layer: the value of fx node ``node``, whose channels are units of ``layer``."""

    layer: int
    node: str
    group: int = 1  # positions per unit when the value was flattened
    offset: int = 0  # first unit of the destination this operand fills (concat)
    sign: float = 1.0  # residual sub gives -1
    path: list[str] = field(default_factory=list)  # per-channel ops between the source's value and this read


@dataclass
class ChainOp:
    """A per-channel op with a constant part, which adds a bias term to its layer's units."""

    node: str
    kind: str  # "bn" (scale, shift), "clamp" (lo, hi), "shift" (c), "scale" (a)
    input_node: str
    params: tuple[Any, ...] = ()


@dataclass
class LayerSpec:
    """A layer of units in the traced model."""

    name: str
    kind: str  # input, conv, linear, residual, concat
    size: int
    node: str  # fx node that defines the units
    module: str | None = None
    operands: list[Operand] = field(default_factory=list)
    groups: int = 1
    out_node: str = ""  # end of the unbranched per-channel chain: the value passed on (A)
    chain: list[str] = field(default_factory=list)  # fx nodes of the unbranched chain after `node`
    bias_ops: list[ChainOp] = field(default_factory=list)
    nonlinear: list[str] = field(default_factory=list)  # nonlinear elementwise ops on these units
    weight_node: str | None = None  # for F.conv2d/F.linear calls: the node giving the weight
    call: dict[str, Any] = field(default_factory=dict)  # conv hyper-parameters


@dataclass
class UnitGraph:
    """The model's data flow mapped onto layers of units."""

    gm: fx.GraphModule
    layers: list[LayerSpec]
    ref: dict[str, tuple[int, int]]  # fx node -> (layer, group)
    output_layer: int
    output_node: str
    shapes: dict[str, tuple[int, ...]]

    def layer_index(self, name: str) -> int:
        from connectome.extract.targets import resolve_layer

        return resolve_layer(name, self.layers, where="in the traced model", error=ExtractionError)


# ----------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """A tracer whose leaves are torch.nn modules that run their stock forward."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _CONV_MODULES):
            # Subclasses with their own forward (TF "same" padding) are traced through: the
            # F.conv2d call inside becomes the layer.
            return type(m).forward in (nn.Conv2d.forward, nn.Linear.forward)
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise ExtractionError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, RuntimeError ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractionError(
            f"torch.fx cannot trace {type(model).__name__}: {msg}. Make forward free of "
            "data-dependent Python control flow (if/for on tensor values), or wrap the untraceable "
            "part in a module and register it with torch.fx.wrap"
        ) from None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
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


def _shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(node: fx.Node, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            shapes[node.name] = tuple(value.shape)
        return value

    with torch.inference_mode():
        run_nodes(gm, (example,), on_value=record)
    return shapes


# ----------------------------------------------------------------------------- classification
def _tensor_args(node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.name in shapes and a.op != "get_attr"]


def _shadow(node: fx.Node, op: str, target: Any) -> Any:
    """``node`` seen as another op (``x.add(y)`` as ``x + y``), without touching the graph:
    a real fx.Node would register itself among its inputs' users."""
    from types import SimpleNamespace

    return SimpleNamespace(name=node.name, op=op, target=target, args=node.args, kwargs=node.kwargs,
                           all_input_nodes=node.all_input_nodes, graph=node.graph)


def _tensor_operands(node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[fx.Node]:
    """Tensor operands in argument order (``input`` before ``other``), repeats kept (``a + a`` has two)."""
    args = list(node.args) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
    return [a for a in args if isinstance(a, fx.Node) and a.name in shapes and a.op != "get_attr"]


def _const(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _classify(node: fx.Node, modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]]) -> tuple[str, Any]:
    """What an fx node does to units: ('layer', kind) | ('residual', signs) | ('concat', None)
    | ('chain', ChainOp or None) | ('nonlinear', None) | ('skip', None) | ('unsupported', why)."""
    if node.name not in shapes:
        return ("skip", None)  # not a tensor (sizes, tuples of sizes ...)
    t = node.target
    if node.op == "call_module":
        m = modules[t]
        if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward:
            return ("layer", "conv")
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            return ("layer", "linear")
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is None or m.running_var is None:
                return ("unsupported", "BatchNorm without running statistics cannot be folded; build it with track_running_stats=True")
            var = m.running_var.detach()
            scale = torch.rsqrt(var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight.detach()
            shift = -m.running_mean.detach() * scale
            if m.bias is not None:
                shift = shift + m.bias.detach()
            return ("chain", ChainOp(node.name, "bn", "", (scale, shift)))
        if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
            return ("chain", ChainOp(node.name, "clamp", "", (lo, hi)))
        if isinstance(m, _PL_MODULES):
            return ("chain", None)
        if isinstance(m, _NONLINEAR_MODULES):
            return ("nonlinear", None)
        if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            return ("unsupported", f"{type(m).__name__} layers are not supported yet (Conv2d and Linear are)")
        return ("unsupported", f"module type {type(m).__name__} is not a per-channel op we can map")
    if node.op == "call_function":
        if t in (F.conv2d, torch.conv2d):
            return ("layer", "conv")
        if t in (F.linear,):
            return ("layer", "linear")
        if t in (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub):
            targs = _tensor_operands(node, shapes)
            alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
            if not isinstance(alpha, (int, float)):
                return ("unsupported", "an add/sub whose alpha is a tensor")
            neg = t in (operator.sub, operator.isub, torch.sub)
            if len(targs) == 2 and shapes[targs[0].name] == shapes[targs[1].name] == shapes[node.name]:
                return ("residual", (1.0, -float(alpha) if neg else float(alpha)))
            if len(targs) == 1 and any(isinstance(a, fx.Node) and a.op == "get_attr" or
                                       (isinstance(a, fx.Node) and a.name not in shapes) for a in node.args):
                return ("unsupported", "arithmetic with a tensor of the model (a buffer or parameter) is not "
                        "mapped yet; fold it into the neighbouring conv or BatchNorm")
            if len(targs) == 1:
                first = node.args[0] if node.args else node.kwargs.get("input")
                other = [a for a in [*node.args[:2], node.kwargs.get("other")]
                         if a is not None and not isinstance(a, fx.Node)]
                if other and isinstance(other[0], (int, float)):
                    c = float(other[0]) * (float(alpha) if first is targs[0] else 1.0)
                    if t in (operator.sub, operator.isub, torch.sub):
                        c = -c if first is targs[0] else c
                        if first is not targs[0]:
                            return ("unsupported", "constant minus tensor flips the sign of units")
                    return ("chain", ChainOp(node.name, "shift", "", (c,)))
            return ("unsupported", "an add/sub whose operands differ in shape (broadcasting) mixes units")
        if t in (operator.mul, operator.imul, torch.mul, operator.truediv, torch.div):
            targs = _tensor_args(node, shapes)
            others = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            is_div = t in (operator.truediv, torch.div)
            if len(targs) == 1 and len(others) == 1 and (not is_div or node.args[0] is targs[0]):
                a = float(others[0])
                return ("chain", ChainOp(node.name, "scale", "", (1.0 / a if is_div else a,)))
            return ("unsupported", "a product of two tensors (a gate, attention) is not a per-channel op; flows through it are not defined")
        if t in (torch.cat, torch.concat):
            dim = _const(node, 1, "dim", 0)
            tensors = node.args[0]
            nd = len(shapes[node.name])
            if dim in (1, 1 - nd) and isinstance(tensors, (list, tuple)):
                return ("concat", None)
            return ("unsupported", f"torch.cat along dim {dim}; only channel concatenation (dim=1) is a layer")
        if t in _CLAMP_FUNCS:
            if t is F.relu6:
                lo, hi = 0.0, 6.0
            elif t is F.hardtanh:
                lo, hi = _const(node, 1, "min_val", -1.0), _const(node, 2, "max_val", 1.0)
            else:
                lo, hi = _const(node, 1, "min", None), _const(node, 2, "max", None)
            return ("chain", ChainOp(node.name, "clamp", "", (lo, hi)))
        if t is F.pad:
            value = _const(node, 3, "value", None)
            mode = _const(node, 2, "mode", "constant")
            if mode == "constant" and value not in (None, 0, 0.0):
                return ("chain", ChainOp(node.name, "pad", "", (tuple(_const(node, 1, "pad", ())), float(value))))
            return ("chain", None)
        if t is operator.getitem:
            idx = node.args[1] if len(node.args) > 1 else None
            idx = idx if isinstance(idx, tuple) else (idx,)
            full = slice(None, None, None)
            keeps_units = len(idx) >= 2 and idx[0] == full and idx[1] == full and not any(
                isinstance(i, fx.Node) for i in idx[2:]) or (len(idx) == 1 and idx[0] == full)
            if not keeps_units:
                return ("unsupported", "indexing that selects or reorders channels (x[:, idx]) changes which unit "
                        "is which")
            return ("chain", None)
        if t in _PL_FUNCS:
            return ("chain", None)
        if t in _NONLINEAR_FUNCS:
            return ("nonlinear", None)
        if t is torch.mean:
            return _classify(_shadow(node, "call_method", "mean"), modules, shapes)
        return ("unsupported", f"function {getattr(t, '__name__', t)!s} is not a per-channel op we can map")
    if node.op == "call_method":
        if t in _PL_METHODS:
            if t == "mean":
                dims = _const(node, 1, "dim", None)
                dims = (dims,) if isinstance(dims, int) else dims
                nd = len(shapes[node.all_input_nodes[0].name])
                if dims is None or any(d % nd in (0, 1) for d in dims):
                    return ("unsupported", "a mean over the channel or batch dimension mixes units")
            return ("chain", None)
        if t in _CLAMP_METHODS:
            lo, hi = _const(node, 1, "min", None), _const(node, 2, "max", None)
            return ("chain", ChainOp(node.name, "clamp", "", (lo, hi)))
        if t in _NONLINEAR_METHODS:
            return ("nonlinear", None)
        if t in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"):
            fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[t.rstrip("_")]
            return _classify(_shadow(node, "call_function", fn), modules, shapes)
        return ("unsupported", f"method .{t}() is not a per-channel op we can map")
    return ("skip", None)


# ----------------------------------------------------------------------------- building
def _check_channels(node: fx.Node, src: fx.Node, shapes: dict[str, tuple[int, ...]], ref: dict[str, tuple[int, int]]) -> int:
    """Group (positions per unit) of ``node``'s output, given it keeps the units of ``src``."""
    layer, group = ref[src.name]
    s_in, s_out = shapes[src.name], shapes[node.name]
    if len(s_in) < 2 or len(s_out) < 2 or s_in[0] != s_out[0]:
        raise ExtractionError(f"{_where(node)} changes the batch dimension ({s_in} -> {s_out}); units cannot be followed")
    if s_out[1] == s_in[1]:
        return group
    # Flatten: (N, C, H, W) -> (N, C*H*W): each channel's positions stay together.
    if len(s_out) == 2 and s_out[1] == _prod(s_in[1:]):
        return group * _prod(s_in[2:])
    raise ExtractionError(
        f"{_where(node)} changes the channel dimension ({s_in} -> {s_out}) in a way that mixes units"
    )


def _prod(xs: tuple[int, ...]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


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
        The model is untraceable, fails on the example, or uses an op that mixes units.
    """
    gm = _trace(model)
    if example.dim() >= 1 and example.shape[0] == 1:
        # a batch of two, so that a squeeze() cannot be mistaken for a change of batch size
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    shapes = _shapes(gm, example)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    layers: list[LayerSpec] = []
    ref: dict[str, tuple[int, int]] = {}
    used_names: dict[str, int] = {}
    seen_modules: dict[str, str] = {}

    def unique(name: str) -> str:
        if name not in used_names:
            used_names[name] = 0
            return name
        used_names[name] += 1
        return f"{name}_{used_names[name]}"

    def source(node: fx.Node, arg: fx.Node) -> tuple[int, int]:
        if arg.name not in ref:
            raise ExtractionError(
                f"{_where(node)} reads {arg.name!r}, which does not come from the model input through ops we can map"
            )
        return ref[arg.name]

    output_node = None
    kinds: dict[str, tuple[str, Any]] = {}
    for node in nodes:
        if node.op == "placeholder":
            if node.name not in shapes:
                continue
            if ref:
                raise ExtractionError("the model takes several tensor inputs; connectome maps single-input models")
            size = shapes[node.name][1] if len(shapes[node.name]) > 1 else 1
            layers.append(LayerSpec(name=unique("input"), kind="input", size=size, node=node.name))
            ref[node.name] = (0, 1)
            continue
        if node.op == "output":
            output_node = node
            continue
        if node.op == "get_attr":
            continue
        what, info = _classify(node, modules, shapes)
        kinds[node.name] = (what, info)
        if what == "skip":
            continue
        if what == "unsupported":
            raise ExtractionError(
                f"cannot map {_where(node)} to units: {info}. Pass a model (or a sub-model) that "
                "ends before this op, or replace the op"
            )
        if what == "layer":
            x = node.args[0] if node.args else node.kwargs.get("input")
            if not isinstance(x, fx.Node):
                raise ExtractionError(f"{_where(node)} has no tensor input")
            li, group = source(node, x)
            s_out = shapes[node.name]
            if node.op == "call_module":
                m = modules[node.target]
                module_name = str(node.target)
                if module_name in seen_modules:
                    raise ExtractionError(
                        f"module {module_name!r} is called twice (shared weights); a unit graph needs one layer "
                        "per weight tensor - give each call its own module"
                    )
                seen_modules[module_name] = node.name
                groups = getattr(m, "groups", 1)
                in_feat = m.in_channels if info == "conv" else m.in_features
                call = {}
                if info == "conv":
                    call = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                                padding_mode=m.padding_mode, kernel_size=m.kernel_size)
                wnode = None
            else:
                wnode = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if not isinstance(wnode, fx.Node):
                    raise ExtractionError(f"{_where(node)}: the weight is not a tensor of the model")
                wshape = shapes.get(wnode.name) or tuple(_attr_value(gm, wnode).shape)
                module_name = str(wnode.target).rsplit(".", 1)[0] if wnode.op == "get_attr" else (_scope(node) or node.name)
                if info == "conv":
                    groups = int(_const(node, 6, "groups", 1))
                    in_feat = wshape[1] * groups
                    call = dict(stride=_const(node, 3, "stride", 1), padding=_const(node, 4, "padding", 0),
                                dilation=_const(node, 5, "dilation", 1), groups=groups, padding_mode="zeros",
                                kernel_size=tuple(wshape[2:]))
                else:
                    groups, in_feat, call = 1, wshape[1], {}
            if info == "conv" and group != 1:
                raise ExtractionError(f"{_where(node)} convolves a flattened tensor; units cannot be followed")
            if info == "linear" and len(shapes[x.name]) != 2:
                raise ExtractionError(
                    f"{_where(node)} applies Linear to a tensor of shape {shapes[x.name]}; only (batch, features) "
                    "inputs map to units (flatten first)"
                )
            if layers[li].size * group != in_feat:
                raise ExtractionError(
                    f"{_where(node)} expects {in_feat} input features but its input carries "
                    f"{layers[li].size} units x {group} positions"
                )
            name = unique(module_name)
            layers.append(LayerSpec(
                name=name, kind=info, size=s_out[1], node=node.name, module=module_name,
                operands=[Operand(layer=li, node=x.name, group=group)], groups=groups,
                weight_node=wnode.name if wnode is not None else None, call=call,
            ))
            ref[node.name] = (len(layers) - 1, 1)
        elif what == "residual":
            targs = _tensor_operands(node, shapes)
            ops = []
            for a, sign in zip(targs, info):
                li, group = source(node, a)
                if group != 1:
                    raise ExtractionError(f"{_where(node)} adds flattened tensors; units cannot be followed")
                ops.append(Operand(layer=li, node=a.name, sign=sign))
            scope = _scope(node)
            base = f"{scope}.{'sub' if info[1] < 0 else 'add'}" if scope else ("sub" if info[1] < 0 else "add")
            layers.append(LayerSpec(name=unique(base), kind="residual", size=shapes[node.name][1], node=node.name,
                                    module=scope or None, operands=ops))
            ref[node.name] = (len(layers) - 1, 1)
        elif what == "concat":
            ops, offset = [], 0
            for a in node.args[0]:
                if not isinstance(a, fx.Node):
                    raise ExtractionError(f"{_where(node)} concatenates a constant; units cannot be followed")
                li, group = source(node, a)
                if group != 1:
                    raise ExtractionError(f"{_where(node)} concatenates flattened tensors; units cannot be followed")
                ops.append(Operand(layer=li, node=a.name, offset=offset))
                offset += shapes[a.name][1]
            scope = _scope(node)
            layers.append(LayerSpec(name=unique(f"{scope}.cat" if scope else "cat"), kind="concat",
                                    size=shapes[node.name][1], node=node.name, module=scope or None, operands=ops))
            ref[node.name] = (len(layers) - 1, 1)
        else:  # chain or nonlinear: keeps the units of its tensor input
            targs = _tensor_args(node, shapes)
            if len(targs) != 1:
                raise ExtractionError(f"cannot map {_where(node)}: a per-channel op with {len(targs)} tensor inputs")
            li, _ = source(node, targs[0])
            ref[node.name] = (li, _check_channels(node, targs[0], shapes, ref))
            if what == "nonlinear":
                layers[li].nonlinear.append(str(node.target) if node.op == "call_module" else _where(node))
            elif info is not None:
                info.input_node = targs[0].name
                layers[li].bias_ops.append(info)

    if output_node is None:
        raise ExtractionError("the traced model has no output")
    out = output_node.args[0]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], fx.Node):
        warnings.warn(
            f"{type(model).__name__} returns {len(out)} outputs; connectome takes the first as the logits "
            "(wrap the model so that forward returns the logits if that is wrong)", stacklevel=3,
        )
        out = out[0]
    if not isinstance(out, fx.Node) or out.name not in ref:
        raise ExtractionError(
            "the model's output is not a tensor of units (a dict or a tuple of several outputs?); "
            "wrap the model so that forward returns the logits tensor"
        )
    out_layer, out_group = ref[out.name]
    if out_group != 1 or len(shapes[out.name]) != 2:
        raise ExtractionError(f"the model's output has shape {shapes[out.name]}; expected (batch, classes)")

    # The value a unit passes on: follow single-user per-channel ops from the defining node.
    for spec in layers:
        cur = by_name[spec.node]
        chain: list[str] = []
        while True:
            users = [u for u in cur.users if u.op != "output"]
            if len(users) != 1 or len(cur.users) != 1:
                break
            u = users[0]
            kind = kinds.get(u.name, ("skip", None))[0]
            if kind not in ("chain", "nonlinear") or ref.get(u.name, (None,))[0] != ref[spec.node][0]:
                break
            chain.append(u.name)
            cur = u
        spec.chain = chain
        spec.out_node = cur.name
    layers[out_layer].out_node = out.name if out.name in [layers[out_layer].node, *layers[out_layer].chain] else layers[out_layer].out_node
    # The ops a consumer's read passes through after its source's branch point (a BatchNorm
    # on one branch only, as in pre-activation blocks): they scale that consumer's edges.
    for spec in layers:
        for op in spec.operands:
            src_out = layers[op.layer].out_node
            cur = by_name[op.node]
            path: list[str] = []
            while cur.name != src_out and kinds.get(cur.name, ("", None))[0] in ("chain", "nonlinear"):
                path.append(cur.name)
                nxt = _tensor_args(cur, shapes)
                if len(nxt) != 1:
                    break
                cur = nxt[0]
            op.path = path[::-1]
    return UnitGraph(gm=gm, layers=layers, ref=ref, output_layer=out_layer, output_node=out.name, shapes=shapes)


def _attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def layer_weight(ug: UnitGraph, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias tensors of a conv/linear layer (detached)."""
    node = next(n for n in ug.gm.graph.nodes if n.name == spec.node)
    if node.op == "call_module":
        m = ug.gm.get_submodule(node.target)
        return m.weight.detach(), (m.bias.detach() if m.bias is not None else None)
    wnode = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if wnode.op != "get_attr":
        raise ExtractionError(f"{_where(node)}: the weight is computed in forward; the weight graph needs stored weights")
    w = _attr_value(ug.gm, wnode).detach()
    b = _attr_value(ug.gm, bnode).detach() if isinstance(bnode, fx.Node) and bnode.op == "get_attr" else None
    return w, b
