"""Rewrites of a traced graph into the forms tracing maps, each keeping the forward's values.

Run on every graph tracing makes (one per input shape, when a model is traced per shape):

- :func:`functionalise`: an in-place method on a tensor of its own whose tensor is read again
  (naflexvit's ``x.add_(pos)`` on a norm's output) becomes ``y = x.add(pos)``, the later reads
  reading ``y``;
- :func:`max_values`: the values of a max or min over a dim (``x.max(dim=1).values``, a max
  pool written by hand in Hiera) become ``x.amax(dim=1)``, one op with one output;
- :func:`stacked_sums`: the mean or sum over the dim of a ``torch.stack`` that nothing else
  reads (CrossViT's mean of its heads' logits) becomes the sum of the stacked tensors (divided
  by their number): an add of units, where the stack would put the units of two layers on one
  dim beside the batch.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from connectome.extract import ops

__all__ = ["normalise", "functionalise", "max_values", "stacked_sums"]


def normalise(graph: fx.Graph, modules: dict[str, nn.Module]) -> bool:
    """Every rewrite of this module, in place. Returns whether an in-place op was rewritten
    (the caller checks the forward against the model's where it has an example)."""
    max_values(graph)
    stacked_sums(graph)
    return functionalise(graph, modules)


_REDUCED = {"max": torch.amax, "min": torch.amin}


def max_values(graph: fx.Graph) -> None:
    """``x.max(dim)`` / ``torch.max(x, dim)`` (or min) read only through ``.values`` or ``[0]``:
    ``x.amax(dim)``."""
    for n in list(graph.nodes):
        if n.op == "call_method":
            fn = _REDUCED.get(n.target)
        else:
            fn = _REDUCED.get({torch.max: "max", torch.min: "min"}.get(n.target)) if n.op == "call_function" else None
        if fn is None or not isinstance(n.args[0] if n.args else None, fx.Node):
            continue
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool):
            continue  # a max over everything, or of two tensors: not this form
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        reads = list(n.users)
        if not reads or not all(_reads_values(u) for u in reads):
            continue
        with graph.inserting_after(n):
            new = graph.call_function(fn, (n.args[0],), {"dim": dim, "keepdim": keepdim})
        new.meta = dict(n.meta)
        for u in reads:
            u.replace_all_uses_with(new)
            graph.erase_node(u)
        graph.erase_node(n)


_REDUCTIONS = {torch.mean: "mean", torch.sum: "sum"}


def stacked_sums(graph: fx.Graph) -> None:
    """``torch.stack(ts, dim=d).mean(d)`` (or ``.sum(d)``) of a stack read by nothing else:
    ``(t0 + t1 + ...) / len(ts)``, in the order of ``ts``."""
    for n in list(graph.nodes):
        kind = n.target if n.op == "call_method" else _REDUCTIONS.get(n.target) if n.op == "call_function" else None
        if kind not in ("mean", "sum") or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        s = n.args[0]
        if s.op != "call_function" or s.target is not torch.stack or len(s.users) != 1:
            continue
        parts = s.args[0] if s.args else s.kwargs.get("tensors")
        d_stack = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim", 0)
        d_red = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if not isinstance(parts, (list, tuple)) or not parts or keepdim or len(n.args) > 3 or \
                set(n.kwargs) - {"dim", "keepdim"} or not isinstance(d_stack, int) or d_red != d_stack:
            continue
        with graph.inserting_before(n):
            acc = parts[0]
            for p in parts[1:]:
                acc = graph.call_function(operator.add, (acc, p))
                acc.meta = dict(n.meta)
            if kind == "mean":
                acc = graph.call_function(operator.truediv, (acc, len(parts)))
                acc.meta = dict(n.meta)
        n.replace_all_uses_with(acc)
        graph.erase_node(n)
        graph.erase_node(s)


def _reads_values(u: fx.Node) -> bool:
    return (u.op == "call_function" and u.target is getattr and u.args[1:] == ("values",)) or \
        (u.op == "call_function" and u.target is operator.getitem and u.args[1:] == (0,))


def functionalise(graph: fx.Graph, modules: dict[str, nn.Module]) -> bool:
    """In-place methods whose tensor is read again, rewritten out of place where that keeps
    what every read sees (see :func:`_out_of_place`). Returns whether one was."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    changed = False
    for n in nodes:
        t = n.target
        if n.op != "call_method" or not isinstance(t, str) or not t.endswith("_") or t.startswith("_") \
                or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        later = [u for u in n.args[0].users if u is not n and order.get(u, -1) > order[n]]
        if later:
            changed = _out_of_place(n, later, order, modules) or changed
    return changed


def _views(a: fx.Node, modules: dict[str, nn.Module]) -> set[fx.Node] | None:
    """The nodes that may share ``a``'s storage: back through ops that may return a view or
    their input itself (layout ops, dropout, identity, ``to``) to the tensors that own it, then
    forward through such ops again. Every node input of such an op counts as a possible source
    (a view's size may be a node: ``y.view(y.size(0), -1)``). None when an owner is not
    computed by the model (an input, a parameter)."""
    def view_of(n: fx.Node) -> list[fx.Node] | None:
        if n.op not in ("call_module", "call_function", "call_method"):
            return None
        op = ops.op_for_node(n, modules)
        ins = [x for x in n.all_input_nodes if x.op != "get_attr"]
        return ins if op is not None and op.rule in (ops.NONE, ops.LAYOUT) and ins else None

    seen, todo, owners = {a}, [a], []
    while todo:
        cur = todo.pop()
        ups = view_of(cur)
        if ups is None:
            owners.append(cur)
            continue
        for up in ups:
            if up not in seen:
                seen.add(up)
                todo.append(up)
    if any(o.op not in ("call_module", "call_function", "call_method") for o in owners):
        return None
    todo = list(seen)
    while todo:
        for u in todo.pop().users:
            if u not in seen and view_of(u) is not None:
                seen.add(u)
                todo.append(u)
    return seen


def _out_of_place(n: fx.Node, later: list[fx.Node], order: dict[fx.Node, int], modules: dict[str, nn.Module]) -> bool:
    """Rewrite ``a.add_(b)`` as ``c = a.add(b)`` and let the later reads of ``a`` read ``c``, where
    that is all they saw change: no other tensor that may share ``a``'s storage is read after it.
    Returns whether it did."""
    a = n.args[0]
    if n.op != "call_method" or not callable(getattr(torch.Tensor, n.target[:-1], None)):
        return False
    aliases = _views(a, modules)
    if aliases is None:
        return False
    for v in aliases - {a}:
        if any(u is not n and order.get(u, -1) > order[n] for u in v.users):
            return False  # a tensor that may share a's storage is read after the change
    n.target = n.target[:-1]
    for u in later:
        u.replace_input_with(a, n)
    return True
