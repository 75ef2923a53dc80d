"""Running a traced model on a small probe set: what ablation, unit matching and activation
comparison share.

The probe set is held in memory (:func:`load_probe`); the model is traced once and run in
eval mode under ``inference_mode`` (:func:`traced`), without anything attached to it: values
are read (:func:`profile_node`) or masked (:func:`mask_units`) while the traced graph runs
node by node.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from connectome.errors import DataError
from connectome.extract._model import check_model, eval_mode, model_dtype, model_on, resolve_device
from connectome.extract.build import graph_layers
from connectome.extract.data import make_loader, unpack_batch, warn_skipped
from connectome.extract.targets import layer_position, resolve_layer
from connectome.extract.trace import UnitGraph, trace_units
from connectome.graph import Layer
from connectome.kinds import KINDS

__all__ = ["IO_KINDS", "Traced", "load_probe", "mask_units", "profile_node", "traced"]

IO_KINDS = tuple(k for k, v in KINDS.items() if not v.hidden)  # the image and the logits, never probed as hidden


def load_probe(data: Any, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """All probe images, and their labels when every batch has them, as CPU tensors.

    Parameters
    ----------
    data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        The probe set; a single image ``(C, H, W)`` counts as a batch of one.
    batch_size : int, default 64
        Images per batch while reading.

    Returns
    -------
    x : Tensor, shape (n_images, ...)
    y : Tensor of int64, shape (n_images,), or None
        ``None`` when some batch has no labels.
    classes : list of str or None
        The dataset's class names, when it has them.

    Raises
    ------
    DataError
        No image could be read.

    Examples
    --------
    >>> x, y, classes = load_probe(torch.zeros(2, 3, 8, 8))
    >>> tuple(x.shape), y, classes
    ((2, 3, 8, 8), None, None)
    """
    if isinstance(data, torch.Tensor) and data.dim() == 3:
        data = data[None]
    info = make_loader(data, batch_size=batch_size)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    skipped: list[str] = []
    has_labels = True
    for batch in info.loader:
        x, y, sk = unpack_batch(batch)
        skipped.extend(sk)
        if x is None:
            continue
        xs.append(torch.as_tensor(x).detach().cpu())
        if y is None:
            has_labels = False
        else:
            ys.append(torch.as_tensor(y).detach().cpu().long().reshape(-1))
    warn_skipped(skipped)
    if not xs:
        raise DataError("no images to run; pass at least one image")
    x = torch.cat(xs)
    y = torch.cat(ys) if has_labels and ys else None
    return x, y, info.classes


@dataclass
class Traced:
    """A traced model ready to run on the probe set.

    Attributes
    ----------
    ug : UnitGraph
        The traced unit graph.
    layers : list of Layer
        The Connectome layers, aligned with ``ug.layers`` (the output layer is ``logits``).
    device : torch.device
    dtype : torch.dtype
        Where and in which precision the model runs.
    """

    ug: UnitGraph
    layers: list[Layer]
    device: torch.device
    dtype: torch.dtype

    @property
    def names(self) -> list[str]:
        """Graph layer names, in layer order."""
        return [l.name for l in self.layers]

    def index(self, name: str) -> int | None:
        """Position of layer ``name`` (graph layer name, traced name or module path), or None."""
        return layer_position(name, self.layers, self.ug.layers)

    def resolve(self, name: str, where: str = "in the model") -> int:
        """Position of layer ``name``, or a ConnectomeError naming it and the layers there are."""
        return resolve_layer(name, self.layers, self.ug.layers, where=where)

    def hidden_names(self) -> list[str]:
        """Names of the layers other than input and output."""
        return [l.name for l in self.layers if l.kind not in IO_KINDS]

    @property
    def n_classes(self) -> int:
        """Units of the output layer."""
        return int(self.ug.layers[self.ug.output_layer].size)


@contextlib.contextmanager
def traced(model: nn.Module, example: torch.Tensor, device: Any = None) -> Iterator[Traced]:
    """Trace ``model`` and keep it in eval mode under ``inference_mode`` for the block.

    Nothing is attached to the model (masks and reads happen while the traced graph runs),
    and every submodule's ``training`` flag is restored on exit, also on error. A model in
    training mode is switched with a warning.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable model.
    example : Tensor, shape (n_images, ...)
        Probe images; the first one is used to trace.
    device : optional
        ``None``: CUDA when available, else CPU (a copy of the model runs there when it is
        elsewhere).

    Yields
    ------
    Traced

    Raises
    ------
    ExtractionError
        ``model`` is not an ``nn.Module`` or cannot be traced.

    Examples
    --------
    >>> with traced(nn.Sequential(nn.Linear(4, 3)).eval(), torch.zeros(1, 4), "cpu") as t:
    ...     t.names, t.n_classes
    (['input', 'logits'], 3)
    """
    check_model(model)
    dev = resolve_device(device)
    m = model_on(model, dev)
    dtype = model_dtype(m)
    with eval_mode(m, warn=True), torch.inference_mode():
        ug = trace_units(m, example[:1].to(dev, dtype=dtype))
        yield Traced(ug, graph_layers(ug), dev, dtype)


def profile_node(t: Traced, li: int) -> str:
    """The fx node whose value profiles layer ``li``.

    That is the unit's value after its BatchNorm and nonlinearity, but before pooling or
    flattening changes its map: the last node of the per-channel chain that keeps the shape
    of the layer's defining node (the input node for the input layer).

    Parameters
    ----------
    t : Traced
    li : int
        Layer position in ``t.ug.layers``.

    Returns
    -------
    str
        The fx node name.
    """
    s = t.ug.layers[li]
    if s.kind == "input":
        return s.node
    shape = t.ug.shapes.get(s.node)
    best = s.node
    for n in s.chain:
        if t.ug.shapes.get(n) != shape:
            break
        best = n
    return best


def mask_units(value: torch.Tensor, mask: torch.Tensor, unit_dim: int = 1) -> torch.Tensor:
    """Multiply each unit's block of ``value`` by that unit's entry of ``mask``, per sample.

    Parameters
    ----------
    value : Tensor, shape (N, ...)
        A layer's value; dimension ``unit_dim`` holds its ``C`` units, or ``C * P`` features
        with each unit's ``P`` features contiguous (``(N, C, H, W)`` flattened to
        ``(N, C*H*W)``). ``(N, C, H, W)`` has ``unit_dim=1``, ``(N, H, W, C)``
        ``unit_dim=3`` (or -1), ``(N, tokens, C)`` ``unit_dim=2``.
    mask : Tensor, shape (N, C) or (1, C)
        Per sample and unit: 1 keeps the unit, 0 silences it (any factor scales it).
    unit_dim : int, default 1
        The dimension of ``value`` that holds the units; not the batch dimension 0.

    Returns
    -------
    Tensor
        Same shape as ``value``.

    Raises
    ------
    ValueError
        ``unit_dim`` is the batch dimension or out of range, the mask is not 2-D with one row
        per sample (or one row for all), or ``value.shape[unit_dim]`` is not a multiple of
        the number of units.

    Examples
    --------
    >>> v = torch.ones(1, 2, 2, 3)                       # (N, H, W, C)
    >>> mask_units(v, torch.tensor([[1.0, 0.0, 2.0]]), unit_dim=3)[0, 0, 0]
    tensor([1., 0., 2.])
    """
    nd = value.dim()
    if not -nd <= unit_dim < nd or unit_dim % nd == 0:
        raise ValueError(f"unit_dim={unit_dim} must name a non-batch dimension of a {nd}-d value (1..{nd - 1})")
    d = unit_dim % nd
    if mask.dim() != 2 or mask.shape[0] not in (1, value.shape[0]):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected (N, units) with N = {value.shape[0]} samples (or 1)"
        )
    c = mask.shape[1]
    size = value.shape[d]
    if c == 0 or size % c:
        raise ValueError(f"dimension {d} of the value has {size} entries, not a multiple of the mask's {c} units")
    shape = tuple(value.shape)
    # Split the unit dimension into (unit, features of that unit), so that one mask entry
    # broadcasts over every feature of its unit, wherever the unit dimension sits.
    blocks = shape[:d] + (c, size // c) + shape[d + 1 :]
    view = (mask.shape[0],) + (1,) * (d - 1) + (c, 1) + (1,) * (nd - d - 1)
    return (value.reshape(blocks) * mask.reshape(view)).reshape(shape)
