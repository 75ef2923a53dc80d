"""torch.fx tracing that runs the example input along: the fallback for Python that reads shapes.

Symbolic fx cannot run ``if H != 8``, ``len(x)``, ``for i in range(x.shape[1] // 4)`` or
"same" padding computed from the input size: a proxy has no value to branch on. Here each
recorded op is also run on the real tensors of one example input (leaf modules included), so
``bool()``, ``int()``, ``len()``, iteration and ``.keys()`` of a proxy answer with the
example's value, and the branch taken is baked into the graph. Everything else stays a graph
node: ``x.view(x.shape[0], -1)`` reads the batch size when the graph runs, not the example's.

A graph made this way holds the branches of the example's input *shape*; values computed
from the input's *contents* are refused as soon as Python looks at them (the graph would
hold one image's branch, silently wrong for the next image).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from connectome.errors import ExtractionError

__all__ = ["ConcreteValues", "logits_of"]

# a tensor's attributes that no batch size changes: read off the example, not recorded
_BAKED_ATTRS = frozenset({"device", "dtype", "layout", "is_cuda", "is_sparse", "is_quantized", "is_meta", "ndim"})
# attributes and methods whose result describes a tensor's shape, never its contents
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse",
                          "is_quantized", "is_meta", "is_nested"})
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "get_device",
                            "is_floating_point", "is_complex", "is_contiguous", "element_size"})
_SHAPE_FUNCTIONS = (torch.numel, torch.is_tensor, torch.is_floating_point, torch.is_complex)


def logits_of(out: Any) -> Any:
    """The logits of a forward's output: ``out.logits`` of a ``ModelOutput`` or dataclass (Hugging
    Face; one without logits: its set fields, the first of them taken), else ``out`` itself (a
    tensor, or a tuple whose first element the caller takes)."""
    if isinstance(out, (torch.Tensor, fx.Proxy, tuple, list)) or out is None:
        return out
    logits = getattr(out, "logits", None)
    if logits is None and callable(getattr(out, "to_tuple", None)):
        # a ModelOutput without logits (PP-LCNet's classifier names them last_hidden_state): its
        # fields that are set, as a tuple whose first element is taken
        fields = out.to_tuple()
        return fields[0] if len(fields) == 1 else fields
    return out if logits is None else logits


class _Concrete:
    """What a proxy answers with the example's value: ``len``, ``int``, ``float``, ``index``."""

    tracer: Any

    def __getattr__(self, k: str) -> Any:
        if k in _BAKED_ATTRS:  # torch.autocast(x.device.type) and the like want the value itself
            return getattr(self.tracer.value(self.node), k)  # type: ignore[attr-defined]
        if k.startswith("__") and k.endswith("__"):
            # a protocol probe (NumPy's __array_function__ on np.prod(x.shape[1:])): not an
            # attribute of the value, so NumPy converts the proxy with __array__ instead
            raise AttributeError(k)
        node = self.__dict__.get("node")  # (an attribute of an attribute has no node yet: none made here)
        if node in self.tracer.values and not hasattr(self.tracer.values[node], k):
            # (numpy's np.prod(size) asks the size for .prod first, then converts it)
            raise AttributeError(f"{type(self.tracer.values[node]).__name__!r} value of {node.name!r} has no {k!r}")
        return _Attribute(self, k)  # type: ignore[arg-type]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # np.prod(x.shape[1:-1]) (Perceiver): the value of a shape, never of the data
        return np.asarray(self.tracer.concrete(self, lambda v: v, "a NumPy conversion"), dtype=dtype)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        return self.tracer.concrete(self, len, "len()")

    def __int__(self) -> int:
        return self.tracer.concrete(self, int, "int()")

    def __index__(self) -> int:
        return self.tracer.concrete(self, lambda v: v.__index__(), "an index")

    def __float__(self) -> float:
        return self.tracer.concrete(self, float, "float()")


