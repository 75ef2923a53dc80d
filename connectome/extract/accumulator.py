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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from connectome.errors import BadFileError, ConnectomeError, DataError, ExtractionError
from connectome.extract._model import no_inplace
from connectome.extract.build import assemble, edge_shapes, graph_layers, layout, prefetch_skeleton
from connectome.extract import dense, ops
from connectome.extract.batched import GroupedSums, join_limit, units_dim
from connectome.extract.rules import RULES, ChainOp, RunContext, Terms, attention_forward, product_forward
from connectome.extract.trace import LayerSpec, UnitGraph, Units, layer_weight, run_nodes, tile_heads
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
        self._sole = _sole_parameters(ug.gm, self.modules)
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

        # identity blocks (a list of per-operand blocks): views of one buffer per column, so that the
        # flows of every operand of a batch are added in one op
        own_at: dict[int, list[int]] = {}
        pos = 0
        for b in lay.blocks:
            sh = self._shapes[b.li]
            if b.order is not None and isinstance(sh, list):
                widths = [int(w[0]) for w in sh]
                own_at[b.li] = [pos + int(v) for v in np.cumsum([0, *widths[:-1]])]
                pos += sum(widths)
        self._own_at, own_total = own_at, pos

        def edge_zeros(column: str) -> list[Any]:
            # Each dense block is a view of one flat buffer at its place in the graph's column, so
            # that on the CPU the finished sums become the graph's column as they are (no copy);
            # sorted and identity blocks (merged at the end) get their own tensors.
            flat = self._flat[column] = z(lay.total)
            own = self._flat[column + ":own"] = z(own_total)
            out: list[Any] = [None] * len(self._shapes)
            for b in lay.blocks:
                sh = self._shapes[b.li]
                if b.order is None:
                    out[b.li] = flat[b.pos:b.pos + b.size].view(sh)
                elif isinstance(sh, list):
                    out[b.li] = [own[a:a + int(w[0])] for a, w in zip(own_at[b.li], sh)]
                else:
                    out[b.li] = z(sh)
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
        self._sums = GroupedSums(join_limit(device))  # per-unit sums of many layers in a few ops
        self._indices: dict[tuple, torch.Tensor | None] = {}  # where joined sums land, per set of layers
        self._joined_constants: dict[tuple, Any] = {}
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
    def _operand_view(self, s: LayerSpec, k: int) -> UnitView:
        """Where the units of identity operand ``k`` of ``s`` lie in its flow ``x * dT/dy``: along
        ``op.dim``, or ``op.dims`` (with the rows of an image, when heads are folded into the batch)."""
        views = self.__dict__.setdefault("_operand_views", {})
        if (s.name, k) not in views:
            op = s.operands[k]
            dims = op.dims if op.dims is not None else (op.dim,)
            rows = self.ug.units[s.node].windows if 0 in dims else 1
            one = np.array(0) if dims == () else None  # one unit (stacked along a new dim): slot 0
            views[s.name, k] = UnitView(Units(0, dims, one, 0, rows), op.width, self.device)
        return views[s.name, k]

    def _view(self, node: str) -> UnitView:
        v = self._views.get(node)
        if v is None:
            u = self.ug.units[node]
            v = self._views[node] = UnitView(u, self.ug.layers[u.layer].size, self.device)
        return v

    def _override(self, leaves: dict[int, tuple[torch.Tensor, torch.Tensor | None]], ctx: RunContext):
        spec_of, modules, rule_ops, sole = self.spec_of, self.modules, self.rule_ops, self._sole

        def leaf(t: torch.Tensor) -> torch.Tensor:
            # the gradient of a dense layer's weight (bias) for its W * dW: a parameter that only
            # this layer reads is a leaf already (no op); a shared, frozen or computed one is
            # detached, so that its gradient is this layer's alone, and so is one with hooks
            # (training code's gradient masks would rewrite dW)
            if t.is_leaf and t.requires_grad and id(t) in sole and not t._backward_hooks:
                return t
            return t.detach().requires_grad_(True)


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
                    if "heads" in spec.call:  # heads folded into the batch: the weight tiled per head
                        w, b = (None if t is None else t.detach().requires_grad_(True)
                                for t in tile_heads(spec, m.weight, m.bias))
                        leaves[li] = (w, b)
                        return _per_head(spec.call["heads"], lambda x, w, b: dense.of_spec(spec).forward(m, x, w, b),
                                         args[0], w, b)
                    w = leaf(m.weight)
                    b = leaf(m.bias) if m.bias is not None else None
                    leaves[li] = (w, b)
                    return dense.of_spec(spec).forward(m, args[0], w, b)
                args = list(args)
                kwargs = dict(kwargs)
                if len(args) > 1:
                    args[1] = leaf(args[1])
                    w = args[1]
                else:
                    kwargs["weight"] = leaf(kwargs["weight"])
                    w = kwargs["weight"]
                b = None
                if len(args) > 2 and isinstance(args[2], torch.Tensor):
                    args[2] = leaf(args[2])
                    b = args[2]
                elif isinstance(kwargs.get("bias"), torch.Tensor):
                    kwargs["bias"] = leaf(kwargs["bias"])
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
                    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
                    return attention_forward(op, *args[:3], mask=mask if isinstance(mask, torch.Tensor) else None)
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
            w_val: list[torch.Tensor] = []  # weights whose W * dW are taken together
            w_grad: list[torch.Tensor] = []
            w_li: list[int] = []
            b_val: list[torch.Tensor] = []  # biases whose flows are taken together
            b_grad: list[torch.Tensor] = []
            b_li: list[int] = []
            for (kind, key), tensor, gr in zip(slots, wrt, grads):
                if gr is None:
                    continue
                if kind == "input":
                    g_x = gr
                elif kind in ("w", "b") and key in self._io_layers:
                    continue  # edges and bias from the layer's input and output gradient (_nodes)
                elif kind == "w":
                    spec = ug.layers[key]
                    if spec.kind == Kind.MIX:  # per image: (batch, heads..., rows, cols) of the pattern
                        prod = tensor * gr
                        self.edges[key] += _mix_edges(spec, prod.sum(0, dtype=torch.float64))
                        if self.per_sample:
                            self.abs_edges[key] += _mix_edges(spec, prod.abs().sum(0, dtype=torch.float64))
                    elif gr.dtype == tensor.dtype and gr.is_contiguous():
                        w_val.append(tensor)
                        w_grad.append(gr)
                        w_li.append(key)
                    else:
                        self._add_weight_flows([key], [tensor * gr])
                elif kind == "b" and tensor.dim() == 1 and tensor.numel() == ug.layers[key].size:
                    b_val.append(tensor)
                    b_grad.append(gr)
                    b_li.append(key)
                elif kind == "b":
                    self.bias[key] += tensor.double() * gr.double()
                else:
                    g_node[key] = gr
            if w_val:
                # in place, one op for all layers: the gradient of this run's own weight leaf is
                # read nowhere else, so W * dW needs no temporary the size of the weights
                torch._foreach_mul_(w_grad, w_val)
                self._add_weight_flows(w_li, w_grad)
            if b_val:  # one product and one add for every bias
                self._add_at(self._flat["bias"], ("layer bias", tuple(b_li)),
                             torch.cat(b_val).double() * torch.cat(b_grad).double(), [(li,) for li in b_li])
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
        """Per-unit sums of the batch: attribution, activation statistics, constant flows and
        identity edges. Tensors of the common layouts are summed together (:mod:`batched`, a
        few ops per batch); the others, and the dataset examples, per layer through their
        :class:`UnitView`."""
        ug = self.ug
        n = x.shape[0]
        joined = self.examples is None  # the examples rank each layer's per-image sums: their own path
        # per layer: A and dT/dA joined, or A * dT/dA summed per layer
        a_x: list[torch.Tensor] = []
        a_g: list[torch.Tensor | None] = []
        a_dims: list[int] = []
        a_li: list[int] = []
        attr_parts: list[torch.Tensor] = []  # per-layer sums (float32 or wider), at attr_at
        attr_at: list[int] = []
        means: list[torch.Tensor] = []  # per-layer (N, size) spatial means per image, at means_at
        means_at: list[int] = []
        # constants that vary with the unit (times a factor per token or image, for a norm's): their
        # gradients joined, summed (weighted) per unit, times the constant per unit
        consts: list[_ConstantPart] = []
        # identity edges: operand values and output gradients joined, into the identity buffer
        e_x: list[torch.Tensor] = []
        e_g: list[torch.Tensor] = []
        e_dims: list[int] = []
        e_keys: list[tuple[int, int, float]] = []
        for li, s in enumerate(ug.layers):
            node = s.node if s.kind == Kind.INPUT else s.out_node
            A = x if s.kind == Kind.INPUT else kept[s.out_node]
            gA = g_x if s.kind == Kind.INPUT else g.get(s.out_node)
            view = self._view(node)
            d = units_dim(view, A) if joined else None
            if d is not None and (gA is None or (gA.shape == A.shape and gA.dtype == A.dtype)):
                a_x.append(A)
                a_g.append(gA)
                a_dims.append(d)
                a_li.append(li)
            else:
                part = None
                if gA is not None:
                    prod = A * gA
                    if self.examples is not None:  # the per-image sums that rank the examples give the total too
                        part = self.examples.observe(li, view, prod, by_sum=True)
                    elif view.index is None and view.dims != ():
                        part = view.slot_sums(prod)  # in prod's dtype, widened with the others below
                    else:
                        part = view.sum(prod)
                    attr_parts.append(part)
                    attr_at.append(li)
                if self.examples is not None:
                    self.examples.observe(li, view, A)
                if view.index is not None and view.dims != ():  # units reordered or on several dims
                    m = view.unit_means(A.detach())
                else:
                    m = view.per_image_mean(A.detach(), widen=False)
                means.append(m if m.shape[1] == s.size else m.expand(n, s.size))
                means_at.append(li)
            on_chain = set(s.chain)
            for op in s.bias_ops:
                rule = RULES[op.kind]
                gv = g.get(op.node)
                if gv is None or rule.constant is None:
                    continue
                c, per_slot = self._constant(op, ctx, gv)
                if c is None:
                    continue
                # Constant parts after the unit's branch point reach its consumers too (in its
                # attribution); the input's attribution is the image's own x * dT/dx, whose
                # constants (a normalisation after a patchify) are bias terms only.
                # (a constant of the layer's own node, the padded units of a pad, is in A already)
                off = op.node not in on_chain and op.node != s.node and s.kind != Kind.INPUT
                d = units_dim(self._view(op.node), gv) if joined and per_slot is not None and rule.fixed_constant \
                    else None
                if d is not None:
                    consts.append(_ConstantPart(gv, d, None, per_slot, ("fixed", op.node), li, off))
                    continue
                if joined and isinstance(c, Terms):
                    parts = self._term_parts(op, c, gv, li, off)
                    if parts is not None:
                        consts.extend(parts)
                        continue
                term = self._constant_sum(op, c, per_slot, gv)
                self.bias[li] += term
                if off:
                    self.attr[li] += term
            edges = KINDS[s.kind].edges
            if edges == IDENTITY:
                go = g.get(s.node)
                if go is None:
                    continue
                w = ug.units[s.node].windows if self.per_sample else 1
                for k, op in enumerate(s.operands):
                    # a product's operands each pass on half its flow (rules.product_forward)
                    xo = kept[s.node] if s.kind == Kind.PRODUCT else kept[op.node]
                    if op.select is not None:  # a slice of a sum over a dim that holds units
                        xo = xo.select(*op.select)
                    half = 0.5 if s.kind == Kind.PRODUCT else 1.0
                    if op.span is not None:  # joined along positions: the positions it fills
                        gs = go.narrow(op.span[0], op.span[1], op.span[2])
                        gs = gs.squeeze(op.span[0]) if op.span[3] else gs
                    else:
                        length = op.width if not op.dims else xo.shape[op.dim]  # units on several dims: its places
                        gs = go.narrow(op.dim, op.offset, length) if s.kind == Kind.CONCAT else go
                        if op.dims == () and gs.dim() == xo.dim() + 1:  # one unit stacked along a new dim
                            gs = gs.squeeze(op.dim)
                    d = op.dim % xo.dim()
                    d = 1 if d == 1 else (-1 if d == xo.dim() - 1 else None)
                    if (joined and not self.per_sample and op.span is None and d is not None and xo.shape == gs.shape
                            and xo.dtype == gs.dtype and op.dims is None):
                        e_x.append(xo)
                        e_g.append(gs)
                        e_dims.append(d)
                        e_keys.append((li, k, half * op.sign))
                        continue
                    prod = (half * xo if half != 1.0 else xo) * gs
                    # per batch row (per image where the units vary along an image's rows: heads
                    # folded into the batch) and unit: the units on one dim or on several, as a
                    # node's value is summed per unit
                    per = self._operand_view(s, k).sum_rows(prod).double()
                    if w > 1 and not (op.dims and 0 in op.dims):  # positions folded into the batch: an image's rows are one sample
                        per = per.reshape(-1, w, op.width).sum(1)
                    if op.sign != 1.0:  # the subtracted operand of a residual `a - b`
                        per = per * op.sign
                    self.edges[li][k] += per.sum(0)
                    if self.per_sample:
                        self.abs_edges[li][k] += per.abs().sum(0)
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
        if a_x:
            with_grad = [i for i, t in enumerate(a_g) if t is not None]
            if len(with_grad) == len(a_x):
                m, a = self._sums(a_x, a_dims, a_g, means=True)
            else:
                m, _ = self._sums(a_x, a_dims, means=True)
                a = None
                if with_grad:
                    _, a = self._sums([a_x[i] for i in with_grad], [a_dims[i] for i in with_grad],
                                      [a_g[i] for i in with_grad])
            means.insert(0, m)
            means_at.insert(0, -1)
            if a is not None:
                attr_parts.insert(0, a.double().sum(0))
                attr_at.insert(0, -1)
            grouped = tuple(a_li[i] for i in with_grad), tuple(a_li)
        else:
            grouped = (), ()
        # every layer at once: a handful of ops over all units instead of a dozen per layer
        if attr_parts:
            self._add_at(self._flat["attr"], ("attr", grouped[0], tuple(attr_at)), torch.cat(attr_parts).double(),
                         [grouped[0] if li < 0 else (li,) for li in attr_at])
        m = torch.cat(means, 1) if len(means) > 1 else means[0]
        order = self._index(("means", grouped[1], tuple(means_at)),
                            [grouped[1] if li < 0 else (li,) for li in means_at], inverse=True)
        m = (m if order is None else m.index_select(1, order)).double()
        self._flat["act_sum"] += m.sum(0)
        self._flat["act_sq"] += (m * m).sum(0)
        torch.maximum(self._flat["act_max"], m.max(0).values, out=self._flat["act_max"])
        self._flat["active"] += (m > 0).sum(0, dtype=torch.float64)
        for weighted in (False, True):
            sel = [c for c in consts if (c.weight is not None) == weighted]
            if sel:
                self._add_constant_flows(sel, weighted)
        if e_x:
            _, es = self._sums(e_x, e_dims, e_g, total=True)
            key = tuple(e_keys)
            if key not in self._joined_constants:  # the operands' signs (and halves), when not all 1
                self._joined_constants[key] = None if all(v == 1.0 for _, _, v in e_keys) else torch.cat(
                    [torch.full((ug.layers[li].operands[k].width,), v, dtype=torch.float64, device=es.device)
                     for li, k, v in e_keys])
            sign = self._joined_constants[key]
            self._add_identity(key, es if sign is None else es * sign)

    def _add_weight_flows(self, lis: list[int], prods: list[torch.Tensor]) -> None:
        """Add ``W * dT/dW`` of dense layers ``lis`` to their edges, summed over the kernel (in its
        own dtype, widened by the float64 accumulation itself): one add for all layers, and one
        sum per layer with a kernel larger than 1x1."""
        targets: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for li, p in zip(lis, prods):
            how = self._edge_target(li, p)
            if how is None:  # a regrouping that is no view of the weights (a transposed convolution)
                e = dense.of_spec(self.ug.layers[li]).blocks(p, self.ug.layers[li])
                self.edges[li] += e[..., 0] if e.shape[-1] == 1 else e.sum(-1, dtype=_acc_dtype(e))
                continue
            target, dims, shape = how
            targets.append(target)
            if shape is not None:
                values.append(p.view(shape).sum(-1, dtype=_acc_dtype(p)))
            elif dims is not None:
                values.append(p.sum(dims, dtype=_acc_dtype(p)))
            else:
                values.append(p)
        if targets:
            torch._foreach_add_(targets, values)

    def _edge_target(self, li: int, p: torch.Tensor) -> tuple[torch.Tensor, Any, Any] | None:
        """How ``W * dT/dW`` of dense layer ``li`` (weight-shaped ``p``) adds to its edge block:
        ``(target, kernel dims, shape)``: added as it is to ``target`` (a weight-shaped view of the
        block, dims None), summed over ``dims``, or viewed as ``shape`` and summed over its last
        axis; None when the layer's regrouping is no view of the weights. Made once per layer."""
        cache = self.__dict__.setdefault("_edge_targets", {})
        hit = cache.get(li)
        block = self.edges[li]
        if hit is not None and hit[0] is block:
            return hit[1]
        spec = self.ug.layers[li]
        e = dense.of_spec(spec).blocks(p, spec)  # (out, in per group, kernel)
        how: tuple[torch.Tensor, Any, Any] | None = None
        if e.data_ptr() == p.data_ptr() and e.is_contiguous() and isinstance(block, torch.Tensor) \
                and block.is_contiguous() and tuple(block.shape) == tuple(e.shape[:2]):
            k = e.shape[-1]
            if k == 1:
                how = (block.view(p.shape), None, None)
            elif tuple(p.shape[:2]) == tuple(e.shape[:2]):  # (out, in, kernel dims...)
                how = (block, tuple(range(2, p.dim())), None)
            else:
                how = (block, None, tuple(e.shape))
        cache[li] = (block, how)
        return how

    def _term_parts(self, op: ChainOp, terms: Terms, gv: torch.Tensor, li: int, off: bool) -> list[_ConstantPart] | None:
        """A constant written as :class:`Terms` (a norm's ``b + shift * w``) as parts to join: per
        term, its factors per unit (joined into one vector) and at most one other factor (per
        token, or per image and group), which weights the sum of the gradient. None where the
        value's layout or a term does not fit (the caller sums it with its view)."""
        d = units_dim(self._view(op.node), gv)
        if d is None:
            return None
        ud = 1 if d == 1 else gv.dim() - 1
        k = gv.shape[ud]
        parts = []
        for i, factors in enumerate(terms):
            rest, units, params = [], [], True
            for f in factors:
                if f is None:
                    continue
                if not isinstance(f, torch.Tensor) or f.dim() > gv.dim():
                    return None
                shape = (1,) * (gv.dim() - f.dim()) + tuple(f.shape)
                if all(n == 1 for j, n in enumerate(shape) if j != ud) and shape[ud] in (1, k):
                    units.append(f)
                    params = params and any(f is p for p in op.params)  # the same every batch
                else:
                    rest.append(f)
            if len(rest) > 1 or (rest and rest[0].dtype != gv.dtype):
                return None
            try:
                weight = rest[0].expand(gv.shape) if rest else None
            except RuntimeError:
                return None
            key = ("term", op.node, i) if params else None
            parts.append(_ConstantPart(gv, d, weight, self._unit_vector(key, units, k), key, li, off))
        return parts

    def _unit_vector(self, key: tuple | None, factors: list[torch.Tensor], k: int) -> torch.Tensor:
        """The product of per-unit factors as a float64 vector of ``k`` units (kept under ``key``)."""
        if key is not None and key in self._joined_constants:
            return self._joined_constants[key]
        vec = None
        for f in factors:
            v = f.reshape(-1).to(self.device, torch.float64)
            vec = v if vec is None else vec * v
        if vec is None:
            vec = torch.ones(k, dtype=torch.float64, device=self.device)
        elif vec.numel() != k:
            vec = vec.expand(k)
        if key is not None:
            self._joined_constants[key] = vec
        return vec

    def _add_constant_flows(self, parts: list[_ConstantPart], weighted: bool) -> None:
        """Flows of joined constant parts: their gradients' (weighted) sums per unit, times the
        constant per unit, added to the bias (and to the attribution, off the unit's chain)."""
        _, sums = self._sums([c.grad for c in parts], [c.dim for c in parts],
                             [c.weight for c in parts] if weighted else None, total=True)
        keys = tuple(c.key for c in parts)
        if all(key is not None for key in keys):  # every constant the same each batch: joined once
            vec = self._joined_constants.get(keys)
            if vec is None:
                vec = self._joined_constants[keys] = torch.cat([c.per_unit for c in parts])
        else:
            vec = torch.cat([c.per_unit for c in parts])
        flows = sums * vec
        where = [(c.layer,) for c in parts]
        key = ("constants", tuple(c.layer for c in parts))
        self._add_at(self._flat["bias"], key, flows, where)
        offs = tuple(c.off_chain for c in parts)
        if any(offs):
            # Constant parts after the unit's branch point reach its consumers too.
            if not all(offs):
                mask = self._joined_constants.get(("off chain", key, offs))
                if mask is None:
                    mask = self._joined_constants[("off chain", key, offs)] = torch.cat(
                        [torch.full((self.ug.layers[c.layer].size,), float(c.off_chain), dtype=torch.float64,
                                    device=self.device) for c in parts])
                flows = flows * mask
            self._add_at(self._flat["attr"], key, flows, where)

    def _add_at(self, flat: torch.Tensor, key: tuple, values: torch.Tensor, where: list[tuple[int, ...]]) -> None:
        """``flat[units of the layers in where, in order] += values``: one add."""
        index = self._index(key, where)
        if index is None:
            flat += values
        else:
            flat.index_add_(0, index, values)

    def _index(self, key: tuple, where: list[tuple[int, ...]], inverse: bool = False) -> torch.Tensor | None:
        """The units of the layers ``where`` lists, in order, as an index into all units (None
        when that is all of them in order); with ``inverse``, its inverse permutation."""
        if key in self._indices:
            return self._indices[key]
        o = self._node_offsets
        idx = np.concatenate([np.arange(o[li], o[li + 1]) for lis in where for li in lis]) if where else \
            np.zeros(0, np.int64)
        out = None
        if idx.size != o[-1] or not np.array_equal(idx, np.arange(idx.size)):
            if inverse:
                inv = np.empty_like(idx)
                inv[idx] = np.arange(idx.size)
                idx = inv
            out = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        self._indices[key] = out
        return out

    def _add_identity(self, key: tuple, flows: torch.Tensor) -> None:
        """Identity edge flows of the operands ``key`` lists (layer, operand, sign), in order, added
        to their blocks in the identity buffer of the edges column."""
        index = self._indices.get(key)
        if index is None:
            index = self._indices[key] = torch.as_tensor(
                np.concatenate([np.arange(self._own_at[li][k], self._own_at[li][k] + self.ug.layers[li].operands[k].width)
                                for li, k, _ in key]), dtype=torch.long, device=self.device)
        self._flat["edges:own"].index_add_(0, index, flows)

    def _constant(self, op: ChainOp, ctx: RunContext, gv: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """``op``'s constant part and, when it varies with the unit only, its value per unit slot."""
        fixed = RULES[op.kind].fixed_constant
        if fixed and op.node in self._fixed:  # a parameter: its per-unit values, kept
            return self._fixed[op.node]
        c = RULES[op.kind].constant(op, ctx, gv)
        per_slot = self._view(op.node).per_slot(c, gv.shape) if isinstance(c, torch.Tensor) else None
        if fixed:
            self._fixed[op.node] = (c, per_slot)
        return c, per_slot

    def _constant_sum(self, op: ChainOp, c: Any, per_slot: torch.Tensor | None, gv: torch.Tensor) -> torch.Tensor:
        """The flow of ``op``'s constant part ``c``, ``sum(c * dT/dy)`` per unit."""
        view = self._view(op.node)
        if per_slot is not None:
            return view.scaled_sum(None, gv, per_slot=per_slot)
        if isinstance(c, Terms):
            return sum(view.product_sum([f for f in factors if f is not None], gv) for factors in c)
        if isinstance(c, torch.Tensor):
            return view.scaled_sum(c, gv)
        return float(c) * view.sum(gv)

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
        if "heads" in s.call:  # heads folded into the batch: per image, a grouped conv over heads x channels
            h = s.call["heads"]
            x, gz, rows = x.reshape(x.shape[0] // h, -1, *x.shape[2:]), gz.reshape(gz.shape[0] // h, -1, *gz.shape[2:]), 1
        return dense.of_spec(s).per_sample_abs(s.call, s.groups, s.operands[0].group, w, x.to(gz.dtype), gz,
                                               self.device, rows)

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
            "exact": not self.amp and not ug.casts,
            "rules": list(ug.rules),
            "nonlinear_ops": nonlinear,
            "per_sample": self.per_sample,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if ug.casts:  # the model computes part of its data in a less precise type than the run's
            meta["lower_precision"] = list(ug.casts[:5])
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


@dataclass
class _ConstantPart:
    """A constant's part that varies with the unit, to join: the gradient at its op, the dim that
    holds the units, a factor weighting the gradient (per token, or None), its value per unit,
    the key it is kept under when that is the same every batch (or None), layer, off chain."""

    grad: torch.Tensor
    dim: int
    weight: torch.Tensor | None
    per_unit: torch.Tensor
    key: tuple | None
    layer: int
    off_chain: bool


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


def _sole_parameters(gm: fx.GraphModule, modules: dict[str, torch.nn.Module]) -> set[int]:
    """ids of the tensors that one node of the graph reads, alone: a module's parameter or an
    attribute (a parameter that several nodes read, tied weights or one ``get_attr`` node with
    several users, has a gradient summed over its uses)."""
    uses: dict[int, int] = {}
    for node in gm.graph.nodes:
        found: list[Any] = []
        if node.op == "call_module":
            found = list(modules[node.target].parameters())
        elif node.op == "get_attr":  # one node for all its readers: each reader is a use
            v: Any = gm
            for part in str(node.target).split("."):
                v = getattr(v, part, None)
            found = [v] * max(1, len(node.users)) if isinstance(v, torch.Tensor) else []
        for t in found:
            uses[id(t)] = uses.get(id(t), 0) + 1
    return {k for k, n in uses.items() if n == 1}


def _mix_edges(spec: LayerSpec, e: torch.Tensor) -> torch.Tensor:
    """``A * dT/dA`` of a per-image pattern summed over images, as the layer's ``(out, in/groups)`` block."""
    if spec.call["right"]:  # v @ pattern: the pattern's columns are the output units
        e = e.transpose(-1, -2)
    return e.reshape(spec.size, -1)


def _per_head(heads: int, forward: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor,
              b: torch.Tensor | None) -> torch.Tensor:
    """A dense layer over heads folded into the batch (row ``r`` holds head ``r % heads``), run
    once per head with that head's slice of the tiled weight (and bias): the same values as the
    model's one call, and a gradient per head in the tiled leaf."""
    o = w.shape[0] // heads
    rows = x.unflatten(0, (-1, heads))
    out = [forward(rows[:, k], w[k * o:(k + 1) * o], None if b is None else b[k * o:(k + 1) * o]) for k in range(heads)]
    return torch.stack(out, 1).flatten(0, 1)
