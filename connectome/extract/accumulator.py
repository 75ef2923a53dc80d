"""The flow accumulator: runs batches through a traced model and sums flows on the device.

It owns its state: every field is declared once with :meth:`FlowAccumulator.add_state`
together with how it combines across processes (``"sum"``, ``"max"``, or ``"topk"`` for the
optional dataset examples of :mod:`connectome.extract.dataset_examples`), as torchmetrics'
``Metric.add_state(..., dist_reduce_fx=)`` does; :meth:`state_dict`,
:meth:`load_state_dict` and :meth:`tensors` iterate over that record, so checkpoints and
``all_reduce`` (:mod:`connectome.extract.distributed`) never list the fields.

Flows (see :mod:`connectome.extract.flow` for the method): for every conv/linear layer
``W * dT/dW`` reduced over the kernel; for identity edges ``x * dT/dx`` of the operand; per
node ``A * dT/dA`` at the value it passes on, and the bias terms: the bias of the layer, and
the constant part of every per-unit op (:mod:`connectome.extract.rules`), so that
``sum(in E) + bias_attribution == attribution == sum(out E)`` at every unit.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from connectome.errors import BadFileError, ConnectomeError, DataError, ExtractionError
from connectome.extract._model import no_inplace
from connectome.extract.build import assemble, edge_shapes, graph_layers, layout, prefetch_skeleton
from connectome.extract import dense, ops
from connectome.extract.rules import RULES, ChainOp, RunContext, Terms, attention_forward, product_forward
from connectome.extract.trace import LayerSpec, UnitGraph, layer_weight, run_nodes
from connectome.extract.unit_sums import UnitView, _acc_dtype
from connectome.graph import Connectome
from connectome.kinds import DENSE, IDENTITY, KINDS, Kind

__all__ = ["FlowAccumulator", "edge_shapes"]

_REDUCTIONS = ("sum", "max", "topk")


class FlowAccumulator:
    """Runs batches through a traced model and accumulates flows on the device.

    Everything stays on the device in float64 until :meth:`to_graph`: no host sync in the
    batch loop. Usable directly for custom loops; to combine accumulators of several
    processes use :func:`connectome.extract.distributed.all_reduce_accumulator`.
    """

    def __init__(self, ug: UnitGraph, device: torch.device, dtype: torch.dtype, per_sample: bool = False,
                 amp: bool = False, examples: int = 0):
        self.ug, self.device, self.dtype = ug, device, dtype
        self.per_sample, self.amp = per_sample, amp
        # On a GPU, the graph's edges (and its empty columns) are made ready on the idle CPU while
        # the batches run. Not on the CPU: there it is the same work on the same cores, and
        # holding the graph during the run would raise the peak memory by its size.
        self._columns = prefetch_skeleton(ug, columns=2 if per_sample else 1) if device.type != "cpu" else None
        self.modules = dict(ug.gm.named_modules())
        self.spec_of = {s.node: (i, s) for i, s in enumerate(ug.layers)}
        self.rule_ops: dict[str, ChainOp] = {op.node: op for s in ug.layers for op in s.bias_ops
                                             if RULES[op.kind].forward is not None or RULES[op.kind].named_input}
        keep: set[str] = set()
        grad: list[str] = []
        for li, s in enumerate(ug.layers):
            if s.kind != Kind.INPUT:
                keep.add(s.out_node)
                grad.append(s.out_node)
            if KINDS[s.kind].edges == IDENTITY:
                keep.add(s.node)
                grad.append(s.node)
                keep.update(op.node for op in s.operands)
            io = KINDS[s.kind].edges == DENSE and dense.of_spec(s).io_edges
            if KINDS[s.kind].edges == DENSE and per_sample and not io:
                cols = s.operands[0].cols
                if cols is not None and np.unique(cols).size < cols.size:
                    raise ExtractionError(
                        f"layer {s.name!r} reads each unit of {ug.layers[s.operands[0].layer].name!r} through several "
                        "columns (a channels-last flatten or a repeated channel); per_sample=True cannot sum |flow| per edge "
                        "there yet: flatten with the units first (x.permute(0, 3, 1, 2).flatten(1)) or per_sample=False"
                    )
            if KINDS[s.kind].edges == DENSE and (per_sample or io):
                keep.add(s.node)
                grad.append(s.node)
                keep.add(s.operands[0].node)
            for op in s.bias_ops:
                if RULES[op.kind].constant is not None:
                    keep.add(op.node)
                    grad.append(op.node)
                if RULES[op.kind].reads_input:
                    keep.add(op.input_node)
        self.keep = keep
        self.grad_nodes = list(dict.fromkeys(grad))
        # dense layers whose edges come from their input and output gradient: their weight and bias
        self._io_layers = {li: tuple(None if t is None else t.detach().to(device) for t in layer_weight(ug, s))
                           for li, s in enumerate(ug.layers)
                           if KINDS[s.kind].edges == DENSE and dense.of_spec(s).io_edges}
        self._views: dict[str, UnitView] = {}
        self._states: dict[str, str] = {}
        self._shapes = edge_shapes(ug)
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731

        lay = layout(ug)
        self._flat: dict[str, torch.Tensor] = {}  # per edge column: the buffer its dense blocks live in
        self._handed = False

        def edge_zeros(column: str) -> list[Any]:
            # Each dense block is a view of one flat buffer at its place in the graph's column, so
            # that on the CPU the finished sums become the graph's column as they are (no copy);
            # sorted and identity blocks (merged at the end) get their own tensors.
            flat = self._flat[column] = z(lay.total)
            out: list[Any] = [None] * len(self._shapes)
            for b in lay.blocks:
                sh = self._shapes[b.li]
                if b.order is None:
                    out[b.li] = flat[b.pos:b.pos + b.size].view(sh)
                else:
                    out[b.li] = [z(w) for w in sh] if isinstance(sh, list) else z(sh)
            return out

        self.add_state("edges", edge_zeros("edges"), "sum")
        if per_sample:
            self.add_state("abs_edges", edge_zeros("abs_edges"), "sum")
        # Per-unit sums: each layer's a view of one flat buffer over all units, so that the
        # statistics of a batch are added with a few ops over all layers at once (a GPU step is
        # otherwise bound by launching a dozen tiny kernels per layer).
        sizes = [s.size for s in ug.layers]
        self._node_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        def node_views(flat: torch.Tensor, name: str) -> list[torch.Tensor]:
            self._flat[name] = flat
            return [flat[int(a):int(b)] for a, b in zip(self._node_offsets[:-1], self._node_offsets[1:])]

        n_units = int(self._node_offsets[-1])
        for name in ("attr", "bias", "act_sum", "act_sq", "active"):
            self.add_state(name, node_views(z(n_units), name), "sum")
        self.add_state("act_max", node_views(torch.full((n_units,), -math.inf, dtype=torch.float64, device=device),
                                             "act_max"), "max")
        self._fixed: dict[str, tuple[Any, Any]] = {}  # constants of parameters, and their per-slot values
        self._zero_parts: dict[Any, torch.Tensor] = {}
        self.add_state("target_total", z(1), "sum")
        # images with NaN/inf pixels or targets: counted on the device (no host sync per batch)
        self.add_state("nonfinite", z(1), "sum")
        self.add_state("first_nonfinite", torch.full((1,), -math.inf, dtype=torch.float64, device=device), "max")
        self.n_images = 0
        self.examples = None
        if examples:  # top-k images per unit (dataset_examples.py): off by default
            from connectome.extract.dataset_examples import ExampleTracker

            self.examples = ExampleTracker(ug, device, examples)
            self.add_state("examples_act", self.examples.empty(), "topk")
            self.add_state("examples_attr", self.examples.empty(), "topk")

    # ------------------------------------------------------------------ state
    def add_state(self, name: str, default: Any, reduce: str) -> None:
        """Declare a field: a tensor, or a (nested) list of tensors, and how processes combine it."""
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        self._states[name] = reduce
        setattr(self, name, default)

    def _check_not_handed(self) -> None:
        if self._handed:
            raise ConnectomeError("this accumulator's sums are the edge columns of the graph to_graph returned; "
                                  "start a new FlowAccumulator to accumulate more")

    def tensors(self, reduce: str) -> list[torch.Tensor]:
        """Every state tensor combined by ``reduce``, flattened in declaration order (to combine
        them in place: refused once :meth:`to_graph` handed the sums to a graph)."""
        self._check_not_handed()
        out: list[torch.Tensor] = []

        def walk(v: Any) -> None:
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, list):
                for x in v:
                    walk(x)

        for name, r in self._states.items():
            if r == reduce:
                walk(getattr(self, name))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every field as CPU tensors (nested lists kept), with ``n_images`` and the input shape."""
        def cpu(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().to("cpu", copy=True)
            if isinstance(v, list):
                return [cpu(x) for x in v]
            return v

        out = {name: cpu(getattr(self, name)) for name in self._states}
        out["n_images"] = int(self.n_images)
        # to trace the model again on a resume without decoding an image
        out["input_shape"] = [int(v) for v in self.ug.shapes.get(self.ug.layers[0].node, ())]
        return out

    def load_state_dict(self, state: dict[str, Any], path: str | Path = "?") -> None:
        """Load saved fields into this (fresh) accumulator of the same model, checking every shape.

        Raises
        ------
        BadFileError
            A field is missing or has another structure, dtype or shape (another model).
        """
        def bad(what: str) -> BadFileError:
            return BadFileError(f"checkpoint {str(path)!r} does not fit the model ({what}); delete it to start over")

        def take(saved: Any, like: Any, what: str) -> Any:
            if like is None:
                if saved is not None:
                    raise bad(what)
                return None
            if isinstance(like, list):
                if not isinstance(saved, list) or len(saved) != len(like):
                    raise bad(f"{what}: {len(saved) if isinstance(saved, list) else '?'} parts, the model has {len(like)}")
                return [take(s, l, f"{what}[{i}]") for i, (s, l) in enumerate(zip(saved, like))]
            if not isinstance(saved, torch.Tensor) or saved.dtype != torch.float64 or saved.shape != like.shape:
                raise bad(what)
            return like.copy_(saved)  # in place: dense blocks stay views of their column's buffer

        self._check_not_handed()
        if not isinstance(state, dict):
            raise bad("not a dict of sums")
        try:
            loaded = {name: take(state[name], getattr(self, name), name) for name in self._states}
            n = state["n_images"]
        except KeyError as exc:
            raise bad(f"missing entry {exc}") from None
        if not isinstance(n, int) or n < 0:
            raise bad("n_images")
        for name, v in loaded.items():
            setattr(self, name, v)
        self.n_images = n

    # ------------------------------------------------------------------ running
    def _view(self, node: str) -> UnitView:
        v = self._views.get(node)
        if v is None:
            u = self.ug.units[node]
            v = self._views[node] = UnitView(u, self.ug.layers[u.layer].size, self.device)
        return v

    def _override(self, leaves: dict[int, tuple[torch.Tensor, torch.Tensor | None]], ctx: RunContext):
        spec_of, modules, rule_ops = self.spec_of, self.modules, self.rule_ops

        def run_plain(node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
            # Saved values must not be overwritten: run in-place ops out of place.
            if node.op == "call_module":
                return modules[node.target](*args, **kwargs)
            if node.op == "call_function":
                if kwargs.get("inplace"):
                    kwargs = {**kwargs, "inplace": False}
                pos = ops.inplace_position(node.target)
                if pos is not None and len(args) > pos and args[pos] is True:
                    args = list(args)
                    args[pos] = False
                return ops.out_of_place(node.target)(*args, **kwargs)
            name = node.target
            if name.endswith("_") and not name.startswith("_"):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)

        def override(node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
            hit = spec_of.get(node.name)
            if hit is not None and hit[1].kind == Kind.MIX:
                # the per-image pattern held constant, as the leaf whose A * dT/dA are the edges
                li, spec = hit
                i = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.name == spec.call["pattern"])
                args = list(args)
                args[i] = args[i].detach().requires_grad_(True)
                leaves[li] = (args[i], None)
                return run_plain(node, args, kwargs)
            if hit is not None and KINDS[hit[1].kind].edges == DENSE:
                li, spec = hit
                if node.op == "call_module":
                    m = modules[node.target]
                    w = m.weight.detach().requires_grad_(True)
                    b = m.bias.detach().requires_grad_(True) if m.bias is not None else None
                    leaves[li] = (w, b)
                    return dense.of_spec(spec).forward(m, args[0], w, b)
                args = list(args)
                kwargs = dict(kwargs)
                if len(args) > 1:
                    args[1] = args[1].detach().requires_grad_(True)
                    w = args[1]
                else:
                    kwargs["weight"] = kwargs["weight"].detach().requires_grad_(True)
                    w = kwargs["weight"]
                b = None
                if len(args) > 2 and isinstance(args[2], torch.Tensor):
                    args[2] = args[2].detach().requires_grad_(True)
                    b = args[2]
                elif isinstance(kwargs.get("bias"), torch.Tensor):
                    kwargs["bias"] = kwargs["bias"].detach().requires_grad_(True)
                    b = kwargs["bias"]
                leaves[li] = (w, b)
                return node.target(*args, **kwargs)
            if hit is not None and hit[1].kind == Kind.PRODUCT:
                a, b = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
                return product_forward(a, b)
            op = rule_ops.get(node.name)
            if op is not None:
                if RULES[op.kind].detached_operand:
                    # signal takes all: the gate's (the attention pattern's) value is used, its gradient is not
                    gate = op.params[0]
                    args = [a.detach() if isinstance(n, fx.Node) and n.name == gate else a
                            for a, n in zip(args, node.args)] + list(args[len(node.args):])
                    kwargs = {k: (v.detach() if isinstance(node.kwargs.get(k), fx.Node) and node.kwargs[k].name == gate
                                  else v) for k, v in kwargs.items()}
                    return run_plain(node, args, kwargs)
                if op.kind == "attention":
                    return attention_forward(op, *args[:3])
                if op.kind == "window":
                    return node.target(*args, **kwargs, frozen=True)  # pattern from detached q, k
                x = ctx.kept_input(op, node, args, kwargs)
                with torch.no_grad():  # the rule takes the value only: no autograd record of the op
                    y = run_plain(node, args, kwargs)
                return RULES[op.kind].forward(op, x, y, ctx)
            if node.op == "call_function" and (kwargs.get("inplace") or ops.is_inplace_function(node.target) or (
                    (pos := ops.inplace_position(node.target)) is not None and len(args) > pos and args[pos] is True)):
                return run_plain(node, args, kwargs)
            if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                    and not node.target.startswith("_"):
                return run_plain(node, args, kwargs)
            return NotImplemented

        return override

    def step(self, x: torch.Tensor, target_fn: Callable[[torch.Tensor], torch.Tensor],
             index: torch.Tensor | None = None) -> None:
        """Accumulate the flows of one batch of images ``x`` for the targets ``target_fn(logits)``.

        ``index``: the dataset index of each image, for the dataset examples (default: the
        count of images accumulated before).
        """
        self._check_not_handed()
        ug = self.ug
        x = x.to(self.device, dtype=self.dtype, non_blocking=True).detach().requires_grad_(True)
        leaves: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        ctx = _Run(kept={}, stash={})
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        # In-place activations would overwrite the values kept for the flows.
        with torch.enable_grad(), no_inplace(ug.gm):
            with amp:
                out, kept = run_nodes(ug.gm, (x,), override=self._override(leaves, ctx), keep=self.keep)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            t = target_fn(logits)
            if t.shape != (logits.shape[0],):
                raise ConnectomeError(
                    f"the target must give one value per image, shape ({logits.shape[0]},); got {tuple(t.shape)}"
                )
            total = t.sum()
        ctx.kept = kept
        wrt: list[torch.Tensor] = [x]
        slots: list[tuple[str, Any]] = [("input", None)]
        for li, (w, b) in leaves.items():
            wrt.append(w)
            slots.append(("w", li))
            if b is not None:
                wrt.append(b)
                slots.append(("b", li))
        for name in self.grad_nodes:
            v = kept.get(name)
            if isinstance(v, torch.Tensor) and v.requires_grad:
                wrt.append(v)
                slots.append(("node", name))
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
        g_node: dict[str, torch.Tensor] = {}
        g_x = None
        with torch.no_grad():
            for (kind, key), tensor, gr in zip(slots, wrt, grads):
                if gr is None:
                    continue
                if kind == "input":
                    g_x = gr
                elif kind in ("w", "b") and key in self._io_layers:
                    continue  # edges and bias from the layer's input and output gradient (_nodes)
                elif kind == "w":
                    spec = ug.layers[key]
                    # in place: the gradient of this run's own weight leaf is read nowhere else,
                    # so W * dW needs no temporary the size of the weights
                    prod = gr.mul_(tensor) if gr.dtype == tensor.dtype and gr.is_contiguous() else tensor * gr
                    if spec.kind == Kind.MIX:  # per image: (batch, heads..., rows, cols) of the pattern
                        self.edges[key] += _mix_edges(spec, prod.sum(0, dtype=torch.float64))
                        if self.per_sample:
                            self.abs_edges[key] += _mix_edges(spec, prod.abs().sum(0, dtype=torch.float64))
                        continue
                    e = dense.of_spec(spec).blocks(prod, spec)
                    # summed over the kernel in its own dtype (not at all for 1x1 kernels), widened by
                    # the float64 accumulation itself: no float64 copy of every edge per batch
                    self.edges[key] += e[..., 0] if e.shape[-1] == 1 else e.sum(-1, dtype=_acc_dtype(e))
                elif kind == "b":
                    self.bias[key] += tensor.double() * gr.double()
                else:
                    g_node[key] = gr
            if self.examples is not None:
                index = (torch.arange(x.shape[0], device=self.device, dtype=torch.float64) + self.n_images
                         if index is None else index.to(self.device, torch.float64))
            self._nodes(x, g_x, kept, g_node, ctx)
            if self.examples is not None:  # one merge per list and batch, over all units
                self.examples_attr = self.examples.merge(self.examples_attr, "attribution", index)
                self.examples_act = self.examples.merge(self.examples_act, "activation", index)
            bad = ~torch.isfinite(t.detach()) | ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(1)
            self.nonfinite += bad.sum(dtype=torch.float64)
            where = torch.arange(x.shape[0], device=bad.device, dtype=torch.float64) + self.n_images
            self.first_nonfinite = torch.maximum(
                self.first_nonfinite, -torch.where(bad, where, torch.full_like(where, math.inf)).min().reshape(1))
            self.target_total += t.detach().sum(dtype=torch.float64)
            self.n_images += int(x.shape[0])

    def _nodes(self, x: torch.Tensor, g_x: torch.Tensor | None, kept: dict[str, Any], g: dict[str, torch.Tensor],
               ctx: RunContext) -> None:
        ug = self.ug
        n = x.shape[0]
        attr_parts: list[torch.Tensor] = []  # per layer in order, (size,): one add for all layers
        means: list[torch.Tensor] = []  # per layer in order, (N, size) spatial means per image
        for li, s in enumerate(ug.layers):
            node = s.node if s.kind == Kind.INPUT else s.out_node
            A = x if s.kind == Kind.INPUT else kept[s.out_node]
            gA = g_x if s.kind == Kind.INPUT else g.get(s.out_node)
            view = self._view(node)
            part = None
            if gA is not None:
                prod = A * gA
                if self.examples is not None:  # the per-image sums that rank the examples give the total too
                    part = self.examples.observe(li, view, prod, by_sum=True)
                elif view.index is None and view.dims != ():
                    part = view.slot_sums(prod)  # in prod's dtype, widened with the others below
                else:
                    part = view.sum(prod)
            attr_parts.append(part if part is not None else self._zeros32(s.size, A))
            if self.examples is not None:
                self.examples.observe(li, view, A)
            # activation statistics: spatial mean per image
            m = view.per_image_mean(A.detach(), widen=False)
            means.append(m if m.shape[1] == s.size else m.expand(n, s.size))
            on_chain = set(s.chain)
            for op in s.bias_ops:
                rule = RULES[op.kind]
                gv = g.get(op.node)
                if gv is None or rule.constant is None:
                    continue
                term = self._constant_term(op, ctx, gv)
                if term is None:
                    continue
                self.bias[li] += term
                if op.node not in on_chain:
                    # Constant parts after the unit's branch point reach its consumers too.
                    self.attr[li] += term
            edges = KINDS[s.kind].edges
            if edges == IDENTITY:
                go = g.get(s.node)
                if go is None:
                    continue
                vals, absv = [], []
                w = ug.units[s.node].windows if self.per_sample else 1
                for op in s.operands:
                    # a product's operands each pass on half its flow (rules.product_forward)
                    xo = 0.5 * kept[s.node] if s.kind == Kind.PRODUCT else kept[op.node]
                    if op.span is not None:  # joined along positions: the positions it fills
                        gs = go.narrow(op.span[0], op.span[1], op.span[2])
                        gs = gs.squeeze(op.span[0]) if op.span[3] else gs
                    else:
                        gs = go.narrow(op.dim, op.offset, op.width) if s.kind == Kind.CONCAT else go
                    prod = (xo * gs).movedim(op.dim, 1)
                    per = prod.reshape(prod.shape[0], op.width, -1).sum(2).double()
                    if w > 1:  # positions folded into the batch: an image's rows are one sample
                        per = per.reshape(-1, w, op.width).sum(1)
                    if op.sign != 1.0:  # the subtracted operand of a residual `a - b`
                        per = per * op.sign
                    vals.append(per.sum(0))
                    if self.per_sample:
                        absv.append(per.abs().sum(0))
                self.edges[li] = [a + b for a, b in zip(self.edges[li], vals)]
                if self.per_sample:
                    self.abs_edges[li] = [a + b for a, b in zip(self.abs_edges[li], absv)]
            elif edges == DENSE and s.kind != Kind.MIX:
                gz = g.get(s.node)
                if gz is not None and li in self._io_layers:
                    w, b = self._io_layers[li]
                    e, bias = dense.of_spec(s).io_flows(s.call, w, b, kept[s.operands[0].node].detach(), gz)
                    self.edges[li] += e
                    if bias is not None:
                        self.bias[li] += bias
                if gz is not None and self.per_sample:
                    self.abs_edges[li] += self._per_sample_abs(li, s, kept[s.operands[0].node], gz)
        # every layer at once: a handful of ops over all units instead of a dozen per layer
        self._flat["attr"] += torch.cat(attr_parts).double()
        m = torch.cat(means, 1).double()
        self._flat["act_sum"] += m.sum(0)
        self._flat["act_sq"] += (m * m).sum(0)
        torch.maximum(self._flat["act_max"], m.max(0).values, out=self._flat["act_max"])
        self._flat["active"] += (m > 0).sum(0, dtype=torch.float64)

    def _constant_term(self, op: ChainOp, ctx: RunContext, gv: torch.Tensor) -> torch.Tensor | None:
        """The flow of ``op``'s constant part, ``sum(c * dT/dy)`` per unit, or None."""
        view = self._view(op.node)
        fixed = RULES[op.kind].fixed_constant
        if fixed and op.node in self._fixed:  # a parameter: its per-unit values, kept
            c, per_slot = self._fixed[op.node]
        else:
            c = RULES[op.kind].constant(op, ctx, gv)
            per_slot = view.per_slot(c, gv.shape) if isinstance(c, torch.Tensor) else None
            if fixed:
                self._fixed[op.node] = (c, per_slot)
        if c is None:
            return None
        if per_slot is not None:
            return view.scaled_sum(None, gv, per_slot=per_slot)
        if isinstance(c, Terms):
            return sum(view.product_sum([f for f in factors if f is not None], gv) for factors in c)
        if isinstance(c, torch.Tensor):
            return view.scaled_sum(c, gv)
        return float(c) * view.sum(gv)

    def _zeros32(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (size, like.device)
        z = self._zero_parts.get(key)
        if z is None:
            z = self._zero_parts[key] = torch.zeros(size, dtype=torch.float32, device=like.device)
        return z

    def _weight(self, s: LayerSpec) -> torch.Tensor:
        cache = self.__dict__.setdefault("_weights", {})
        if s.name not in cache:  # looked up once per run, not per batch
            w, _ = layer_weight(self.ug, s)
            cache[s.name] = w.detach().to(self.device)
        return cache[s.name]

    def _per_sample_abs(self, li: int, s: LayerSpec, x: torch.Tensor, gz: torch.Tensor) -> torch.Tensor:
        """sum over images of |E_n| for a dense layer (its strategy's, chunked to bound memory)."""
        w = self._weight(s).to(gz.dtype)
        # positions folded into the batch: the rows of one image (its windows) are one sample
        rows = self.ug.units[s.operands[0].node].windows
        return dense.of_spec(s).per_sample_abs(s.call, s.groups, s.operands[0].group, w, x.to(gz.dtype), gz,
                                               self.device, rows)

    # ------------------------------------------------------------------ results

    # ------------------------------------------------------------------ results
    def to_graph(self, labels: Sequence[str] | None, meta: dict[str, Any]) -> Connectome:
        ug = self.ug
        if self.n_images == 0:
            raise DataError("no images were processed; the data is empty (or every image failed to decode)")

        def cpu(v: Any) -> Any:
            if isinstance(v, list):
                return [cpu(t) for t in v]
            return None if v is None else v.detach().cpu().numpy()

        bad = int(self.nonfinite.item())
        if bad:
            first = int(-self.first_nonfinite.item())
            raise DataError(
                f"{bad} of {self.n_images} images have NaN or inf pixels or give a non-finite target (the first is "
                f"image {first} in the order read); their flows would make the graph non-finite. Remove or repair "
                "them (for example torch.nan_to_num) and run again"
            )
        # device tensors: assemble copies each straight into its slice of the graph's column
        values = {li: v for li, v in enumerate(self.edges) if v is not None}
        n = self.n_images
        cat = lambda xs: np.concatenate([cpu(v) for v in xs])  # noqa: E731
        mean = cat(self.act_sum) / n
        var = np.maximum(cat(self.act_sq) / n - mean**2, 0.0)
        attribution = cat(self.attr)
        bias = cat(self.bias)
        input_total = float(attribution[: ug.layers[0].size].sum())
        total = float(cpu(self.target_total)[0])
        residual = total - (input_total + float(bias.sum()))
        node_attrs = {
            "attribution": attribution,
            "bias_attribution": bias,
            "activation_mean": mean,
            "activation_std": np.sqrt(var),
            "activation_max": cat(self.act_max),
            "frequency": cat(self.active) / n,
        }
        nonlinear = sorted({op for s in ug.layers for op in s.nonlinear})
        meta = {
            **meta,
            "method": "attribution",
            "n_images": n,
            "target_total": total,
            "completeness_residual": residual,
            "completeness_relative": abs(residual) / max(abs(total), 1e-300),
            "exact": not self.amp,
            "rules": list(ug.rules),
            "nonlinear_ops": nonlinear,
            "per_sample": self.per_sample,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if self.examples is not None:
            node_attrs.update(self.examples.columns(self.examples_act, "activation"))
            node_attrs.update(self.examples.columns(self.examples_attr, "attribution"))
            meta["examples"] = {**self.examples.meta(), "lists": ["activation", "attribution"],
                                **meta.get("examples", {})}
        extra = None
        if self.per_sample:
            extra = {"abs_weight": {li: v for li, v in enumerate(self.abs_edges) if v is not None}}
        columns, self._columns = self._columns.result() if self._columns is not None else None, None
        if self.device.type == "cpu":  # the sums themselves become the graph's columns, all or none
            handed = [self._handover(name) for name in ("edges", "abs_edges") if name in self._flat]
            if all(c is not None for c in handed):
                columns, self._handed = handed, True
        return assemble(ug, graph_layers(ug, labels), values, extra=extra, node_attrs=node_attrs, meta=meta,
                        columns=columns)

    def _handover(self, name: str) -> np.ndarray | None:
        """The flat buffer of edge column ``name`` as a numpy array, when every dense block of
        the column still is its view (nothing rebound them); None otherwise."""
        flat = self._flat[name]
        if self._handed or flat.device.type != "cpu":
            return None
        blocks = getattr(self, name)
        for b in layout(self.ug).blocks:
            t = blocks[b.li]
            if b.order is None and (not isinstance(t, torch.Tensor) or t.data_ptr() != flat[b.pos:].data_ptr()
                                    or t.numel() != b.size or not t.is_contiguous()):
                return None
        return flat.numpy()


class _Run(RunContext):
    """The run context of one batch, with the data input of a rule's op."""

    def kept_input(self, op: ChainOp, node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        for a, n in zip(args, node.args):
            if isinstance(n, fx.Node) and n.name == op.input_node:
                return a
        for k, n in node.kwargs.items():
            if isinstance(n, fx.Node) and n.name == op.input_node:
                return kwargs[k]
        return args[0]


def _mix_edges(spec: LayerSpec, e: torch.Tensor) -> torch.Tensor:
    """``A * dT/dA`` of a per-image pattern summed over images, as the layer's ``(out, in/groups)`` block."""
    if spec.call["right"]:  # v @ pattern: the pattern's columns are the output units
        e = e.transpose(-1, -2)
    return e.reshape(spec.size, -1)
