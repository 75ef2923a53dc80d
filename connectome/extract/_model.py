"""Handling the caller's model and device: resolve once, leave the model as found."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn

from connectome.errors import ConnectomeError, ExtractionError

__all__ = ["resolve_device", "check_model", "eval_mode", "kept_buffers", "no_inplace", "model_dtype", "model_on", "copy_model",
           "PRECISIONS", "resolve_precision", "run_precision", "precision_mode", "precision_meta"]

PRECISIONS = ("exact", "tf32", "bf16")
# Unit roundoff of the operands of the products that make the flows: float32 keeps 24
# significant bits, TF32 11 (10 stored), bfloat16 8 (7 stored), float64 53.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "exact": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8,
                 "float16": 2.0**-11, "bfloat16": 2.0**-8}
# What to expect of the flows themselves: relative (L2) distance of the edge flows to the
# float64 flows of the same model and images, an order of magnitude. Rounding flips a few
# ReLU and max-pool decisions, so even float32 lands further than its roundoff (while its
# completeness holds to ~1e-8: the flows are exact for the float32 network as it ran).
# Measured on random-weight ResNet-18/50, 224 px, on the CPU (exact 2.5e-4 / 1.6e-4, bf16
# 3.2e-2 / 5.9e-2; 1.1e-1 on ResNet-18 at 64 px); tf32 scaled from bf16 by the mantissa (2^-3):
# benchmarks/gpu_check.sh measures all three on a GPU.
# A float16 or bfloat16 model runs in its own dtype, every op rounded to it (not only the
# products, as under autocast): its flows are at best as close as tf32 (float16, the same
# 11 bits) or bf16 (bfloat16) ones; measured on a small CNN against the float64 flows of the
# same 16-bit weights: float16 2.5e-4, bfloat16 1.1e-2 (tests/extract/test_model_hygiene.py).
EXPECTED_ERROR = {"float64": 1e-12, "exact": 3e-4, "tf32": 1e-2, "bf16": 1e-1, "float16": 1e-2, "bfloat16": 1e-1}
HALF_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def resolve_device(device: Any = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConnectomeError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConnectomeError(f"device {device!r} was asked for but no CUDA GPU is available; use device='cpu'")
    return dev


def check_model(model: Any) -> nn.Module:
    """``model`` if extraction can take it: an ``nn.Module`` without hooks the traced graph
    would leave out (:func:`connectome.extract.fx_root.check_hooks`); checked before any data is read."""
    if not isinstance(model, nn.Module):
        raise ExtractionError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself "
            "(for example torchvision.models.resnet18())"
        )
    from connectome.extract.fx_root import check_hooks

    check_hooks(model)
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module, warn: bool = True) -> Iterator[nn.Module]:
    """Run in eval mode; restore every submodule's ``training`` flag and buffers afterwards.

    Extraction always runs in eval mode: BatchNorm must use running statistics to be
    folded, and dropout must be off for flows to be exact. A model handed over in training
    mode gets a warning (not an error), since forgetting ``model.eval()`` is common.
    Buffers that ``forward`` writes (a call counter, statistics a custom module updates
    even in eval mode) are put back as they were, also on error: see :func:`kept_buffers`.
    """
    flags = [(m, m.training) for m in model.modules()]
    if warn and model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode; connectome runs it in eval mode "
            "(BatchNorm uses running statistics, dropout is off) and restores training mode afterwards",
            stacklevel=3,
        )
    model.eval()
    try:
        with kept_buffers(model):
            yield model
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` back as it was on leaving, bit for bit, also on error.

    A copy of each buffer is taken on entry (buffers are small next to the weights, except
    pruning masks); on leaving, a buffer written in place (its version counter moved) gets
    its old values back in place, and a buffer that was replaced or deleted is put back.
    """
    saved = []
    names = []
    with torch.no_grad():
        for m in model.modules():
            names.append((m, set(m._buffers)))
            for name, b in m._buffers.items():
                if b is not None:
                    saved.append((m, name, b, _version(b), b.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, before in names:
                for name in set(m._buffers) - before:  # registered by forward
                    del m._buffers[name]
            for m, name, b, version, copy_ in saved:
                if m._buffers.get(name) is not b:
                    m.__dict__.pop(name, None)
                    m._buffers[name] = b
                if version is None or _version(b) != version:
                    with torch.inference_mode(b.is_inference()):
                        b.copy_(copy_)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (moves on every in-place write); None for an inference tensor."""
    try:
        return t._version
    except RuntimeError:
        return None


@contextlib.contextmanager
def no_inplace(model: nn.Module) -> Iterator[None]:
    """Switch off ``inplace`` on submodules (in-place ReLU would overwrite saved values)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
        m._connectome_inplace = True  # what the model does, for the tracer's in-place check
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True
            m.__dict__.pop("_connectome_inplace", None)


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device``: itself if already there, else a copy (the caller's model never moves)."""
    md = model_device(model)
    if md.type == device.type and (device.index is None or md.index in (None, device.index)):
        return model
    return copy_model(model).to(device)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also when it holds computed tensors that ``copy.deepcopy``
    refuses: the weight a pruning, weight_norm or spectral_norm pre-hook set (``weight_orig *
    weight_mask``, with its autograd history) is copied detached; the hook computes it again."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in m.__dict__.values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(model, memo)


def resolve_precision(precision: Any = "exact", amp: bool = False) -> str:
    """The precision asked for: ``"exact"``, ``"tf32"`` or ``"bf16"``; ``amp=True`` means ``"bf16"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if amp:
        if precision == "tf32":
            raise ValueError("amp=True is precision='bf16'; it cannot be combined with precision='tf32'")
        return "bf16"
    return precision


def run_precision(precision: str, dtype: torch.dtype) -> str:
    """The precision a run of a ``dtype`` model gets: float64 models stay float64 (exact)."""
    if dtype == torch.float64:
        if precision != "exact":
            warnings.warn(f"precision={precision!r} does not apply to a float64 model; it runs in float64",
                          stacklevel=4)
        return "exact"
    return precision


def precision_meta(precision: str, dtype: torch.dtype) -> dict[str, Any]:
    """What a graph's ``meta`` says about the arithmetic behind it: ``precision``, ``dtype``
    (the model's), ``expected_error`` (relative distance of the flows to float64 flows,
    order of magnitude), ``unit_roundoff`` (relative rounding error of one product) and
    ``exact`` False where that arithmetic is coarser than float32.

    A float64 model's are float64's; a float16 or bfloat16 model's are its dtype's, whatever
    ``precision`` asked (float32 switches do not apply to 16-bit ops; bf16 autocast of a
    float16 model rounds to the coarser of the two).
    """
    key = "float64" if dtype == torch.float64 else precision
    half = HALF_DTYPES.get(dtype)
    if half is not None and UNIT_ROUNDOFF[half] > UNIT_ROUNDOFF[key]:
        key = half
    out = {"precision": precision, "dtype": str(dtype).replace("torch.", ""),
           "expected_error": EXPECTED_ERROR[key], "unit_roundoff": UNIT_ROUNDOFF[key]}
    if key != "exact" and key != "float64":
        out["exact"] = False
    return out


# (backend, op) pairs of torch's per-operator float32 precision switches (torch >= 2.9)
_FP32_OPS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
             ("mkldnn", "rnn"))


def _fp32_switches() -> list[tuple[Any, str]]:
    out = []
    for backend, op in _FP32_OPS:
        holder = getattr(getattr(torch.backends, backend, None), op, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            out.append((holder, f"{backend}.{op}"))
    return out


def _legacy_tf32() -> dict[str, Any]:
    """The legacy switches that can be read (torch refuses to read them once the per-operator
    switches were set to values the legacy ones cannot express)."""
    out: dict[str, Any] = {}
    for key, get in (("matmul_precision", torch.get_float32_matmul_precision),
                     ("cuda_matmul", lambda: torch.backends.cuda.matmul.allow_tf32),
                     ("cudnn", lambda: torch.backends.cudnn.allow_tf32)):
        try:
            out[key] = get()
        except RuntimeError:
            pass
    return out


def _set_legacy(state: dict[str, Any]) -> None:
    # cuBLAS's allow_tf32 is a view of the matmul precision ("high" when True): set it
    # first, so that a "medium" precision is not turned into "high"
    if "cuda_matmul" in state:
        torch.backends.cuda.matmul.allow_tf32 = state["cuda_matmul"]
    if "matmul_precision" in state:
        torch.set_float32_matmul_precision(state["matmul_precision"])
    if "cudnn" in state:
        torch.backends.cudnn.allow_tf32 = state["cudnn"]


@contextlib.contextmanager
def precision_mode(precision: str) -> Iterator[None]:
    """Float32 matmuls and convolutions in IEEE float32 for the run (TF32 only for ``"tf32"``).

    cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs, which puts
    errors of 1e-3 relative into every product (completeness residuals of 1% to 30% were
    measured on ResNets): exact flows need it off. ``"bf16"`` runs under autocast and keeps
    the float32 ops that remain in IEEE float32. The caller's switches (the legacy
    ``allow_tf32`` flags, ``set_float32_matmul_precision`` and, where torch has them, the
    per-operator ``fp32_precision`` switches) are restored afterwards, also on error.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tf32 = precision == "tf32"
    legacy = _legacy_tf32()
    switches = _fp32_switches()
    saved = [(holder, holder.fp32_precision) for holder, _ in switches]
    try:
        _set_legacy({"matmul_precision": "high" if tf32 else "highest", "cuda_matmul": tf32, "cudnn": tf32})
        for holder, _ in switches:
            holder.fp32_precision = "tf32" if tf32 else "ieee"
        yield
    finally:
        _set_legacy(legacy)
        for holder, value in saved:
            holder.fp32_precision = value
