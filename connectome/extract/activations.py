"""Unit activations: the value each unit passes on, per image."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from connectome.errors import ConnectomeError
from connectome.extract._model import check_model, eval_mode, model_dtype, model_on, resolve_device
from connectome.extract.build import graph_layers
from connectome.extract.data import make_loader, unpack_batch
from connectome.extract.targets import as_layer_names, resolve_layer
from connectome.extract.trace import UnitGraph, run_nodes, trace_units
from connectome.extract.unit_sums import UnitView

__all__ = ["activations", "Activations", "traced_batches"]


class Activations(dict):
    """``layer name -> array``: shape (n_images, units) or, with ``spatial=True``,
    (n_images, units, H, W) for conv-like layers. ``.labels`` holds the images' labels
    (or None) and ``.layers`` the graph layers in order."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: np.ndarray | None = None
        self.layers: list[Any] = []


def _read_node(ug: UnitGraph, i: int, spatial: bool) -> str:
    """Where a layer's activations are read: the value it passes on, or with ``spatial`` the
    last value on its chain that still has positions (before a global pool or flatten)."""
    s = ug.layers[i]
    if s.kind == "input":
        return s.node
    if not spatial:
        return s.out_node
    best = s.node
    for name in s.chain:
        if len(ug.shapes.get(name, ())) > 2:
            best = name
    return best if len(ug.shapes.get(best, ())) > 2 else s.out_node


def traced_batches(m: nn.Module, loader: Any, dev: torch.device, dtype: torch.dtype, *, rank: int = 0,
                   stride: int = 1) -> Iterator[tuple[UnitGraph, torch.Tensor, Any]]:
    """``(unit graph, images, labels or None)`` of each batch of ``loader`` that holds images,
    the images on ``dev`` in ``dtype``; the model ``m`` is traced once, on the first batch.

    ``stride``: only every ``stride``-th batch, from the ``rank``-th on (a process's share
    when the data are tensors that no sampler splits).
    """
    ug = None
    for b, batch in enumerate(loader):
        if b % stride != rank % stride:
            continue
        x, y, _ = unpack_batch(batch)
        if x is None:
            continue
        x = x.to(dev, dtype=dtype, non_blocking=True)
        if ug is None:
            ug = trace_units(m, x[:1])
        yield ug, x, y


def _resolve_layers(ug: UnitGraph, names: Sequence[str] | None) -> list[int]:
    names = as_layer_names(names)
    if names is None:
        return list(range(len(ug.layers)))
    glayers = graph_layers(ug)
    return [resolve_layer(n, glayers, ug.layers, where="in the model's unit graph") for n in names]


def activations(
    model: nn.Module,
    images: Any,
    layers: Sequence[str] | None = None,
    *,
    spatial: bool = False,
    device: Any = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Activations:
    """Each unit's activation (the value it passes on, after BatchNorm and nonlinearity).

    Parameters
    ----------
    model : nn.Module
        Runs in eval mode under ``torch.inference_mode``; left as found.
    images : Tensor (N, C, H, W), (images, labels) pair, Dataset, DataLoader or ImageFolder path
    layers : sequence of str, optional
        Graph layer names (``"layer1.0.conv1"``, ``"logits"``); default all.
    spatial : bool, default False
        Keep the spatial maps instead of the per-image spatial mean.
    device : optional
        ``None``: CUDA when available.

    Returns
    -------
    Activations
        ``dict`` of layer name -> numpy array, in the order of ``layers`` (default: graph
        layer order). With ``spatial``, conv-like layers give their maps before any global
        pooling or flatten that follows them.

    Examples
    --------
    >>> acts = activations(model, torch.randn(2, 3, 32, 32))        # doctest: +SKIP
    >>> acts["logits"].shape                                         # doctest: +SKIP
    (2, 10)
    """
    check_model(model)
    dev = resolve_device(device)
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = images[None]
    info = make_loader(images, batch_size=batch_size)
    m = model_on(model, dev)
    dtype = model_dtype(m)
    chunks: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    out = Activations()
    with eval_mode(m), torch.inference_mode():
        ug = None
        for b, (ug, x, y) in enumerate(traced_batches(m, info.loader, dev, dtype)):
            if b == 0:
                glayers = graph_layers(ug)
                picks = list(dict.fromkeys(_resolve_layers(ug, layers)))
                read = {i: _read_node(ug, i, spatial) for i in picks}
                keep = set(read.values())
            _, kept = run_nodes(ug.gm, (x,), keep=keep)
            for i in picks:
                s = ug.layers[i]
                v = kept[read[i]]
                if spatial and v.dim() > 2:  # units on dim 1, also for channels-last
                    arr = v.movedim(ug.one_unit_dim(read[i], "activations(spatial=True)"), 1)
                else:
                    arr = unit_means(ug, read[i], s.size, v)
                chunks.setdefault(glayers[i].name, []).append(arr.float().cpu().numpy())
            if y is not None:
                labels.append(np.asarray(y.cpu()))
    if ug is None:
        raise ConnectomeError("no images to run; pass at least one image")
    for name, parts in chunks.items():
        out[name] = np.concatenate(parts)
    out.labels = np.concatenate(labels) if labels else None
    out.layers = [glayers[i] for i in picks]
    return out


def unit_means(ug: UnitGraph, node: str, size: int, v: torch.Tensor) -> torch.Tensor:
    """Per image and unit, the mean of ``node``'s value ``v`` over each unit's positions: (N, size),
    wherever its units lie (channels-last, on several dims, heads or positions in the batch)."""
    return UnitView(ug.units[node], size, v.device).unit_means(v)
