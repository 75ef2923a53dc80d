"""Swin's shifted-window attention written out as layers of units.

torchvision computes a Swin block's attention in one opaque function
(``shifted_window_attention``: pad, cyclic shift, window partition, the ``qkv`` Linear,
attention with a relative position bias and the shift mask, ``proj``, and the way back).
Its Linear maps act on each position alone, so they commute with the shifts and
partitions; :func:`expand` rewrites the call as

    padded = window_pad(x)                 a per-unit op (zero padding)
    qkv    = F.linear(padded, W_qkv, b)     a layer: the q, k and v units
    mixed  = window_attend(qkv, ...)        the V units mixed over the tokens of each window
    out    = F.linear(mixed, W_proj, b)     a layer
    y      = window_crop(out, x)            the padding cut off again

which computes the same function, and the attention rule holds the pattern of
:func:`window_attend` constant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["window_pad", "window_attend", "window_crop", "is_swin_attention", "expand"]


def _pads(h: int, w: int, window: list[int]) -> tuple[int, int]:
    return (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]


def window_pad(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """(N, H, W, C) zero-padded at the bottom and right to multiples of the window."""
    pad_b, pad_r = _pads(x.shape[1], x.shape[2], window)
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b))


def window_crop(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` cut back to the height and width of ``like``."""
    return y[:, : like.shape[1], : like.shape[2], :].contiguous()


def window_attend(qkv: torch.Tensor, bias: torch.Tensor, window: list[int], heads: int, shift: list[int],
                  logit_scale: torch.Tensor | None = None, frozen: bool = False) -> torch.Tensor:
    """Shifted-window attention between the projections: (N, H, W, 3C) -> (N, H, W, C).

    ``frozen`` computes the pattern from detached queries and keys (the attention rule): the
    value is the same, the output is linear in ``v``.
    """
    n, ph, pw, c3 = qkv.shape
    c = c3 // 3
    shift = list(shift)
    if window[0] >= ph:
        shift[0] = 0
    if window[1] >= pw:
        shift[1] = 0
    x = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if sum(shift) > 0 else qkv
    nw = (ph // window[0]) * (pw // window[1])
    x = x.view(n, ph // window[0], window[0], pw // window[1], window[1], c3)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(n * nw, window[0] * window[1], c3)
    qkv_h = x.reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_h[0], qkv_h[1], qkv_h[2]
    if frozen:
        q, k = q.detach(), k.detach()
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        hs = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        ws = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in hs:
            for w in ws:
                mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        mask = mask.view(ph // window[0], window[0], pw // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(nw, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    if frozen:
        attn = attn.detach()
    out = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    out = out.view(n, ph // window[0], pw // window[1], window[0], window[1], c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(n, ph, pw, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out


def _v2_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    """Swin V2 zeroes the key bias inside its attention."""
    b = qkv_bias.clone()
    n = b.numel() // 3
    b[n : 2 * n] = 0
    return b


def is_swin_attention(fn: Any) -> bool:
    """Whether ``fn`` is torchvision's ``shifted_window_attention`` (fx patches the module's name
    while tracing, so it is recognised by name and module, not by identity)."""
    return getattr(fn, "__name__", None) == "shifted_window_attention" and \
        getattr(fn, "__module__", None) == "torchvision.models.swin_transformer"


def is_patch_merging_pad(fn: Any) -> bool:
    return getattr(fn, "__name__", None) == "_patch_merging_pad" and \
        getattr(fn, "__module__", None) == "torchvision.models.swin_transformer"


def expand_patch_merging(tracer: Any, x: Any) -> Any:
    """Swin's patch merging: four interleaved position groups joined along the units (a concat
    of four selections of the same units, which the following Linear reads as 4C units)."""
    p = tracer.create_proxy("call_function", window_pad, (x, [2, 2]), {})
    parts = [p[..., i::2, j::2, :] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
    return torch.cat(parts, -1)


_NAMES = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
          "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def expand(tracer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], scope: str) -> Any:
    """Emit the written-out attention as proxies of ``tracer`` (see the module docstring)."""
    a = dict(zip(_NAMES, args))
    a.update(kwargs)
    if a.get("training"):
        from connectome.errors import ExtractionError

        raise ExtractionError(f"shifted window attention in {scope!r} runs in training mode; extraction runs in eval mode")
    x = a["input"]
    window = list(a["window_size"])
    padded = tracer.create_proxy("call_function", window_pad, (x, window), {})
    qkv_bias = a.get("qkv_bias")
    if qkv_bias is not None and a.get("logit_scale") is not None:
        qkv_bias = tracer.create_proxy("call_function", _v2_bias, (qkv_bias,), {})
    qkv = tracer.create_proxy("call_function", F.linear, (padded, a["qkv_weight"], qkv_bias), {})
    qkv.node.meta["connectome_name"] = f"{scope}.qkv"
    mixed = tracer.create_proxy("call_function", window_attend,
                                (qkv, a["relative_position_bias"], window, int(a["num_heads"]), list(a["shift_size"]),
                                 a.get("logit_scale")), {})
    out = tracer.create_proxy("call_function", F.linear, (mixed, a["proj_weight"], a.get("proj_bias")), {})
    out.node.meta["connectome_name"] = f"{scope}.proj"
    return tracer.create_proxy("call_function", window_crop, (out, x), {})
