"""Handling the caller's model and device: resolve once, leave the model as found."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn

from connectome.errors import ConnectomeError, ExtractionError

__all__ = ["resolve_device", "check_model", "eval_mode", "no_inplace", "model_dtype", "model_on"]


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
    if not isinstance(model, nn.Module):
        raise ExtractionError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself "
            "(for example torchvision.models.resnet18())"
        )
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
    """Run in eval mode and restore every submodule's ``training`` flag afterwards.

    Extraction always runs in eval mode: BatchNorm must use running statistics to be
    folded, and dropout must be off for flows to be exact. A model handed over in training
    mode gets a warning (not an error), since forgetting ``model.eval()`` is common.
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
        yield model
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def no_inplace(model: nn.Module) -> Iterator[None]:
    """Switch off ``inplace`` on submodules (in-place ReLU would overwrite saved values)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device``: itself if already there, else a copy (the caller's model never moves)."""
    md = model_device(model)
    if md.type == device.type and (device.index is None or md.index in (None, device.index)):
        return model
    return copy.deepcopy(model).to(device)
