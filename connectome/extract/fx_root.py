"""The module tree that torch.fx traces, made from the caller's model without changing it.

- **Hooks.** The traced graph runs each module's ``forward`` only: a forward or forward
  pre-hook the user registered (on a module or globally) would be left out of the graph's
  values, and a backward hook would be skipped or change the gradients the flows are made
  of. Such a model is refused with one :class:`~connectome.errors.ExtractionError` naming
  each hook, its kind and its module (:func:`check_hooks`).
- **Reparametrised weights.** The pre-hooks of the weight reparametrisations torch ships
  (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) set ``module.weight`` from
  other tensors before each call (``weight_orig * weight_mask`` for pruning). They are
  honoured exactly: fx traces a shallow copy of the modules on the way to each such module,
  in which the weight is the tensor the hook computes, a plain parameter, as
  ``prune.remove`` would leave it (:func:`traced_root`). The caller's modules are not
  touched; the copies share every other tensor.
- **What forward stores on its modules.** Tracing runs the model's Python on proxies: a
  module that keeps what it computed (Swin's window size, LeViT's attention-bias cache) would
  keep a proxy; every module attribute, and the dicts and lists held there, is put back after
  the trace (:func:`kept_attributes`).
- **Names fx cannot write into code.** A module named after a Python keyword (``class``)
  or holding a quote, backslash or line break makes fx's generated code a SyntaxError:
  those graph targets are renamed to aliases (:func:`alias_targets`) and the real module
  path is kept for the layer names (:func:`real_target`).
"""

from __future__ import annotations

import contextlib
import copy
import keyword
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from connectome.errors import ExtractionError

__all__ = ["check_hooks", "traced_root", "kept_attributes", "alias_targets", "real_target"]

_GLOBAL_HOOKS = (("_global_forward_pre_hooks", "forward pre-hook"), ("_global_forward_hooks", "forward hook"),
                 ("_global_backward_pre_hooks", "backward pre-hook"), ("_global_backward_hooks", "backward hook"))
_MODULE_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
                 ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_SHOWN = 6  # hooks named in the message


