"""torch.fx tracing of a model, with ``nn.MultiheadAttention`` written out as its parts."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.errors import ExtractionError
from connectome.extract._model import check_model
from connectome.extract import dense, ops, windows
from connectome.extract.attention import attend
from connectome.extract.fx_root import alias_targets, traced_root

__all__ = ["trace_graph"]


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

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(m, nn.MultiheadAttention):
            return self._attention(m, self.path_of_module(m), args, kwargs)
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


def trace_graph(model: nn.Module) -> fx.GraphModule:
    check_model(model)  # hooks included
    tracer = _Tracer()
    try:
        with ops.leaf_functions(tracer):  # users' autograd functions: one call each
            graph = tracer.trace(traced_root(model))
    except ExtractionError:
        raise  # our own, from a module written out while tracing (attention)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, RuntimeError ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractionError(
            f"torch.fx cannot trace {type(model).__name__}: {msg}. Make forward free of "
            "data-dependent Python control flow (if/for on tensor values), or wrap the untraceable "
            "part in a module and register it with torch.fx.wrap"
        ) from None
    for n in graph.nodes:
        if n.meta.pop("connectome_expanded", False):
            n.meta.pop("is_wrapped", None)
    root, aliases = alias_targets(graph, tracer.root)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    gm.meta["connectome_aliases"] = aliases
    return gm