class _Proxy(_Concrete, fx.Proxy):
    pass


class _Attribute(_Concrete, fx.proxy.Attribute):
    pass


class ConcreteValues:
    """Mixin for an :class:`torch.fx.Tracer`: each node also gets its value on ``example``.

    ``trace(root)`` records ``root.forward(example)``; the graph's output is the logits
    (:func:`logits_of`). Values live in ``self.values`` (node -> value) during the trace.
    """

    def __init__(self, example: torch.Tensor, **kw: Any) -> None:
        super().__init__(**kw)
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.data: set[fx.Node] = set()  # nodes whose value depends on the input's contents
        self._running = 0  # > 0 while a leaf module runs on real tensors

    # ------------------------------------------------------------------ values
    def value(self, node: fx.Node) -> Any:
        if node not in self.values:
            if node.op != "get_attr":
                raise ExtractionError(f"tracing lost the value of fx node {node.name!r} ({node.op} {node.target})")
            v: Any = self.root
            self._running += 1  # nn.Module.__getattr__ is fx's while tracing: read the tensor itself
            try:
                for part in str(node.target).split("."):
                    v = getattr(v, part)
            finally:
                self._running -= 1
            self.values[node] = v
        return self.values[node]

    def _compute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.example.detach().clone()  # the op list may write into its input
        if node.op == "get_attr":
            return self.value(node)
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        self._running += 1
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(str(node.target))(*args, **kwargs)
        finally:
            self._running -= 1
        raise ExtractionError(f"cannot run fx node {node.name!r} of kind {node.op}")

    def _is_data(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return True
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS:
            return False
        if node.op == "call_method" and node.target in _SHAPE_METHODS or \
                node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
            return False
        return any(a in self.data for a in node.all_input_nodes)

    def concrete(self, proxy: fx.Proxy, fn: Callable[[Any], Any], what: str) -> Any:
        """``fn`` of the proxy's value, which Python branches on; refused for input contents."""
        node = proxy.node
        value = self.value(node)
        if node in self.data and fn is not len:
            stack = node.meta.get("nn_module_stack") or {}
            last = list(stack.values())[-1] if stack else ""
            scope = last[0] if isinstance(last, tuple) else str(last)
            where = f"fx node {node.name!r}" + (f" in module {scope!r}" if scope else "")
            raise ExtractionError(
                f"forward takes {what} of a value computed from the input's contents ({where}): its Python "
                "branches on the data, so one traced graph cannot hold every image's path. Compute it with "
                "tensor ops (torch.where) or move it into a module registered with torch.fx.wrap"
            )
        return fn(value)

    # ------------------------------------------------------------------ tracer hooks
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        p = super().create_proxy(kind, target, args, kwargs, *a, **kw)  # type: ignore[misc]
        node = p.node
        if node not in self.values:
            self.values[node] = self._compute(node)
            if self._is_data(node):
                self.data.add(node)
        return p

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concrete(obj, bool, "bool()")

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.value(obj.node)
        if isinstance(value, dict):
            return iter(value.keys())
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.concrete(obj, lambda v: v.keys(), ".keys()")

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, np.generic):  # np.prod of a shape gives a NumPy integer
            return a.item()
        return super().create_arg(a)  # type: ignore[misc]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._running:
            return attr_val  # a leaf module reading its own weight while it runs on real tensors
        return super().getattr(attr, attr_val, parameter_proxy_cache)  # type: ignore[misc]

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._running:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)  # type: ignore[misc]

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        # one input, passed positionally (Hugging Face's pixel_values); every other argument keeps
        # its default, as in model(x)
        params = list(inspect.signature(root_fn).parameters.values())[1:]
        first = params[0] if params else None
        name = first.name if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD) \
            else "x"
        x = self.create_proxy("placeholder", name, (), {})

        def call(root: nn.Module) -> Any:
            return logits_of(root_fn(root, x))

        return call, [self.root]