def _reparametrisation(hook: Any) -> tuple[str, Callable[[nn.Module], torch.Tensor], tuple[str, ...]] | None:
    """A pre-hook of a weight reparametrisation torch ships: (tensor name, how the hook computes it,
    the parameters and buffers it is computed from); None for any other hook."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if isinstance(hook, BasePruningMethod) and isinstance(getattr(hook, "_tensor_name", None), str):
        n = hook._tensor_name
        return n, hook.apply_mask, (f"{n}_orig", f"{n}_mask")
    if isinstance(hook, WeightNorm):
        return hook.name, hook.compute_weight, (f"{hook.name}_g", f"{hook.name}_v")
    if isinstance(hook, SpectralNorm):  # extraction runs in eval mode: no power iteration
        return hook.name, lambda m: hook.compute_weight(m, do_power_iteration=False), \
            (f"{hook.name}_orig", f"{hook.name}_u", f"{hook.name}_v")
    return None


def _hook_name(hook: Any) -> str:
    return str(getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or type(hook).__name__)


def check_hooks(model: nn.Module) -> None:
    """Refuse a model whose modules (or torch globally) have hooks the traced graph would not run.

    Raises
    ------
    ExtractionError
        Naming each hook (function name), its kind and its module, and the fix.
    """
    import torch.nn.modules.module as tm

    found: list[str] = []
    for attr, kind in _GLOBAL_HOOKS:
        for hook in getattr(tm, attr, {}).values():
            found.append(f"global {kind} {_hook_name(hook)} (registered for every module with "
                         "torch.nn.modules.module.register_module_...)")
    for path, m in model.named_modules(remove_duplicate=True):
        where = f"module {path!r} ({type(m).__name__})" if path else f"the model itself ({type(m).__name__})"
        for attr, kind in _MODULE_HOOKS:
            for hook in getattr(m, attr, {}).values():
                if attr == "_forward_pre_hooks" and _reparametrisation(hook) is not None:
                    continue
                found.append(f"{kind} {_hook_name(hook)} on {where}")
    if not found:
        return
    more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    raise ExtractionError(
        f"the model has hooks that extraction would not run: {'; '.join(found[:_SHOWN])}{more}. The traced graph "
        "runs each module's forward only, so its values and flows would not be the model's; remove the hooks "
        "(handle.remove()), or fold what they do into the weights (for example with model.apply) or into forward, "
        "and extract again"
    )


def _reparametrised(model: nn.Module) -> set[nn.Module]:
    return {m for m in model.modules()
            if any(_reparametrisation(h) is not None for h in m._forward_pre_hooks.values())}


def traced_root(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` for fx to trace (fx stores the tensor constants it meets as
    attributes of the root), and of the modules on the way to each module with a
    reparametrised weight, in which that weight is the plain parameter its hook computes.

    The copy shares every other submodule, parameter and buffer with ``model``; ``model`` is not changed.
    """
    targets = _reparametrised(model)
    memo: dict[int, nn.Module] = {}

    def holds(m: nn.Module) -> bool:
        return m in targets or any(holds(c) for c in m._modules.values() if c is not None)

    def shadow(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if not holds(m):
            return m
        new = copy.copy(m)  # a new __dict__, the same values: give it its own module, parameter, hook dicts
        memo[id(m)] = new
        new._modules = OrderedDict((k, shadow(c) if c is not None else None) for k, c in m._modules.items())
        if m in targets:
            new._parameters = OrderedDict(m._parameters)
            new._buffers = OrderedDict(m._buffers)
            new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
            new._forward_pre_hooks = OrderedDict()
            for hid, hook in m._forward_pre_hooks.items():
                rep = _reparametrisation(hook)
                if rep is None:
                    new._forward_pre_hooks[hid] = hook
                    continue
                name, compute, sources = rep
                with torch.inference_mode(False), torch.no_grad():
                    value = compute(new)  # what the hook sets before each call, from this copy's tensors
                grad = any(p.requires_grad for s in sources if (p := new._parameters.get(s)) is not None)
                for s in sources:
                    new._parameters.pop(s, None)
                    new._buffers.pop(s, None)
                    new.__dict__.pop(s, None)
                new.__dict__.pop(name, None)
                new._parameters[name] = nn.Parameter(value.detach(), requires_grad=grad)
        return new

    root = shadow(model)
    if root is model:  # fx stores the tensor constants it meets as attributes of the root: not on the caller's
        root = copy.copy(model)
    return root


@contextlib.contextmanager
def kept_attributes(root: nn.Module) -> Iterator[None]:
    """Put back every attribute of the modules under ``root`` on leaving (and the items of the
    dicts and lists held there), as they were on entry: what forward stored while being traced.

    ``root`` itself is left alone: it is :func:`traced_root`'s copy, where fx stores the
    tensor constants it meets."""
    saved = [(m, dict(m.__dict__), {k: _shallow(v) for k, v in m.__dict__.items() if isinstance(v, (dict, list))})
             for m in root.modules() if m is not root]
    try:
        yield
    finally:
        for m, attrs, inner in saved:
            for k in set(m.__dict__) - set(attrs):
                del m.__dict__[k]
            for k, v in attrs.items():
                if m.__dict__.get(k) is not v:
                    m.__dict__[k] = v
                if k in inner and _changed(v, inner[k]):
                    v.clear()
                    v.update(inner[k]) if isinstance(v, dict) else v.extend(inner[k])


def _shallow(v: dict[Any, Any] | list[Any]) -> dict[Any, Any] | list[Any]:
    return type(v).copy(v) if isinstance(v, dict) else list(v)


def _changed(v: Any, old: Any) -> bool:
    if isinstance(v, dict):
        return v.keys() != old.keys() or any(v[k] is not old[k] for k in old)
    return len(v) != len(old) or any(a is not b for a, b in zip(v, old))


# ----------------------------------------------------------------------------- names in fx code
def _safe(part: str) -> bool:
    """Whether fx can write ``part`` into its generated code (``self.part`` or ``getattr(self, "part")``)."""
    if part.isidentifier():
        return not keyword.iskeyword(part)
    return not any(c in part for c in "\"'\\") and part.isprintable()


def alias_targets(graph: fx.Graph, root: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """Rename the targets of ``graph`` whose module path fx cannot write into code.

    Returns the module to build the GraphModule from (``root`` itself when nothing was
    renamed, else a holder whose submodules under alias names are ``root``'s modules) and
    ``{alias part: real part}``.
    """
    parts = {p for n in graph.nodes if n.op in ("call_module", "get_attr") for p in str(n.target).split(".")}
    bad = sorted(p for p in parts if not _safe(p))
    if not bad:
        return root, {}
    taken = set(parts)
    alias: dict[str, str] = {}
    for i, p in enumerate(bad):
        a = f"connectome_alias_{i}"
        while a in taken:
            a += "_"
        taken.add(a)
        alias[p] = a
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            n.target = ".".join(alias.get(p, p) for p in str(n.target).split("."))

    memo: dict[int, nn.Module] = {}

    def holder(m: nn.Module) -> nn.Module:
        # the same modules, parameters and buffers under safe names; nothing here is run through
        # its parents' forward (fx calls leaf modules and reads attributes by target)
        if id(m) in memo:
            return memo[id(m)]
        h = nn.Module()
        h.training = m.training
        memo[id(m)] = h
        for k, c in m._modules.items():
            if c is not None:
                h._modules[alias.get(k, k)] = holder(c) if _renamed_below(c) else c
        for k, p in m._parameters.items():
            h._parameters[alias.get(k, k)] = p
        for k, b in m._buffers.items():
            h._buffers[alias.get(k, k)] = b
        for k, v in m.__dict__.items():  # plain tensor attributes (fx's _tensor_constant0, a model's constants)
            if isinstance(v, torch.Tensor):
                h.__dict__[alias.get(k, k)] = v
        return h

    def _renamed_below(m: nn.Module) -> bool:
        names = [n for n, _ in m.named_modules()] + [n for n, _ in m.named_parameters()] + \
            [n for n, _ in m.named_buffers()] + [k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)]
        return any(part in alias for n in names for part in n.split("."))

    return holder(root), {a: p for p, a in alias.items()}


def real_target(gm: fx.GraphModule, target: str) -> str:
    """The caller's module path of a graph target (undoing :func:`alias_targets`)."""
    names = getattr(gm, "meta", {}).get("connectome_aliases")
    if not names:
        return target
    return ".".join(names.get(p, p) for p in target.split("."))
