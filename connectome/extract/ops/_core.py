"""The op registry's core: what an entry declares, and the lookups by module, function and method.

Each :class:`Op` says, for one op of the vocabulary, everything the rest of extraction needs:

- its **matchers**: module types (a module matches the most specific registered type of its
  class), functions (``F.relu``, ``torch.relu``; functions of optional packages by their
  ``module.qualname``, so that nothing imports them) and tensor method names (``"relu"``);
- its **rule**: a key of :data:`connectome.extract.rules.RULES` (``"smooth"``, ``"norm"``,
  ``"clamp"`` ...), :data:`NONE` (exact as it is: piecewise linear or linear with no constant),
  :data:`LAYOUT` (it moves or selects units, followed on a tensor of unit numbers) or
  :data:`CONSTRUCT` (tracing maps it with code of its own, named by ``construct``: a residual
  sum, a product, a concatenation);
- ``params(call)``: the rule's parameters read off one call (its :class:`ChainOp` params), None
  when the call needs no rule; it raises :class:`Unsupported` for a call no rule fits;
- its **receptive-field behaviour** (:class:`Receptive`) and ``geometry(call)``, the numbers
  that behaviour needs (kernel, stride, padding and dilation of a window, the padding of a pad,
  the dims a normalisation reads, the permutation of a permute);
- its **in-place forms**: ``inplace_arg``, the position of an ``inplace`` flag of its
  functions, and ``inplace_variants``, pairs (in-place function, out-of-place function). Tensor
  methods ending in ``_`` are in-place by Python convention and need no entry.

Family modules (``piecewise``, ``smooth``, ``norm``, ``pool``, ``layout``, ``arith``) import only
this module; they register their entries when :mod:`connectome.extract.ops` is imported. Users
add their own with :func:`register_op`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from connectome.errors import ExtractionError

__all__ = ["Op", "Call", "Receptive", "Unsupported", "NONE", "LAYOUT", "CONSTRUCT", "add", "register_op",
           "unregister_op", "entries", "op_for_module", "op_for_function", "op_for_method", "op_for_node",
           "is_leaf_module", "inplace_position", "out_of_place", "is_inplace_function", "leaf_functions",
           "smooth_params", "elementwise_f0"]

NONE = "none"  # exact as it is: no rule, no constant
LAYOUT = "layout"  # moves or selects units
CONSTRUCT = "construct"  # mapped by tracing's own code (``Op.construct`` names it)


class Receptive(enum.Enum):
    """How an op changes the box of input pixels a value at one position depends on."""

    POINTWISE = "pointwise"  # each position from the same position (keeps the box when the grid is kept)
    WINDOW = "window"  # a sliding window: geometry gives kernel_size, stride, padding, dilation
    PAD = "pad"  # shifts the grid: geometry gives pad (left, right, top, bottom)
    STATS = "stats"  # statistics over geometry's dims (a norm): pointwise unless they include positions
    GLOBAL = "global"  # every position depends on the whole image
    PERMUTE = "permute"  # geometry gives dims
    TRANSPOSE = "transpose"  # geometry gives dims (d0, d1)
    RESHAPE = "reshape"  # a view that keeps the two spatial axes last keeps the box
    SPLIT = "split"  # chunk, split, getitem: the box unless a spatial axis is cut
    CONCAT = "concat"  # geometry gives dim: the union of the operands along a non-spatial dim


class Unsupported(Exception):
    """Raised by ``Op.params`` for a call no rule fits; the message says why (tracing names the op)."""


@dataclass(frozen=True)
class Call:
    """One call of an op, as the registry's ``params`` and ``geometry`` functions read it.

    ``node`` is the fx node (its ``args``, ``kwargs``, ``op`` and ``target``), ``module`` the
    called module (None for functions and methods). ``const_of(arg)`` gives the constant tensor
    an argument holds (a parameter or buffer) or None, ``value_of(arg)`` the plain value it
    holds (a number, a tuple of sizes), ``is_data(arg)`` whether it is computed from the input,
    ``shape_of(arg)`` the shape of a tensor argument.
    """

    node: Any
    module: nn.Module | None = None
    const_of: Callable[[Any], torch.Tensor | None] = lambda a: None
    value_of: Callable[[Any], Any] = lambda a: a
    is_data: Callable[[Any], bool] = lambda a: False
    shape_of: Callable[[Any], tuple[int, ...] | None] = lambda a: None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (positional, counting the input as 0 for functions and methods) or ``name``."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def plain(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` or ``name`` as a plain value (an fx node of a size read as its value)."""
        a = self.arg(i, name, default)
        # also inside tuples and lists: "same" padding computed from the input's size (a value tracer's graph)
        return fx.node.map_arg(a, self.value_of)

    def elementwise(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The call as an element-wise function of its input, its other arguments kept."""
        node, m = self.node, self.module
        if node.op == "call_module":
            return m
        extra = [a for a in node.args[1:] if not isinstance(a, fx.Node)]
        kw = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node) and k != "inplace"}
        if node.op == "call_method":
            name = node.target[:-1] if node.target.endswith("_") else node.target
            return lambda z: getattr(z, name)(*extra, **kw)
        t = out_of_place(node.target)
        return lambda z: t(z, *extra, **kw)


@dataclass(frozen=True)
class Op:
    """One entry of the op registry (see the module docstring for each field)."""

    name: str
    rule: str
    receptive: Receptive
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    function_names: tuple[str, ...] = ()  # "module.qualname" of functions of optional packages
    methods: tuple[str, ...] = ()
    params: Callable[[Call], Any] | None = None
    geometry: Callable[[Call], dict[str, Any]] | None = None
    inplace_arg: int | None = None
    inplace_variants: tuple[tuple[Any, Any], ...] = ()
    pooled: int = 0  # trailing dims a pool or a pad works over (they must not hold the units)
    multi_output: bool = False  # a layout op that may give a tuple of tensors
    reduces: bool = False  # a layout op that averages or sums over the dims of argument 1 (``mean``, ``sum``)
    resizes: bool = False  # works over every dim after (batch, channels) and ends its layer's chain (a resize)
    construct: str = ""  # for CONSTRUCT: which of tracing's constructs maps it
    family: str = ""  # the module that registered it
    leaf: bool = False  # a module traced as one call (users' modules), not through its forward
    #: zero-argument factories of calls of the op on a (batch, 4, 8, 8) tensor (an ``nn.Module``
    #: or a function) giving a 4-d tensor: the registry's test runs each through tracing,
    #: flows and receptive fields
    examples: tuple[Callable[[], Any], ...] = ()


_ENTRIES: dict[str, Op] = {}
_MODULES: dict[type, Op] = {}
_FUNCTIONS: dict[Any, Op] = {}
_NAMES: dict[str, Op] = {}
_METHODS: dict[str, Op] = {}
_AUTOGRAD: dict[str, tuple[type, Any]] = {}  # entry name -> (autograd.Function class, its call function)


def add(op: Op) -> Op:
    """Add an entry of the package's own vocabulary (family modules); refuses a matcher taken twice.

    ``family`` defaults to the name of the calling module.
    """
    if not op.family:
        op = dataclasses.replace(op, family=sys._getframe(1).f_globals.get("__name__", ""))
    if op.name in _ENTRIES:
        raise ExtractionError(f"an op named {op.name!r} is registered already; unregister_op({op.name!r}) first")
    taken = ([m for m in op.modules if m in _MODULES] + [f for f in op.functions if f in _FUNCTIONS]
             + [n for n in op.function_names if n in _NAMES] + [m for m in op.methods if m in _METHODS])
    if taken:
        what = getattr(taken[0], "__qualname__", taken[0])
        owner = (_MODULES.get(taken[0]) or _FUNCTIONS.get(taken[0]) or _NAMES.get(taken[0])
                 or _METHODS.get(taken[0]))
        raise ExtractionError(f"{what!s} is registered already as op {owner.name!r}; unregister_op({owner.name!r}) "
                              "first to replace it")
    _ENTRIES[op.name] = op
    _MODULES.update({m: op for m in op.modules})
    _FUNCTIONS.update({f: op for f in op.functions})
    _FUNCTIONS.update({f: op for f, _ in op.inplace_variants})
    _NAMES.update({n: op for n in op.function_names})
    _METHODS.update({m: op for m in op.methods})
    return op


def entries() -> tuple[Op, ...]:
    """Every registered entry, in registration order."""
    return tuple(_ENTRIES.values())


def op_for_module(m: nn.Module) -> Op | None:
    """The entry of the most specific registered type among ``m``'s classes, or None."""
    for cls in type(m).__mro__:
        op = _MODULES.get(cls)
        if op is not None:
            return op
    return None


def op_for_function(f: Any) -> Op | None:
    """The entry of a function (or an in-place variant of one), or None."""
    try:
        op = _FUNCTIONS.get(f)
    except TypeError:  # unhashable target
        return None
    if op is None and _NAMES:
        op = _NAMES.get(f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', '')}")
    return op


def op_for_method(name: str) -> Op | None:
    """The entry of a tensor method name (in-place ``relu_`` included when registered), or None."""
    return _METHODS.get(name)


def op_for_node(node: Any, modules: dict[str, nn.Module]) -> Op | None:
    """The entry of an fx node's op (by its module, function or method), or None."""
    if node.op == "call_module":
        return op_for_module(modules[node.target])
    if node.op == "call_function":
        return op_for_function(node.target)
    if node.op == "call_method":
        return op_for_method(node.target)
    return None


def is_leaf_module(m: nn.Module) -> bool:
    """Whether tracing keeps ``m`` as one call: a registered users' module that runs the
    forward of the registered type."""
    for cls in type(m).__mro__:
        op = _MODULES.get(cls)
        if op is not None:
            return op.leaf and type(m).forward is cls.forward
    return False


def inplace_position(f: Any) -> int | None:
    """The position of the ``inplace`` flag of function ``f``, or None."""
    op = op_for_function(f)
    return op.inplace_arg if op is not None and f in op.functions else None


def is_inplace_function(f: Any) -> bool:
    """Whether ``f`` is a registered in-place variant (``F.relu_``, ``operator.iadd``)."""
    op = op_for_function(f)
    return op is not None and any(f is a for a, _ in op.inplace_variants)


def out_of_place(f: Any) -> Any:
    """The out-of-place function of a registered in-place variant; ``f`` itself otherwise."""
    op = op_for_function(f)
    if op is not None:
        for a, b in op.inplace_variants:
            if f is a:
                return b
    return f


@contextlib.contextmanager
def leaf_functions(tracer: fx.Tracer) -> Iterator[None]:
    """While tracing, calls of registered ``autograd.Function`` classes become one call node each
    (of the function :func:`register_op` made for the class), rather than being traced into: a
    custom forward often cannot run on proxies (``ctx.save_for_backward``)."""
    saved = []
    try:
        for cls, call in list(_AUTOGRAD.values()):
            def traced(*args: Any, _call: Any = call, **kwargs: Any) -> Any:
                if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                    return tracer.create_proxy("call_function", _call, args, kwargs)
                return _call(*args, **kwargs)

            saved.append((cls, cls.__dict__.get("apply", None)))
            cls.apply = staticmethod(traced)
        yield
    finally:
        for cls, before in reversed(saved):
            if before is None:
                del cls.apply
            else:
                cls.apply = before


def _autograd_call(cls: type) -> Callable[..., Any]:
    """A plain function that runs ``cls.apply``: the call node's target (fx writes a bound
    classmethod of a Function as ``torch.autograd.function.Function.apply``)."""
    apply = cls.apply

    def call(*args: Any, **kwargs: Any) -> Any:
        return apply(*args, **kwargs)

    call.__module__, call.__name__, call.__qualname__ = cls.__module__, "apply", f"{cls.__qualname__}.apply"
    return call


# ----------------------------------------------------------------------------- helpers for entries
def elementwise_f0(call: Call) -> float:
    """f(0) of an element-wise call: the constant that the identity rule makes a bias term."""
    fn = call.elementwise()
    p = next(call.module.parameters(), None) if call.module is not None else None
    dtype = p.dtype if p is not None else torch.float64
    with torch.no_grad():
        try:
            z = fn(torch.zeros(1, dtype=dtype))
        except Exception:  # a users' module that needs its input's shape
            shape = call.shape_of(call.node.args[0]) if call.node.args else None
            if shape is None:
                raise
            z = fn(torch.zeros((1, *shape[1:]), dtype=dtype))
    return float(z.reshape(-1)[0])


def smooth_params(call: Call) -> tuple[float]:
    """Parameters of the identity rule: ``(f(0),)``."""
    f0 = elementwise_f0(call)
    if f0 != f0 or f0 in (float("inf"), float("-inf")):
        raise Unsupported(f"the element-wise function is {f0} at 0; the identity rule needs a finite f(0)")
    return (f0,)


# ----------------------------------------------------------------------------- users' ops
_USER_RULES = ("none", "smooth", "gate", "norm", "affine", "layout")


def _gate_params(call: Call) -> tuple[str, tuple[str]]:
    data = [a for a in (*call.node.args, *call.node.kwargs.values()) if call.is_data(a)]
    if len(data) != 2:
        raise Unsupported(f"a gate takes two data tensors (the signal first, then the gate); this call has {len(data)}")
    return data[0].name, (data[1].name,)


def _affine_params(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    # y = a * x + b element-wise: b = f(0) and a = f(1) - f(0) on one image, checked on a random one
    m = call.module
    shape = call.shape_of(call.node.args[0])
    p = next(m.parameters(), None)
    dtype = p.dtype if p is not None else torch.float64
    one = (1, *shape[1:])
    with torch.no_grad():
        b = m(torch.zeros(one, dtype=dtype))
        a = m(torch.ones(one, dtype=dtype)) - b
        x = torch.randn(one, dtype=dtype, generator=torch.Generator().manual_seed(0))
        if m(x).shape != x.shape or not torch.allclose(m(x), a * x + b, rtol=1e-5, atol=1e-6):
            raise Unsupported(f"{type(m).__name__} is registered as affine but is not y = a * x + b element-wise")
    return a, b


def _norm_params(kind: str) -> Callable[[Call], tuple[Any, ...]]:
    def params(call: Call) -> tuple[Any, ...]:
        m = call.module
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        w = w.detach() if isinstance(w, torch.Tensor) else None
        b = b.detach() if isinstance(b, torch.Tensor) else None
        eps = getattr(m, "eps", None)
        if kind == "group":
            return ("group", int(m.num_groups), w, float(eps), b)
        shape = getattr(m, "normalized_shape", None)
        if shape is None:
            shape = tuple(w.shape) if w is not None else (call.shape_of(call.node.args[0])[-1],)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return (kind, shape, w, None if eps is None else float(eps), b)

    return params


def register_op(target: Any, rule: str = "smooth", *, name: str | None = None, norm: str = "layer",
                receptive: str | None = None) -> Op:
    """Register a users' module type or ``torch.autograd.Function`` as an op with a rule.

    Tracing then keeps every call of it as one op (it is not traced into) and maps it with the
    rule, receptive fields follow it, and the accumulator linearises it; nothing in the
    package needs editing.

    Parameters
    ----------
    target : type
        An ``nn.Module`` subclass, a ``torch.autograd.Function`` subclass, or its ``apply``.
    rule : {"smooth", "none", "gate", "norm", "affine", "layout"}, default "smooth"
        ``"smooth"``: element-wise, the identity rule (``f(x) = f(0) + x * r(x)``, ``r`` held
        constant); ``"none"``: element-wise and exact as it is (piecewise linear through 0);
        ``"gate"``: ``f(x, s)`` linear in the signal ``x`` (first) times a data-dependent gate
        ``s`` held constant; ``"norm"``: a normalisation with ``weight``, ``bias`` and ``eps``
        attributes (statistics held constant; see ``norm``); ``"affine"``: ``a * x + b``
        element-wise with constant ``a``, ``b``; ``"layout"``: moves or selects units.
    name : str, optional
        The entry's name (default: the target's qualified name).
    norm : {"layer", "rms", "group"}, default "layer"
        For ``rule="norm"``: statistics over ``normalized_shape`` (the last dim when absent),
        root mean square over it, or over ``num_groups`` groups of channels.
    receptive : {"pointwise", "global"}, optional
        Receptive-field behaviour; default pointwise, global for layout and norm ops.

    Returns
    -------
    Op
        The entry (pass its name to :func:`unregister_op` to remove it).

    Raises
    ------
    ExtractionError
        ``target`` is neither a module type nor an autograd function, the rule is not one of
        the above, or the target is registered already.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> class Swish(nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(x)
    >>> op = register_op(Swish, rule="smooth")
    >>> unregister_op(op.name)
    """
    what = getattr(target, "__qualname__", repr(target))
    if rule not in _USER_RULES:
        raise ExtractionError(f"register_op({what}, rule={rule!r}): the rule must be one of {', '.join(_USER_RULES)}")
    if norm not in ("layer", "rms", "group"):
        raise ExtractionError(f"register_op({what}, norm={norm!r}): norm must be 'layer', 'rms' or 'group'")
    fn_cls = getattr(target, "__self__", None) if callable(target) and not isinstance(target, type) else None
    if isinstance(fn_cls, type) and issubclass(fn_cls, torch.autograd.Function):
        target = fn_cls
    is_module = isinstance(target, type) and issubclass(target, nn.Module)
    is_function = isinstance(target, type) and issubclass(target, torch.autograd.Function)
    if not (is_module or is_function):
        raise ExtractionError(
            f"register_op({what}): expected an nn.Module subclass or a torch.autograd.Function subclass (or its "
            "apply); wrap a plain function in a module to register it"
        )
    if is_function and any(cls is target for cls, _ in _AUTOGRAD.values()):
        raise ExtractionError(f"register_op({what}): registered already; unregister_op it first to replace it")
    if is_function and rule in ("norm", "affine"):
        raise ExtractionError(f"register_op({what}, rule={rule!r}): {rule} ops read module attributes; register "
                              "the module that calls the function instead")
    if receptive not in (None, "pointwise", "global"):
        raise ExtractionError(f"register_op({what}, receptive={receptive!r}): 'pointwise' or 'global'")
    params = {"smooth": smooth_params, "gate": _gate_params, "norm": _norm_params(norm), "affine": _affine_params,
              "none": None, "layout": None}[rule]
    rkey = {"none": NONE, "layout": LAYOUT}.get(rule, rule)
    if receptive is None:
        receptive = "global" if rule in ("layout", "norm") else "pointwise"
    call = _autograd_call(target) if is_function else None
    op = Op(
        name=name or f"{target.__module__}.{target.__qualname__}", rule=rkey, receptive=Receptive(receptive),
        modules=(target,) if is_module else (), functions=(call,) if is_function else (), params=params,
        family="user", leaf=is_module,
    )
    add(op)
    if is_function:
        _AUTOGRAD[op.name] = (target, call)
    return op


def unregister_op(name: str) -> Op:
    """Remove the entry ``name`` (from :func:`register_op`, or a package entry to replace it).

    Raises
    ------
    ExtractionError
        No entry has that name.
    """
    op = _ENTRIES.pop(name, None)
    if op is None:
        raise ExtractionError(f"no op named {name!r} is registered (registered: {len(_ENTRIES)} ops)")
    for table in (_MODULES, _FUNCTIONS, _NAMES, _METHODS):
        for k in [k for k, v in table.items() if v is op]:
            del table[k]
    _AUTOGRAD.pop(name, None)
    return op
