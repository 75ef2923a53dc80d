"""The op rules: how every op that keeps units enters the graphs. One entry per kind of op.

Attribution is gradient x input, evaluated on a *locally linearised* network: for each op
that is not linear in its data we name what is held constant in the backward pass (the
forward pass never changes). The network is then linear in the image plus constant terms,
so ``x * dT/dx`` is complete and conserved exactly; every constant goes to the
``bias_attribution`` of the unit where it enters.

Each :class:`Rule` says, for one kind of per-unit op (a :class:`ChainOp` on a layer):

- ``scale(op)``: its data-independent factor per unit, folded into the weight connectome
  (BatchNorm's ``gamma / sqrt(var + eps)``, a layer scale), or None;
- ``constant(op, ctx)``: the constant part ``c`` of its output (per element, broadcastable,
  or :class:`Terms` of broadcast factors), whose flow ``c * dT/dy`` is a bias term of the
  unit, or None;
- ``forward(op, x, y, ctx)``: the linearised forward used for attribution, given the op's
  input ``x`` and its true output ``y``; None when the op is exact as it is (piecewise
  linear or affine).

The rules (``name`` is what ``meta["rules"]`` lists; which ops use each is declared in the op
registry, :mod:`connectome.extract.ops`):

==================== ================================================ ==========================
kind                 op                                               held constant
==================== ================================================ ==========================
bn                   BatchNorm in eval mode (module or F.batch_norm)  nothing (affine)
affine               products and sums with parameters or buffers     nothing (affine)
shift / scale        ``x + c``, ``x * a`` with numbers, ``-x``        nothing (affine)
clamp                ReLU6, hardtanh, clamp                           nothing (piecewise linear)
pad                  constant padding with a non-zero value           nothing (affine)
const_cat            constants joined along positions (class token)   nothing (affine)
gate                 ``x * s`` with ``s`` data-dependent, broadcast   ``s`` (signal takes all)
smooth               SiLU, GELU, sigmoid, tanh, erf, ``x ** c`` ...   ``r = (f(x) - f(0)) / x``
norm                 LayerNorm, GroupNorm                             mean and standard deviation
                     RMSNorm (``F.rms_norm``), ``F.normalize``        the root mean square / norm
attention            ``softmax(q k^T / sqrt(d)) v``                   the pattern (CP-LRP)
pattern              hand-written ``softmax(...) @ v`` (einsum, bmm)  the pattern (CP-LRP)
product              ``a * b``, two full-size data tensors (a layer)  for ``a``'s half ``b``, for
                                                                      ``b``'s half ``a`` (AttnLRP
                                                                      uniform rule)
mix                  ``softmax(...) @ v`` over v's units (XCA; a      the per-image matrix
                     layer: a per-image dense map between units)      (CP-LRP)
==================== ================================================ ==========================

The product rule writes ``a * b`` as ``0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)``: the
same value to the last bit, and each operand passes on half of the product's flow,
``a * dT/da = b * dT/db = 0.5 * a * b * dT/dy``; its two identity edges carry those halves.

Ops that are linear in the data with no constant need no rule: they keep or move units and
``x * dT/dx`` passes through them exactly, holding nothing constant. Besides the layout ops
(permute, view, ...): positions folded into the batch dim and back (a window partition:
``Units.windows`` rows per image, summed into their image per sample; heads folded into the
batch, ``(B * heads, tokens, head_dim)``: the rows of an image are then unit slots, row ``r``
holding head ``r % windows``), ``Tensor.unfold`` into sliding windows (HaloNet's halo blocks:
copies of positions), ``torch.cat`` along
positions and ``torch.stack`` (a concat layer whose operands fill all its units at their own
positions), ``unfold`` (units = channels, each over its kernel offsets) and ``fold``,
``F.interpolate`` / ``nn.Upsample``, sums over positions, and maxima over positions
(``amax``; ``x.max(dim).values`` is traced as one, a max pool written by hand), and sums
over a dim that holds units beside another (ResNeSt's radix groups: an add layer of the slices).

What a rule holds constant needs no units: the ops that only compute a gate's signal or an
attention's queries and keys are left unmapped when they mix units (a softmax across a
selective kernel's branches, an RMS norm across channels written by hand, rotary embeddings
of q and k, an attention mask computed from q: SAM's relative positions, part of the pattern),
and the queries or keys may be constants (an attention-pooling probe).

References
----------
Ali, A. et al. (2022). XAI for Transformers: Better Explanations through Conservative
Propagation. ICML (holding gates and normalisation statistics constant).
Achtibat, R. et al. (2024). AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers. ICML (the identity rule for element-wise non-linearities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from connectome.extract.attention import attend

__all__ = ["ChainOp", "Rule", "RULES", "Terms", "frozen", "product_forward"]


@dataclass
class ChainOp:
    """A per-unit op on a layer: kind (a key of :data:`RULES`), its fx node, its data input."""

    node: str
    kind: str
    input_node: str
    params: tuple[Any, ...] = ()


@dataclass
class RunContext:
    """What a rule may read while the accumulator runs a batch."""

    kept: dict[str, Any]  # values of kept fx nodes
    stash: dict[str, Any]  # constants that linearised forwards saved, by node (tensors or Terms)


@dataclass(frozen=True)
class Rule:
    kind: str
    name: str  # what meta["rules"] lists; "" for ops that need no rule (affine, piecewise linear)
    scale: Callable[[ChainOp], Any] | None = None
    constant: Callable[[ChainOp, RunContext, torch.Tensor], Any] | None = None
    forward: Callable[[ChainOp, torch.Tensor, torch.Tensor, RunContext], torch.Tensor] | None = None
    weight_note: str = ""  # what the weight connectome does with it, when not folded (its meta["not_folded"])
    #: its constant part is a parameter or number, the same every batch (computed once per run)
    fixed_constant: bool = False
    #: its data input is named by the rule (the other operands are held constant), not inferred
    named_input: bool = False
    #: linearised by running the op with one operand (``params[0]``) detached: a gate, a pattern
    detached_operand: bool = False
    #: an attention rule: its pattern must not mix the units of v
    attention: bool = False
    #: its constant part reads the op's input value (kept while the batch runs)
    reads_input: bool = False
    #: element-wise non-linear: listed in ``meta["nonlinear_ops"]``
    nonlinear: bool = False
    #: its scale is a vector along dim 1 of the value (per channel, or per feature of a flattened map)
    channel_scale: bool = False


class _Frozen(torch.autograd.Function):
    """Value ``y``, gradient ``s * t * dT/dy`` for ``x`` (``t`` optional): one op forward, one or
    two products backward (two broadcast factors, rather than one full-size product kept)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(s, t)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        s, t = ctx.saved_tensors
        out = g * s
        return (out if t is None else out.mul_(t)), None, None, None


