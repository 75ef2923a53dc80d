"""torch.fx tracing of a model, with ``nn.MultiheadAttention`` written out as its parts.

Symbolic tracing first; a model whose Python reads shapes (``if H != 8``, ``len(x)``, "same"
padding from the input size) or looks at its outputs (Hugging Face's checks and output
wrappers) is traced again with the example's values along (:mod:`connectome.extract.concrete`).
Such a graph holds the branches of the example's shape: :func:`graph_for` gives the graph of
another input shape (a smaller last batch), traced once per shape and checked to have the same
nodes, unless two batch sizes gave the same graph.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from connectome.errors import ExtractionError
from connectome.extract._model import check_model
from connectome.extract import dense, ops, windows
from connectome.extract.attention import attend
from connectome.extract.concrete import ConcreteValues, logits_of
from connectome.extract.fx_root import alias_targets, kept_attributes, traced_root
from connectome.extract.graph_passes import normalise

__all__ = ["trace_graph", "graph_for"]


class _Tracer(fx.Tracer):
    """A tracer whose leaves are torch.nn modules that run their stock forward.

    ``nn.MultiheadAttention`` is written out as its parts, so that each projection is a layer
    of units: ``q``, ``k`` and ``v`` Linear maps (slices of the packed ``in_proj_weight``),
    the attention itself (:func:`attend`) and ``out_proj``.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, dense.DENSE_MODULES):
            # Subclasses with their own forward (TF "same" padding) are traced through: the
            # F.conv2d call inside becomes the layer.
            return dense.of_module(m) is not None
        if ops.is_leaf_module(m):  # a users' module registered with register_op: one op
            return True
        return super().is_leaf_module(m, qualname)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        out = None
        if kind == "call_function" and windows.is_swin_attention(target):
            out = windows.expand(self, args, kwargs, self.module_stack and list(self.module_stack)[-1] or "")
        elif kind == "call_function" and windows.is_patch_merging_pad(target):
            out = windows.expand_patch_merging(self, args[0])
        if out is not None:
            # fx marks what a wrapped function returns as "is_wrapped" and its generated code would
            # register the target (here torch.cat or ours) as a wrapped global: not ours to register
            out.node.meta["connectome_expanded"] = True
            return out
        return super().create_proxy(kind, target, args, kwargs, *a, **kw)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, Any]:
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        def logits(*a: Any) -> Any:  # a ModelOutput's or dataclass's .logits is the output
            return logits_of(fn(*a))

        return logits, args

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(m, nn.MultiheadAttention):
            return self._attention(m, self.path_of_module(m), args, kwargs)
        if self.submodule_paths is not None and m not in self.submodule_paths:
            # made while forward runs (Perceiver's nn.Softmax(dim=-1)(scores)): no parameters
            # of the model's own, so its forward is traced into (F.softmax)
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _attention(self, m: nn.MultiheadAttention, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        names = ("query", "key", "value")
        qkv = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        extra = {k: v for k, v in kwargs.items() if k not in names and v is not None}
        extra.pop("need_weights", None)
        if extra or len(args) > 4 or not m.batch_first or m.bias_k is not None or m.add_zero_attn:
            raise ExtractionError(
                f"nn.MultiheadAttention {name!r}: only batch_first=True self- or cross-attention without masks, "
                "bias_k or zero attention maps to units (the attention rule)"
            )
        e = m.embed_dim

        def attr(target: str) -> Any:
            return self.create_proxy("get_attr", f"{name}.{target}", (), {})

        out = []
        for i, (part, x) in enumerate(zip("qkv", qkv)):
            if m._qkv_same_embed_dim:
                w = attr("in_proj_weight")[i * e : (i + 1) * e]
            else:
                w = attr(f"{part}_proj_weight")
            b = attr("in_proj_bias")[i * e : (i + 1) * e] if m.in_proj_bias is not None else None
            y = self.create_proxy("call_function", F.linear, (x, w, b), {})
            y.node.meta["connectome_name"] = f"{name}.{part}"
            y.node.meta["connectome_heads"] = m.num_heads
            out.append(y)
        a = self.create_proxy("call_function", attend, tuple(out), {"heads": m.num_heads})
        a.node.meta["connectome_name"] = f"{name}.attention"
        ob = attr("out_proj.bias") if m.out_proj.bias is not None else None
        o = self.create_proxy("call_function", F.linear, (a, attr("out_proj.weight"), ob), {})
        o.node.meta["connectome_name"] = f"{name}.out_proj"
        return o, None


class _ConcreteTracer(ConcreteValues, _Tracer):
    """:class:`_Tracer` running the example input along (:class:`ConcreteValues`)."""


def _message(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# Tensor factories: given a size read off a traced tensor (``torch.ones(x.shape[0], n)``), they
# see no tensor among their arguments, so fx never hears of the call and torch refuses the proxy
# as a size. While tracing, such a call becomes a node (its size then follows the batch).
_FACTORIES = ("ones", "zeros", "empty", "full", "arange", "rand", "randn", "eye", "linspace")
# the same for methods of a tensor that is not traced (a buffer) given a traced size:
# ``self.rel_pos.expand(x.shape[0], -1, -1)``
_SIZE_METHODS = ("expand", "repeat", "view", "reshape", "tile", "new_zeros", "new_ones", "new_empty", "new_full")


@contextlib.contextmanager
def factory_calls(tracer: fx.Tracer) -> Iterator[None]:
    """Calls of torch's tensor factories with a traced size become call nodes while tracing."""
    saved = {name: getattr(torch, name) for name in _FACTORIES}
    # (defined on the C base class: set on torch.Tensor while tracing, deleted again after)
    methods = {name: torch.Tensor.__dict__.get(name) for name in _SIZE_METHODS}

    def traced(kind: str, target: Any, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
                return tracer.create_proxy(kind, target, args, kwargs)
            return fn(*args, **kwargs)
        return call

    try:
        for name, fn in saved.items():
            setattr(torch, name, traced("call_function", fn, fn))
        for name in methods:  # (a method's args start with the tensor: call_method's too)
            setattr(torch.Tensor, name, traced("call_method", name, getattr(torch.Tensor, name)))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        for name, fn in methods.items():
            if fn is not None:
                setattr(torch.Tensor, name, fn)
            elif name in torch.Tensor.__dict__:
                delattr(torch.Tensor, name)


def _module(tracer: fx.Tracer, graph: fx.Graph, model: nn.Module) -> fx.GraphModule:
    for n in graph.nodes:
        if n.meta.pop("connectome_expanded", False):
            n.meta.pop("is_wrapped", None)
    rewritten = normalise(graph, dict(tracer.root.named_modules()))
    root, aliases = alias_targets(graph, tracer.root)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    gm.meta["connectome_aliases"] = aliases
    gm.meta["connectome_rewritten"] = rewritten
    return gm


def _concrete(model: nn.Module, example: torch.Tensor, symbolic_error: str) -> fx.GraphModule:
    tracer = _ConcreteTracer(example)
    root = traced_root(model)
    try:
        # users' autograd functions, and factories given traced sizes: one call each
        with kept_attributes(root), ops.leaf_functions(tracer), factory_calls(tracer):
            graph = tracer.trace(root)
    except ExtractionError as exc:  # a branch on the data: say which model
        raise ExtractionError(f"cannot trace {type(model).__name__} with the example's values: {exc}") from None
    except Exception as exc:
        raise ExtractionError(
            f"torch.fx cannot trace {type(model).__name__}: {symbolic_error}; traced with the example's values, "
            f"it failed too: {_message(exc)}"
        ) from None
    finally:
        tracer.values.clear()  # the example's intermediate tensors
    gm = _module(tracer, graph, model)
    with torch.no_grad():
        want = logits_of(model(example))
        got = gm(example)
    if not _same(want, got):
        raise ExtractionError(
            f"the graph traced from {type(model).__name__} with the example's values does not give the model's "
            "output on that example; its forward has effects or branches the trace cannot see"
        )
    return gm


def _same(a: Any, b: Any) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else type(x) is type(y)
        for x, y in zip(la, lb))


def trace_graph(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """The fx graph of ``model``: symbolic, else (given ``example``) traced with its values.

    A graph traced with values holds the branches of the example's shape; when a batch of
    another size traces to other code, the graph keeps the means to trace each input shape
    it meets (:func:`graph_for`, which :func:`~connectome.extract.trace.run_nodes` calls).
    """
    check_model(model)  # hooks included
    tracer = _Tracer()
    root = traced_root(model)
    try:
        # users' autograd functions, and factories given traced sizes: one call each
        with kept_attributes(root), ops.leaf_functions(tracer), factory_calls(tracer):
            graph = tracer.trace(root)
    except ExtractionError:
        raise  # our own, from a module written out while tracing (attention)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, RuntimeError ...)
        if example is None:
            raise ExtractionError(
                f"torch.fx cannot trace {type(model).__name__}: {_message(exc)}. Make forward free of "
                "data-dependent Python control flow (if/for on tensor values), or wrap the untraceable "
                "part in a module and register it with torch.fx.wrap"
            ) from None
        return _batch_checked(model, example, _message(exc))
    gm = _module(tracer, graph, model)
    if gm.meta["connectome_rewritten"] and example is not None:
        with torch.no_grad():  # in-place ops rewritten out of place: the forward must not change
            same = _same(logits_of(model(example)), gm(example))
        if not same:
            raise ExtractionError(
                f"{type(model).__name__} changes a tensor in place that another tensor shares; run out of place, "
                "its graph does not give the model's output. Write the op out of place (y = f(x)) and read y"
            )
    return gm


def _batch_checked(model: nn.Module, example: torch.Tensor, symbolic_error: str) -> fx.GraphModule:
    """The concrete graph of ``example``, and whether it serves every batch size: traced again on
    one more image, the same code proves it; else each input shape gets its own trace."""
    gm = _concrete(model, example, symbolic_error)
    more = torch.cat([example, example[:1]]) if example.dim() >= 1 and example.shape[0] >= 1 else example
    if more is not example and _concrete(model, more, symbolic_error).code == gm.code:
        return gm
    gm.meta["connectome_retrace"] = lambda x: _concrete(model, x, symbolic_error)
    gm.meta["connectome_graphs"] = {tuple(example.shape): gm}
    return gm


def graph_for(gm: fx.GraphModule, x: Any) -> fx.GraphModule:
    """The graph to run on input ``x``: ``gm`` itself, or, when ``gm`` holds the branches of the
    example's shape only, ``gm`` traced again on ``x``'s shape (once per shape), with the same nodes.

    Raises
    ------
    ExtractionError
        The model takes other ops for this input shape (a different graph, not only other sizes).
    """
    retrace = gm.meta.get("connectome_retrace")
    if retrace is None or not isinstance(x, torch.Tensor):
        return gm
    graphs = gm.meta["connectome_graphs"]
    key = tuple(x.shape)
    if key not in graphs:
        with torch.no_grad():
            other = retrace(x.detach())
        if _skeleton(other) != _skeleton(gm):
            raise ExtractionError(
                f"{gm.__class__.__name__} runs other ops on an input of shape {key} than on the example of shape "
                f"{next(iter(graphs))}: its Python branches on the batch size; use batches of one size "
                "(drop_last=True) or make forward's branches independent of the batch size"
            )
        graphs[key] = other
    return graphs[key]


def _skeleton(gm: fx.GraphModule) -> list[tuple[str, str, str]]:
    return [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]
