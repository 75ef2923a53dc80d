"""Attribution flows: exact functional connectomes from one forward and one backward pass.

For a target scalar ``T`` (a class logit) and a piecewise-linear network in eval mode, the
contribution of unit ``i`` to unit ``j`` through the kernel ``W[j, i]``, summed over
positions and images, is ``E[j, i] = sum_k W[j,i,k] * dT/dW[j,i,k]``: every edge of every
layer comes out of one backward pass (``W * dW``, reduced over the kernel). Identity edges
(residual adds, concats) carry ``x_i * dT/dx_i`` of the operand they copy.

Node attributes, summed over images and positions:

- ``attribution``: ``A * dT/dA``, with ``A`` the value the unit passes on (after BatchNorm
  and the nonlinearity); for the input layer ``A`` is the image;
- ``bias_attribution``: the bias (conv/linear bias + folded BatchNorm shift) times
  ``dT/db``, plus the constant part of clipped activations (ReLU6, hardtanh, clamp) times
  their gradient, so that ``sum(in E) + bias_attribution == attribution == sum(out E)``
  and ``sum(input attribution) + sum(bias_attribution) == sum(T)``.

Ops that are not piecewise linear (SiLU, GELU, sigmoid ...) break these identities; the
gap is reported as ``meta["completeness_residual"]``, never hidden.

References
----------
Olah et al. (2020), "Zoom In: An Introduction to Circuits", Distill.
Selvaraju et al. (2017), "Grad-CAM" (gradient x activation as channel importance).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from connectome.errors import ConnectomeError, DataError
from connectome.extract._model import (check_model, eval_mode, model_dtype, model_on, no_inplace, precision_meta,
                                       precision_mode, resolve_device, resolve_precision, run_precision)
from connectome.extract.build import assemble, graph_layers
from connectome.extract.data import dataset_targets, make_loader, subset_loader, unpack_batch, warn_skipped
from connectome.extract.trace import LayerSpec, UnitGraph, run_nodes, trace_units
from connectome.graph import Connectome

__all__ = ["attribution", "attribution_by_category", "FlowAccumulator"]

# Positional index of the `inplace` argument of functional ops, to switch it off.
_INPLACE_POS = {F.relu: 1, F.relu6: 1, F.hardtanh: 3, F.leaky_relu: 2, F.dropout: 3, F.elu: 2,
                F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.selu: 1, F.celu: 2, F.mish: 1}
_PER_SAMPLE_BUDGET = 1 << 26  # elements of scratch per chunk (~256 MB in float32)


def _channel_sum(t: torch.Tensor, units: int) -> torch.Tensor:
    """Sum over batch and positions per unit: (N, C, ...) or flattened (N, C*P) -> (C,) float64.

    The reduction runs in the tensor's own dtype (a float64 reduction of a float32 tensor is
    several times slower on CPUs; torch's cascade summation keeps float32 sums to ~1e-7
    relative) and only the per-unit result is widened for accumulation.
    """
    return t.reshape(t.shape[0], units, -1).sum(dim=(0, 2)).double()


def _per_image_channel_sum(t: torch.Tensor, units: int) -> torch.Tensor:
    return t.reshape(t.shape[0], units, -1).sum(dim=2).double()


class FlowAccumulator:
    """Runs batches through a traced model and accumulates flows on the device.

    Everything stays on the device in float64 until :meth:`to_graph`: no host sync in the
    batch loop. Usable directly for custom loops; to combine accumulators of several
    processes use :func:`connectome.extract.distributed.all_reduce_accumulator` (it also
    takes the maximum of ``act_max`` and sums ``n_images``).
    """

    def __init__(self, ug: UnitGraph, device: torch.device, dtype: torch.dtype, per_sample: bool = False,
                 amp: bool = False):
        self.ug, self.device, self.dtype = ug, device, dtype
        self.per_sample, self.amp = per_sample, amp
        self.modules = dict(ug.gm.named_modules())
        self.spec_of = {s.node: (i, s) for i, s in enumerate(ug.layers)}
        keep: set[str] = set()
        grad: list[str] = []
        for li, s in enumerate(ug.layers):
            if s.kind != "input":
                keep.add(s.out_node)
                grad.append(s.out_node)
            if s.kind in ("residual", "concat"):
                keep.add(s.node)
                grad.append(s.node)
                keep.update(op.node for op in s.operands)
            if s.kind in ("conv", "linear") and per_sample:
                keep.add(s.node)
                grad.append(s.node)
                keep.add(s.operands[0].node)
            for op in s.bias_ops:
                if op.kind in ("bn", "shift", "clamp", "pad"):
                    keep.add(op.node)
                    grad.append(op.node)
                if op.kind in ("clamp", "pad"):
                    keep.add(op.input_node)
        self.keep = keep
        self.grad_nodes = list(dict.fromkeys(grad))
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.edges: dict[int, Any] = {}
        self.abs_edges: dict[int, Any] = {}
        self.attr = [z(s.size) for s in ug.layers]
        self.bias = [z(s.size) for s in ug.layers]
        self.act_sum = [z(s.size) for s in ug.layers]
        self.act_sq = [z(s.size) for s in ug.layers]
        self.act_max = [torch.full((s.size,), -math.inf, dtype=torch.float64, device=device) for s in ug.layers]
        self.active = [z(s.size) for s in ug.layers]
        self.target_total = z(1)
        self.n_images = 0
        self._bn_shift = {op.node: op.params[1].to(device=device, dtype=torch.float64)
                          for s in ug.layers for op in s.bias_ops if op.kind == "bn"}

    # ------------------------------------------------------------------ running
    def _override(self, leaves: dict[int, tuple[torch.Tensor, torch.Tensor | None]]):
        spec_of, modules = self.spec_of, self.modules

        def override(node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
            hit = spec_of.get(node.name)
            if hit is not None and hit[1].kind in ("conv", "linear"):
                li, spec = hit
                if node.op == "call_module":
                    m = modules[node.target]
                    w = m.weight.detach().requires_grad_(True)
                    b = m.bias.detach().requires_grad_(True) if m.bias is not None else None
                    leaves[li] = (w, b)
                    if isinstance(m, nn.Conv2d):
                        return m._conv_forward(args[0], w, b)
                    return F.linear(args[0], w, b)
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
            # Saved values must not be overwritten: run in-place ops out of place.
            if node.op == "call_function":
                if kwargs.get("inplace"):
                    return node.target(*args, **{**kwargs, "inplace": False})
                pos = _INPLACE_POS.get(node.target)
                if pos is not None and len(args) > pos and args[pos] is True:
                    args = list(args)
                    args[pos] = False
                    return node.target(*args, **kwargs)
            elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                    and not node.target.startswith("_"):
                return getattr(args[0], node.target[:-1])(*args[1:], **kwargs)
            return NotImplemented

        return override

    def step(self, x: torch.Tensor, target_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Accumulate the flows of one batch of images ``x`` for the targets ``target_fn(logits)``."""
        ug = self.ug
        x = x.to(self.device, dtype=self.dtype, non_blocking=True).detach().requires_grad_(True)
        leaves: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        # In-place activations would overwrite the values kept for the flows.
        with torch.enable_grad(), no_inplace(ug.gm):
            with amp:
                out, kept = run_nodes(ug.gm, (x,), override=self._override(leaves), keep=self.keep)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            t = target_fn(logits)
            if t.shape != (logits.shape[0],):
                raise ConnectomeError(
                    f"the target must give one value per image, shape ({logits.shape[0]},); got {tuple(t.shape)}"
                )
            total = t.sum()
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
                elif kind == "w":
                    spec = ug.layers[key]
                    prod = tensor * gr
                    if spec.kind == "linear":
                        e = prod.reshape(prod.shape[0], -1, spec.operands[0].group).sum(-1).double()
                    else:
                        e = prod.reshape(prod.shape[0], prod.shape[1], -1).sum(-1).double()
                    self.edges[key] = e if key not in self.edges else self.edges[key] + e
                elif kind == "b":
                    self.bias[key] += tensor.double() * gr.double()
                else:
                    g_node[key] = gr
            self._nodes(x, g_x, kept, g_node)
            self.target_total += t.detach().sum(dtype=torch.float64)
            self.n_images += int(x.shape[0])

    def _nodes(self, x: torch.Tensor, g_x: torch.Tensor | None, kept: dict[str, Any], g: dict[str, torch.Tensor]) -> None:
        ug = self.ug
        n = x.shape[0]
        for li, s in enumerate(ug.layers):
            A = x if s.kind == "input" else kept[s.out_node]
            gA = g_x if s.kind == "input" else g.get(s.out_node)
            if gA is not None:
                self.attr[li] += _channel_sum(A * gA, s.size)
            # activation statistics: spatial mean per image
            m = A.detach().reshape(n, s.size, -1).mean(-1).double()
            self.act_sum[li] += m.sum(0)
            self.act_sq[li] += (m * m).sum(0)
            self.act_max[li] = torch.maximum(self.act_max[li], m.max(0).values)
            self.active[li] += (m > 0).sum(0, dtype=torch.float64)
            on_chain = set(s.chain)
            for op in s.bias_ops:
                gv = g.get(op.node)
                if gv is None or op.kind == "scale":
                    continue
                if op.kind == "bn":
                    # per channel, or per feature for a BatchNorm1d over flattened positions
                    shift = self._bn_shift[op.node].to(gv.dtype)
                    term = _channel_sum(gv * shift.reshape(1, -1, *([1] * (gv.dim() - 2))), s.size)
                elif op.kind == "pad":
                    # the padded border holds the constant `value`
                    pad, value = op.params
                    border = F.pad(torch.zeros_like(kept[op.input_node]), pad, value=1.0)
                    term = value * _channel_sum(border * gv, s.size)
                elif op.kind == "shift":
                    term = op.params[0] * _channel_sum(gv, s.size)
                else:  # clamp: where the op saturates, its output is the constant bound
                    u = kept[op.input_node]
                    lo, hi = op.params
                    const = torch.zeros_like(u)
                    # torch's clamp backward passes no gradient at the bound itself, so a
                    # value sitting exactly on a bound is constant too
                    if hi is not None:
                        const = torch.where(u >= hi, torch.full_like(u, hi), const)
                    if lo is not None:
                        const = torch.where(u <= lo, torch.full_like(u, lo), const)
                    term = _channel_sum(const * gv, s.size)
                self.bias[li] += term
                if op.node not in on_chain:
                    # Constant parts after the unit's branch point reach its consumers too.
                    self.attr[li] += term
            if s.kind in ("residual", "concat"):
                go = g.get(s.node)
                vals, absv = [], []
                for op in s.operands:
                    xo = kept[op.node]
                    c = xo.shape[1]
                    if go is None:
                        vals.append(torch.zeros(c, dtype=torch.float64, device=self.device))
                        absv.append(vals[-1])
                        continue
                    gs = go[:, op.offset : op.offset + c]
                    per = _per_image_channel_sum(xo * gs, c)
                    if op.sign != 1.0:  # the subtracted operand of a residual `a - b`
                        per = per * op.sign
                    vals.append(per.sum(0))
                    absv.append(per.abs().sum(0))
                self._add_identity(li, vals, absv)
            elif s.kind in ("conv", "linear") and self.per_sample:
                gz = g.get(s.node)
                if gz is not None:
                    e = self._per_sample_abs(li, s, kept[s.operands[0].node], gz)
                    self.abs_edges[li] = e if li not in self.abs_edges else self.abs_edges[li] + e

    def _add_identity(self, li: int, vals: list[torch.Tensor], absv: list[torch.Tensor]) -> None:
        if li not in self.edges:
            self.edges[li] = vals
            self.abs_edges[li] = absv
        else:
            self.edges[li] = [a + b for a, b in zip(self.edges[li], vals)]
            self.abs_edges[li] = [a + b for a, b in zip(self.abs_edges[li], absv)]

    def _weight(self, s: LayerSpec) -> torch.Tensor:
        from connectome.extract.trace import layer_weight

        cache = self.__dict__.setdefault("_weights", {})
        if s.name not in cache:  # looked up once per run, not per batch
            w, _ = layer_weight(self.ug, s)
            cache[s.name] = w.detach().to(self.device)
        return cache[s.name]

    def _per_sample_abs(self, li: int, s: LayerSpec, x: torch.Tensor, gz: torch.Tensor) -> torch.Tensor:
        """sum over images of |E_n| for a conv/linear layer, chunked to bound memory."""
        w = self._weight(s).to(gz.dtype)
        n = x.shape[0]
        x = x.to(gz.dtype)
        if s.kind == "linear":
            grp = s.operands[0].group
            o = w.shape[0]
            c = w.shape[1] // grp
            wv = w.reshape(o, c, grp)
            per = max(1, _PER_SAMPLE_BUDGET // max(1, o * c))
            out = torch.zeros(o, c, dtype=torch.float64, device=self.device)
            for a in range(0, n, per):
                xs = x[a : a + per].reshape(-1, c, grp)
                e = torch.einsum("ncs,ocs->noc", xs, wv) * gz[a : a + per, :, None]
                out += e.abs().sum(0, dtype=torch.float64)
            return out
        call = s.call
        groups = call["groups"]
        k = tuple(call["kernel_size"])
        pad, stride, dil = call["padding"], call["stride"], call["dilation"]
        if call.get("padding_mode", "zeros") != "zeros" or isinstance(pad, str):
            x, pad = _explicit_pad(x, call, k)
        o, cg = w.shape[0], w.shape[1]
        og = o // groups
        K = int(np.prod(k))
        L = gz.shape[2] * gz.shape[3]
        per_img = o * cg * K + x.shape[1] * K * L
        per = max(1, _PER_SAMPLE_BUDGET // per_img)
        wv = w.reshape(groups, og, cg, K)
        out = torch.zeros(groups, og, cg, dtype=torch.float64, device=self.device)
        for a in range(0, n, per):
            xs = x[a : a + per]
            b = xs.shape[0]
            if K == 1 and _is_zero(pad):
                # a 1x1 conv reads each position once: strided view instead of an im2col copy
                st = (stride, stride) if isinstance(stride, int) else tuple(stride)
                U = xs[:, :, :: st[0], :: st[1]].reshape(b, groups, cg, L)
            else:
                U = F.unfold(xs, k, dilation=dil, padding=pad, stride=stride).reshape(b, groups, cg * K, L)
            G = gz[a : a + per].reshape(b, groups, og, L)
            P = torch.einsum("ngol,ngkl->ngok", G, U).reshape(b, groups, og, cg, K)
            E = torch.einsum("ngock,gock->ngoc", P, wv)
            out += E.abs().sum(0, dtype=torch.float64)
        return out.reshape(o, cg)

    # ------------------------------------------------------------------ results
    def state(self) -> list[torch.Tensor]:
        """The summed accumulators as a flat list of tensors (``act_max`` and ``n_images`` aside)."""
        out: list[torch.Tensor] = []
        for li in sorted(self.edges):
            v = self.edges[li]
            out.extend(v if isinstance(v, list) else [v])
        for li in sorted(self.abs_edges):
            v = self.abs_edges[li]
            out.extend(v if isinstance(v, list) else [v])
        return out + self.attr + self.bias + self.act_sum + self.act_sq + self.active + [self.target_total]

    def to_graph(self, labels: Sequence[str] | None, meta: dict[str, Any]) -> Connectome:
        ug = self.ug
        if self.n_images == 0:
            raise DataError("no images were processed; the data is empty (or every image failed to decode)")
        cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
        values: dict[int, Any] = {}
        absv: dict[int, Any] = {}
        for li, s in enumerate(ug.layers):
            if s.kind == "input":
                continue
            if s.kind in ("conv", "linear"):
                if li in self.edges:
                    values[li] = cpu(self.edges[li])
                else:  # the layer got no gradient (it does not reach the target)
                    w = self._weight(s)
                    shape = (w.shape[0], w.shape[1] // s.operands[0].group if s.kind == "linear" else w.shape[1])
                    values[li] = np.zeros(shape)
                absv[li] = cpu(self.abs_edges[li]) if li in self.abs_edges else np.zeros_like(values[li])
            else:
                if li in self.edges:
                    values[li] = [cpu(v) for v in self.edges[li]]
                    absv[li] = [cpu(v) for v in self.abs_edges[li]]
                else:
                    values[li] = [np.zeros(ug.layers[op.layer].size) for op in s.operands]
                    absv[li] = values[li]
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
            "exact": not nonlinear,
            "nonlinear_ops": nonlinear,
            "per_sample": self.per_sample,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        extra = {"abs_weight": absv} if self.per_sample else None
        return assemble(ug, graph_layers(ug, labels), values, extra=extra, node_attrs=node_attrs, meta=meta)


def _is_zero(pad: Any) -> bool:
    return pad == 0 or pad == "valid" or (isinstance(pad, (tuple, list)) and all(p == 0 for p in pad))


def _explicit_pad(x: torch.Tensor, call: dict[str, Any], k: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    pad = call["padding"]
    dil = call["dilation"]
    dil = (dil, dil) if isinstance(dil, int) else tuple(dil)
    if pad == "valid":
        return x, 0
    if pad == "same":
        tot = [d * (kk - 1) for d, kk in zip(dil, k)]
        p = (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2)
    else:
        pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
        p = (pad[1], pad[1], pad[0], pad[0])
    mode = call.get("padding_mode", "zeros")
    mode = "constant" if mode == "zeros" else mode
    return F.pad(x, p, mode=mode), 0


# ----------------------------------------------------------------------------- targets
def _target_fn(target: Any, n_out: int, classes: Sequence[str] | None) -> tuple[Callable[..., torch.Tensor], Any]:
    """(fn(logits, labels) -> (N,), resolved class index or None)."""
    if isinstance(target, str) and target == "label":
        return (lambda logits, y: logits.gather(1, y[:, None]).squeeze(1)), None
    if isinstance(target, str) and target == "predicted":
        return (lambda logits, y: logits.gather(1, logits.detach().argmax(1, keepdim=True)).squeeze(1)), None
    if isinstance(target, str):
        names = list(classes) if classes else []
        if target.lstrip("-").isdigit():
            target = int(target)
        elif target in names:
            target = names.index(target)
        else:
            raise DataError(
                f"target {target!r} is not 'label', 'predicted', a class index or a class name"
                + (f" (classes: {names[:6]}...)" if names else "")
            )
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        c = int(target)
        if not 0 <= c < n_out:
            raise DataError(f"target class {c} does not exist; the output layer has {n_out} units (0..{n_out - 1})")
        return (lambda logits, y: logits[:, c]), c
    if callable(target):
        return (lambda logits, y: target(logits)), None
    raise DataError(f"target must be 'label', 'predicted', an int class, a class name or a callable; got {target!r}")


def _norm_name(s: str) -> str:
    return " ".join(str(s).replace("_", " ").split()).lower()


def _label_map(classes: Sequence[str] | None, out_labels: Sequence[str] | None, n_out: int) -> torch.Tensor | None:
    """Dataset label -> output unit, when the dataset's classes are not the output's units.

    A folder of two ImageNet classes has labels 0 and 1, which are not the model's units 0
    and 1: classes are matched to the output labels by name (case, spaces and underscores
    ignored), or read as unit numbers when they are digits ("281"). ``None``: labels are
    output units as they are.
    """
    if not classes:
        return None
    classes = [str(c) for c in classes]
    if out_labels is not None and list(out_labels) != classes:
        index = {_norm_name(s): i for i, s in enumerate(out_labels)}
        found = [index.get(_norm_name(c)) for c in classes]
        if all(i is not None for i in found):
            return torch.tensor(found, dtype=torch.long)
        if not all(c.isdigit() for c in classes):
            missing = [c for c, i in zip(classes, found) if i is None]
            raise DataError(
                f"categories {missing[:5]} are not among the model's {len(out_labels)} class names; name the folders "
                "after the output classes (or their unit numbers, e.g. '281')"
            )
    if len(classes) != n_out and all(c.isdigit() for c in classes):
        return torch.tensor([int(c) for c in classes], dtype=torch.long)
    return None


def _labels_for_output(labels: Sequence[str] | None, classes: Sequence[str] | None, n_out: int) -> list[str] | None:
    if labels is not None:
        labels = [str(s) for s in labels]
        if len(labels) != n_out:
            raise ValueError(f"labels has {len(labels)} names for {n_out} output units")
        return labels
    if classes is not None and len(classes) == n_out:
        return [str(s) for s in classes]
    return None


# ----------------------------------------------------------------------------- public API
def attribution(
    model: nn.Module,
    data: Any,
    target: Any = "label",
    *,
    per_sample: bool = False,
    layers: Sequence[str] | None = None,
    device: Any = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    labels: Sequence[str] | None = None,
    max_images: int | None = None,
    precision: str = "exact",
    amp: bool = False,
    progress: bool = True,
    name: str | None = None,
    category: str | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    _batch_hook: Callable[[int], None] | None = None,
) -> Connectome:
    """The attribution-flow connectome of a model for a set of images.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable classifier. Runs in eval mode (a model in training mode is switched
        for the run, with a warning, and restored); never moved: when ``device`` differs from
        the model's, a copy runs there.
    data : str, Path, Dataset, DataLoader, Tensor or (Tensor, Tensor)
        ImageFolder directory, dataset/loader of ``(image, label)``, or tensors.
    target : "label", "predicted", int, str or callable, default "label"
        Per image: the logit of its own label, of the predicted class, of a fixed class
        (index or class name), or ``callable(logits) -> (batch,)``.
    per_sample : bool, default False
        Also compute ``abs_weight`` per edge: the sum over images of ``|E|`` per image.
    layers : sequence of str, optional
        Contract the result onto these layers (module names), conserving flow.
    device : str or torch.device, optional
        ``None``: CUDA when available, else CPU.
    batch_size : int, default 64
        Images per step (ignored when ``data`` is a DataLoader).
    num_workers : int, optional
        Processes decoding an ImageFolder (or reading a Dataset); ``None``: one fewer than the
        CPUs, at most 8, for a folder of more than one batch. Tensors are sliced into batches
        (no collation, no workers); CPU tensors are pinned ahead of a CUDA run.
    transform : callable, optional
        For ImageFolder data; default resize, center crop 224, ImageNet normalisation.
    labels : sequence of str, optional
        Class names of the output units (default: the dataset's classes when they match).
        Dataset labels index the dataset's ``classes`` (the torchvision convention); with
        ``target="label"`` they are mapped to output units by class name when both lists are
        known and differ (case, spaces and underscores ignored), or by number when the
        classes are digits ("281"); otherwise label i is output unit i.
    max_images : int, optional
        Stop after this many images.
    precision : {"exact", "tf32", "bf16"}, default "exact"
        Arithmetic of a float32 model. ``"exact"``: IEEE float32 throughout; TF32 is switched
        off for the run (cuDNN uses it for float32 convolutions by default on Ampere and
        later GPUs, which breaks completeness by percents) and the caller's switches are
        restored afterwards. ``"tf32"``: TF32 matmuls and convolutions (about 1e-3 relative
        per product; faster on GPUs). ``"bf16"``: the forward pass in bfloat16 autocast
        (about 1e-2 relative). Either of the last two sets ``meta["exact"]`` False;
        conservation and completeness then hold only approximately
        (``meta["completeness_relative"]`` says how well). Every graph states
        ``meta["precision"]``, ``meta["expected_error"]`` (the relative distance of its flows
        to float64 flows to expect, an order of magnitude: 3e-4 exact, 1e-2 tf32, 6e-2 bf16)
        and ``meta["unit_roundoff"]``. Float64 models always run in float64.
    amp : bool, default False
        Same as ``precision="bf16"`` (kept for older code).
    progress : bool, default True
        Show a progress bar (images/s) on stderr.
    name, category : str, optional
        ``meta["model"]`` and ``meta["category"]``.
    checkpoint : str or Path, optional
        Folder for resumable runs: every ``checkpoint_every`` batches each process saves its
        sums and position to ``rank{r}.pt`` (atomically). Started again with the same
        arguments, a killed run skips the batches done and ends with exactly the result of
        an uninterrupted run; a checkpoint of other arguments is refused. Kept, marked
        complete, at the end (a rerun then returns at once; delete the folder to recompute).
    checkpoint_every : int, default 50
        Batches between checkpoints.

    Returns
    -------
    Connectome
        Edge ``weight`` = flow ``E``; node attributes ``attribution``, ``bias_attribution``,
        ``activation_mean``, ``activation_std``, ``activation_max``, ``frequency``; with
        ``per_sample`` the edge column ``abs_weight``.

    Raises
    ------
    DataError
        Empty data, labels out of range, unknown target class, undecodable images only.
    ConnectomeError
        ``device="cuda"`` without a GPU; a batch that runs out of GPU memory.
    ExtractionError
        The model cannot be traced or mapped to units.
    BadFileError
        A checkpoint file that is corrupted or not a checkpoint.

    Notes
    -----
    Under ``torchrun`` (an initialised default process group with several processes) each
    process reads its shard of the data, ``range(n)[rank::world_size]``, on its own device
    (``cuda:LOCAL_RANK`` for ``device=None`` or ``"cuda"``); the sums are combined once at the
    end with ``all_reduce`` and every process returns the same Connectome. Such runs (and
    checkpointed ones) read the dataset in its own order and ``max_images`` takes its first
    items. See :mod:`connectome.extract.distributed`.
    """
    check_model(model)
    precision = resolve_precision(precision, amp)
    if max_images is not None and (int(max_images) != max_images or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}")
    info = make_loader(data, batch_size=batch_size, num_workers=num_workers, transform=transform,
                       pin_memory=resolve_device(device).type == "cuda")
    return _attribution(model, info, target, per_sample=per_sample, layers=layers, device=device, labels=labels,
                        max_images=max_images, precision=precision, progress=progress, name=name, category=category,
                        checkpoint=checkpoint, checkpoint_every=checkpoint_every, _batch_hook=_batch_hook)


def _attribution(model: nn.Module, info: Any, target: Any = "label", *, per_sample: bool = False,
                 layers: Sequence[str] | None = None, device: Any = None, labels: Sequence[str] | None = None,
                 max_images: int | None = None, precision: str = "exact", amp: bool = False, progress: bool = True,
                 name: str | None = None, category: str | None = None, checkpoint: Any = None,
                 checkpoint_every: int = 50, _batch_hook: Callable[[int], None] | None = None,
                 category_label: int | None = None) -> Connectome:
    from connectome.extract.distributed import rank_device, rank_world

    check_model(model)
    precision = resolve_precision(precision, amp)
    dev = rank_device(resolve_device(device))
    acc, t_info = _accumulate(model, info, target, dev, per_sample, precision, progress, max_images, labels,
                              batch_hook=_batch_hook, category=category, checkpoint=checkpoint,
                              checkpoint_every=checkpoint_every, category_label=category_label)
    g = acc.to_graph(t_info["labels"], {
        "model": name or type(model).__name__,
        "target": target if isinstance(target, (str, int)) else getattr(target, "__name__", "callable"),
        "target_class": t_info["target_class"] if t_info["target_class"] is not None else t_info.get("category_unit"),
        "category": category,
        "seconds": round(t_info["seconds"], 3),
        "skipped_images": len(t_info["skipped"]),
        "versions": _versions(),
    })
    # float32 flows computed in TF32 or bfloat16 are approximations, whatever the ops
    g = g.with_meta(exact=bool(g.meta["exact"]) and t_info["precision"] == "exact",
                    **precision_meta(t_info["precision"], acc.dtype))
    world = rank_world()[1]
    if world > 1:  # every process returns the same graph: no per-process device in it
        g = g.with_meta(device=dev.type, world_size=world)
    if layers:
        if "abs_weight" in g.edge_attrs:
            warnings.warn("layers=: the contracted graph has no abs_weight (per-image |flow| does not split "
                          "through dropped layers); contract the signed flows only", stacklevel=2)
        g = g.contract([_layer_name(g, l) for l in layers])
    return g


def _layer_name(g: Connectome, name: str) -> str:
    for l in g.layers:
        if l.name == name or l.module == name:
            return l.name
    raise ConnectomeError(f"no layer {name!r} to contract onto; layers are {g.layer_names[:8]}...")


def _accumulate(model, info, target, dev, per_sample, precision, progress, max_images, labels,
                batch_hook: Callable[[int], None] | None = None, category: str | None = None,
                category_label: int | None = None,
                checkpoint: Any = None, checkpoint_every: int = 50) -> tuple[FlowAccumulator, dict[str, Any]]:
    from tqdm.auto import tqdm

    from connectome.extract.distributed import ShardedRun, SkippedNames, rank_world

    t0 = time.perf_counter()
    m = model_on(model, dev)
    dtype = model_dtype(m)
    precision = run_precision(precision, dtype)
    amp = precision == "bf16"
    skipped = SkippedNames()  # counts every file, keeps a few names: memory does not grow with the data
    total = info.n_images if max_images is None else min(info.n_images or max_images, max_images)
    run = None  # this process's shard of a distributed run, and/or a run resumable from a checkpoint
    if checkpoint is not None or rank_world()[1] > 1:
        run = ShardedRun(info, m, dev, target=target, per_sample=per_sample, amp=amp, max_images=max_images,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, category=category)
        skipped, total, max_images = run.skipped, run.n, None  # the shards already stop at max_images
    scale = run.world if run is not None else 1  # rank 0's bar shows the whole job's images/s (about)
    desc = f"attribution {category}" if category else "attribution"
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress or (run is not None and run.rank != 0),
               leave=False, dynamic_ncols=True, initial=run.images_done if run is not None else 0)
    acc = None
    error: BaseException | None = None
    t_info: dict[str, Any] = {"labels": None, "target_class": None, "precision": precision}

    def start(x: torch.Tensor) -> tuple[FlowAccumulator, Callable[..., torch.Tensor], int]:
        ug = trace_units(m, x[:1].to(dev, dtype=dtype))
        n_out = ug.layers[ug.output_layer].size
        t_info["labels"] = _labels_for_output(labels, info.classes, n_out)
        fn, t_info["target_class"] = _target_fn(target, n_out, t_info["labels"] or info.classes)
        # labels index the dataset's classes (the torchvision convention); map them to output units
        t_info["label_map"] = _label_map(info.classes, t_info["labels"], n_out) if target == "label" else None
        if category_label is not None and target == "label":
            lm = t_info["label_map"]
            t_info["category_unit"] = int(lm[category_label]) if lm is not None and category_label < len(lm) \
                else int(category_label)
        acc = FlowAccumulator(ug, dev, dtype, per_sample=per_sample, amp=amp)
        if run is not None:
            run.restore(acc)
        return acc, fn, n_out

    try:
        with eval_mode(m), no_inplace(m), precision_mode(precision):
            seen = 0
            for bi, batch in enumerate(info.loader if run is None else run.loader,
                                       start=0 if run is None else run.start_batch):
                x, y, sk = unpack_batch(batch)
                skipped.extend(sk)
                if x is None:
                    if run is not None:
                        run.after_batch(acc, bi)
                    continue
                if max_images is not None and seen + x.shape[0] > max_images:
                    x = x[: max_images - seen]
                    y = y[: max_images - seen] if y is not None else None
                if acc is None:
                    acc, fn, n_out = start(x)
                lm = t_info.get("label_map")
                if y is not None and lm is not None:
                    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(lm)):
                        raise DataError(f"labels {int(y.min())}..{int(y.max())} do not index the dataset's {len(lm)} classes")
                    y = lm[y]
                if target == "label":
                    if y is None:
                        raise DataError("target='label' needs labels; the data has images only (pass (images, labels) or target=<class>)")
                    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_out):
                        raise DataError(
                            f"labels {int(y.min())}..{int(y.max())} are out of range of the output layer "
                            f"({n_out} units); map dataset labels to output units first"
                        )
                yd = y.to(dev, non_blocking=True) if y is not None else None
                try:
                    acc.step(x, lambda logits: fn(logits, yd))
                except torch.OutOfMemoryError:
                    raise ConnectomeError(
                        f"a batch of {x.shape[0]} images ran out of GPU memory; try batch_size={max(1, x.shape[0] // 2)}"
                        + (" or per_sample=False" if per_sample else "")
                    ) from None
                seen += x.shape[0]
                bar.update(x.shape[0] * scale)
                if run is not None:
                    run.after_batch(acc, bi)
                if batch_hook is not None:
                    batch_hook(bi)
                if max_images is not None and seen >= max_images:
                    break
            if run is not None and acc is None:
                # This shard is empty (or was done before a resume): trace on one image anyway,
                # so that this process holds accumulators of the right shapes for all_reduce.
                example = run.example()
                if example is not None:
                    acc, _, _ = start(example)
    except BaseException as exc:
        if run is None:
            raise
        error = exc  # raised below on every process, once they all know (none waits forever)
    finally:
        bar.close()
    if run is not None:
        t_info["seconds"] = run.finish(acc, error, time.perf_counter() - t0)
    warn_skipped(skipped)
    if acc is None:
        raise DataError(
            "no images could be read" + (f": all {len(skipped)} files failed to decode" if skipped else "; the data is empty")
        )
    t_info["skipped"] = skipped
    t_info.setdefault("seconds", time.perf_counter() - t0)
    return acc, t_info


def attribution_by_category(
    model: nn.Module,
    data: Any,
    target: Any = "label",
    *,
    categories: Sequence[str] | None = None,
    batch_size: int = 64,
    transform: Callable[[Any], Any] | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    **kwargs: Any,
) -> dict[str, Connectome]:
    """One attribution graph per image category, named by class name.

    Images are grouped by label (read from the dataset's ``targets`` without decoding
    images when available) and each group runs through :func:`attribution`; every image
    is read once.

    Parameters
    ----------
    model, data, target, batch_size, transform, progress
        As in :func:`attribution`.
    categories : sequence of str, optional
        Only these categories (class names).
    checkpoint : str or Path, optional
        Folder for a resumable run: one sub-folder per category (``<label>-<name>``), as in
        :func:`attribution`; categories finished before an interruption are not read again.
    checkpoint_every : int, default 50
        Batches between checkpoints.
    **kwargs
        Passed to :func:`attribution` (``per_sample``, ``device``, ``precision``, ``layers`` ...).

    Returns
    -------
    dict of str -> Connectome
        In class order; ``meta["category"]`` and ``meta["target_class"]`` set.

    Notes
    -----
    Under ``torchrun`` every process runs the categories in the same (class) order, each
    split across the processes as in :func:`attribution`, and returns the same graphs.
    """
    info = make_loader(data, batch_size=batch_size, transform=transform)
    ds = info.dataset
    targets = dataset_targets(ds)
    if targets is None:
        targets = []
        for batch in info.loader:
            _, y, _ = unpack_batch(batch)
            if y is None:
                raise DataError("attribution_by_category needs labels; the data has images only")
            targets.extend(int(v) for v in y.tolist())
    classes = info.classes or [str(c) for c in sorted(set(targets))]
    by_label: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_label.setdefault(int(t), []).append(i)
    names = {i: (classes[i] if i < len(classes) else str(i)) for i in by_label}
    if info.classes is not None and isinstance(data, (str, Path)):
        empty = [c for i, c in enumerate(info.classes) if i not in by_label]
        if empty:
            raise DataError(
                f"category folder(s) {empty} under {str(data)!r} hold no images; add images or remove the folders"
            )
    if categories is not None:
        unknown = [c for c in categories if c not in names.values()]
        if unknown:
            raise DataError(f"categories {unknown} are not in the data; it has {sorted(names.values())}")
    out: dict[str, Connectome] = {}
    for label in sorted(by_label):
        cname = names[label]
        if categories is not None and cname not in categories:
            continue
        sub_info = subset_loader(info, by_label[label], batch_size, num_workers=kwargs.get("num_workers"),
                                 pin_memory=resolve_device(kwargs.get("device")).type == "cuda")
        try:
            from connectome.extract.distributed import category_folder

            if checkpoint is not None and Path(checkpoint).exists() and not Path(checkpoint).is_dir():
                raise ConnectomeError(f"checkpoint {str(checkpoint)!r} is a file; give a folder for checkpoints")
            ck = None if checkpoint is None else Path(checkpoint) / category_folder(label, cname)
            g = _attribution(model, sub_info, target, progress=progress, category=cname, checkpoint=ck,
                             category_label=int(label),
                             checkpoint_every=checkpoint_every,
                             **{k: v for k, v in kwargs.items() if k != "num_workers"})
        except DataError as exc:
            raise DataError(f"category {cname!r}: {exc}") from None
        if g.meta.get("target_class") is None and target == "label":
            g = g.with_meta(target_class=int(label))
        out[cname] = g
    if not out:
        raise DataError("no category had images")
    return out


def _versions() -> dict[str, str]:
    import connectome

    return {"connectome": connectome.__version__, "torch": torch.__version__}