class _Identity(torch.autograd.Function):
    """The identity rule: value ``f(x)``, gradient ``r * dT/dy`` with ``r = (f(x) - f(0)) / x``
    (0 where x is 0), computed only in the backward pass from the saved ``x`` and ``f(x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, f0: float) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        ctx.f0 = f0
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, y = ctx.saved_tensors
        # g * (y - f0) / x in one buffer, then 0 where x is 0 (0/0 there, and nothing flows
        # through a zero input): four passes, where two torch.where over full-size ones and
        # zeros took nine and three more allocations
        r = torch.div(y - ctx.f0 if ctx.f0 != 0 else y, x)
        r.mul_(g)
        return r.masked_fill_(x == 0, 0.0), None, None


def frozen(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` in the forward pass, ``dy/dx = s`` (times ``t``) in the backward pass (held constant).

    The value is ``y`` to the last bit; only the gradient changes. Written as an autograd
    function rather than ``y.detach() + (x*s - (x*s).detach())``, which builds three full-size
    temporaries per op in the forward pass.
    """
    return _Frozen.apply(x, _held(y), _held(s), None if t is None else _held(t))


def _held(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a constant: detached only where it has an autograd record (most held values are
    computed without one: a detach per op is an op dispatched per op and batch)."""
    return t.detach() if t.requires_grad else t


class _ValueOf(torch.autograd.Function):
    """Value ``y`` (held), gradient passed to ``lin`` as it is: ``y + (lin - lin.detach())`` in
    one op rather than three (the same value to the last bit)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, g


class Terms(tuple):
    """A constant written as a sum of products of broadcast factors, ``sum(prod(term))``
    (None factors are left out): its flow ``c * dT/dy`` is summed per unit term by term
    without building ``c`` (:meth:`connectome.extract.unit_sums.UnitView.product_sum`)."""


# ----------------------------------------------------------------------------- constants
def _bn_constant(op: ChainOp, ctx: RunContext, like: torch.Tensor) -> torch.Tensor:
    # per channel, or per feature for a BatchNorm1d over flattened positions
    return op.params[1].to(like.device).reshape(1, -1, *([1] * (like.dim() - 2)))


def _clamp_constant(op: ChainOp, ctx: RunContext, like: torch.Tensor) -> torch.Tensor:
    # where the op saturates its output is the constant bound; torch's clamp backward passes
    # no gradient at the bound itself, so a value sitting exactly on a bound is constant too
    u = ctx.kept[op.input_node]
    lo, hi = op.params
    const = torch.zeros_like(u)
    if hi is not None:
        const = torch.where(u >= hi, torch.full_like(u, hi), const)
    if lo is not None:
        const = torch.where(u <= lo, torch.full_like(u, lo), const)
    return const


def _pad_constant(op: ChainOp, ctx: RunContext, like: torch.Tensor) -> torch.Tensor:
    pad, value = op.params  # the padded border holds the constant `value`
    border = F.pad(torch.zeros_like(ctx.kept[op.input_node]), pad, value=1.0)
    if math.isfinite(value):
        return value * border
    # an infinite border (timm pads with -inf before a max pool, which then never picks it): it
    # carries flow only where the target's gradient reaches it; elsewhere 0, not inf * 0 = NaN
    return torch.where((border != 0) & (like != 0), value, 0.0).to(border.dtype)


def _const_cat_constant(op: ChainOp, ctx: RunContext, like: torch.Tensor) -> torch.Tensor:
    dim, pieces = op.params  # the constant positions (a class token) among the data's positions
    c = torch.zeros_like(like)
    for offset, width, value in pieces:
        c.narrow(dim, offset, width).copy_(value.to(like.device, like.dtype).expand_as(c.narrow(dim, offset, width)))
    return c


def _stashed(op: ChainOp, ctx: RunContext, like: torch.Tensor) -> torch.Tensor | None:
    return ctx.stash.get(op.node)


# ----------------------------------------------------------------------------- linearised forwards
def _smooth_forward(op: ChainOp, x: torch.Tensor, y: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    # identity rule: f(x) = f(0) + x * r(x), r held constant (0/0 taken as 0)
    return _Identity.apply(x, _held(y), float(op.params[0]))


def _norm_forward(op: ChainOp, x: torch.Tensor, y: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    # statistics held constant: y = x * s * w + (b - mean * s * w), with s = 1 / std per token
    # (LayerNorm) or per image and group (GroupNorm), w and b the affine parameters per unit.
    # Both the slope and the constant stay factored: no tensor the size of x is built or kept.
    with torch.no_grad():  # the statistics, held constant: no autograd record, nothing to detach
        s, w = _norm_slope(op, x, ctx)
    return frozen(x, y, s, w)


def _norm_slope(op: ChainOp, xd: torch.Tensor, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The norm's slope per token (or image and group) and its weight per unit; the constant part
    stashed for the rule's ``constant``."""
    kind, shape_or_groups, weight, eps, bias = op.params
    x = xd
    if kind in ("rms", "lp"):
        # no mean taken out: y = x * s * w with s = 1 / rms over the normalised dims (RMSNorm)
        # or 1 / max(|x|_p, eps) along one dim (F.normalize); the constant part is 0
        if kind == "rms":
            dims = tuple(range(xd.dim() - len(shape_or_groups), xd.dim()))
            e = torch.finfo(xd.dtype).eps if eps is None else eps
            s = torch.rsqrt(xd.pow(2).mean(dims, keepdim=True) + e)
        else:
            p, dim = shape_or_groups
            s = 1.0 / xd.norm(p, dim, keepdim=True).clamp_min(eps)
        return s, (weight.to(x.device, s.dtype) if weight is not None else None)
    if kind == "layer":
        # the statistics LayerNorm itself takes, in its one fused pass (var_mean and rsqrt took 3x
        # as long on a CPU); the output it also writes is dropped
        _, mean, s = torch.native_layer_norm(xd, list(shape_or_groups), None, None, eps)
        if s.dtype != xd.dtype:  # float32 statistics of a bfloat16 / float16 tensor
            mean, s = mean.to(xd.dtype), s.to(xd.dtype)
        w = weight.to(x.device, s.dtype) if weight is not None else None
        b = bias.to(x.device, s.dtype) if bias is not None else None
    else:  # group norm over (C / G, *spatial) per group
        n, c = xd.shape[:2]
        g = int(shape_or_groups)
        var, mean = torch.var_mean(xd.reshape(n, g, -1), dim=-1, unbiased=False, keepdim=True)
        per_channel = lambda v: v.expand(n, g, c // g).reshape(n, c, *([1] * (xd.dim() - 2)))  # noqa: E731
        s, mean = per_channel(torch.rsqrt(var + eps)), per_channel(mean)
        unit = lambda v: v.to(x.device, s.dtype).reshape(1, c, *([1] * (xd.dim() - 2)))  # noqa: E731
        w = unit(weight) if weight is not None else None
        b = unit(bias) if bias is not None else None
    shift = -mean * s
    ctx.stash[op.node] = Terms(((b,), (shift, w)) if b is not None else ((shift, w),))
    return s, w


class DATA_MASK(str):
    """An attention mask computed from the data (the name of its fx node): part of the pattern,
    its value is read at each step."""


def attention_forward(op: ChainOp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention rule (CP-LRP; AttnLRP's conservative variant): the pattern
    ``softmax(q k^T / sqrt(d))`` held constant, so the output is linear in ``v``: each channel
    of ``v`` is mixed over tokens by the constant pattern, and ``q``, ``k`` get no gradient.

    ``op.params[2]`` is the number of heads of (batch, tokens, dim) tensors
    (:func:`connectome.extract.attention.attend`), or the keyword arguments of
    ``F.scaled_dot_product_attention`` on (..., tokens, head_dim) tensors; ``mask``: the
    mask's value at this step when it is computed from the data (:class:`DATA_MASK`).
    """
    how = op.params[2]
    if isinstance(how, int):
        heads = how
        n, t, e = q.shape
        d = e // heads
        split = lambda z: z.reshape(z.shape[0], z.shape[1], heads, d).transpose(1, 2)  # noqa: E731
        lin = (_pattern(split(q), split(k), None, False, None) @ split(v)).transpose(1, 2).reshape(n, t, v.shape[-1])
        with torch.no_grad():
            y = attend(q, k, v, heads)
    else:
        how = dict(how, attn_mask=mask.detach()) if isinstance(how["attn_mask"], DATA_MASK) else how
        lin = _pattern(q, k, how["attn_mask"], how["is_causal"], how["scale"]) @ v
        with torch.no_grad():
            y = F.scaled_dot_product_attention(q, k, v, **{kk: vv for kk, vv in how.items() if vv is not None})
    return _ValueOf.apply(y, lin)


def product_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product rule (AttnLRP's uniform rule): ``a * b`` with each operand linearised while
    the other is held constant, half the product to each. The value is ``a * b`` exactly (two
    equal halves add up without rounding)."""
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def _pattern(q: torch.Tensor, k: torch.Tensor, mask: Any, causal: bool, scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask), computed from detached q and k: a constant."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():  # no autograd record: nothing to detach
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        if mask is not None:
            mask = mask.to(s.device)
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
        return torch.softmax(s, dim=-1)


# ----------------------------------------------------------------------------- the table
def _vector_scale(op: ChainOp) -> Any:
    return op.params[0]


_ATTENTION_RULE = "attention: the pattern softmax(q k^T / sqrt(d)) held constant (CP-LRP)"

RULES: dict[str, Rule] = {
    r.kind: r
    for r in (
        Rule("bn", "", scale=_vector_scale, constant=_bn_constant, fixed_constant=True, channel_scale=True),
        Rule("affine", "", scale=_vector_scale, constant=lambda op, ctx, like: op.params[1], fixed_constant=True),
        Rule("shift", "", constant=lambda op, ctx, like: op.params[0], fixed_constant=True),
        Rule("scale", "", scale=_vector_scale),
        Rule("clamp", "", constant=_clamp_constant, reads_input=True),
        Rule("pad", "", constant=_pad_constant, reads_input=True),
        Rule("const_cat", "", constant=_const_cat_constant),
        Rule("gate", "gate: the data-dependent factor held constant (signal takes all)",
             weight_note="a gate multiplies by data: not folded into weights", named_input=True, detached_operand=True),
        Rule("smooth", "identity rule: f(x) = f(0) + x * r(x), r held constant",
             constant=lambda op, ctx, like: op.params[0] if op.params[0] != 0 else None, forward=_smooth_forward,
             weight_note="element-wise, not folded", nonlinear=True),
        Rule("attention", _ATTENTION_RULE, weight_note="token mixing has no weights: V's units pass through",
             named_input=True, attention=True),
        Rule("pattern", _ATTENTION_RULE, weight_note="token mixing has no weights: V's units pass through",
             named_input=True, detached_operand=True, attention=True),
        Rule("window", _ATTENTION_RULE, weight_note="Swin's window attention: token mixing has no weights",
             named_input=True),
        Rule("norm", "normalisation: mean and standard deviation held constant", constant=_stashed,
             forward=_norm_forward, weight_note="statistics depend on data: not folded"),
        Rule("product", "product: each operand linearised with the other held constant, half the flow to each "
                        "(AttnLRP uniform rule)", weight_note="identity edges of weight 1"),
        Rule("mix", "attention across channels: the per-image pattern held constant (CP-LRP), a dense map "
                    "between units", weight_note="a per-image matrix: no weights, uniform 1/width"),
    )
}

