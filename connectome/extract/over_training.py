"""Connectomes over training: one graph per checkpoint of one architecture, on one topology.

Development in a brain, training in a network: :func:`over_training` loads each checkpoint
(a state dict, or a file of one) into a copy of the model and extracts its weight graph
(or, with data, its attribution graph per category). The graphs of all checkpoints are put
on the union of their edges (an edge missing at a step, because its weights were exactly
zero there, gets weight 0), so that :func:`connectome.analysis.trajectory` can compare
them edge by edge.

There is no multi-graph store in the package yet: the graphs are returned as a list (one
per checkpoint) or a mapping category -> list; they share their ``src``/``dst`` arrays.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from connectome.errors import BadFileError, ConnectomeError
from connectome.graph import Connectome

__all__ = ["over_training", "same_topology", "checkpoint_files"]


def checkpoint_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``*.pt`` / ``*.pth`` files of a folder, by the last number in their names (the step)."""
    root = Path(folder)
    files = [p for p in root.iterdir() if p.suffix in (".pt", ".pth") and p.is_file()]
    if not files:
        raise BadFileError(f"checkpoint folder {str(root)!r} holds no .pt or .pth files")

    def key(p: Path) -> tuple[int, str]:
        nums = re.findall(r"\d+", p.stem)
        return (int(nums[-1]) if nums else -1, p.name)

    return sorted(files, key=key)


def _step_of(item: Any, i: int) -> int:
    if isinstance(item, (str, os.PathLike)):
        nums = re.findall(r"\d+", Path(item).stem)
        if nums:
            return int(nums[-1])
    return i


def _state(item: Any, i: int) -> Mapping[str, Any]:
    from connectome._safety import safe_torch_load

    if isinstance(item, Mapping):
        return item
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if not p.is_file():
            raise BadFileError(f"checkpoint {i} {str(p)!r} is not a file; pass state dicts or paths of torch.save files")
        sd = safe_torch_load(p, "checkpoint")
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise BadFileError(f"checkpoint {str(p)!r} holds a {type(sd).__name__}, not a state dict")
        return sd
    raise ConnectomeError(f"checkpoint {i} is a {type(item).__name__}; pass state dicts or paths of torch.save files")


def same_topology(graphs: Sequence[Connectome]) -> list[Connectome]:
    """The graphs on the union of their edges (weight and edge columns 0 where an edge is
    missing); all must have the same units.

    Raises
    ------
    ConnectomeError
        Graphs of different units (layers or node ids).
    """
    graphs = list(graphs)
    if not graphs:
        return []
    ref = graphs[0]
    for k, g in enumerate(graphs[1:], 1):
        if g.layer_names != ref.layer_names or not np.array_equal(g.node_units, ref.node_units):
            raise ConnectomeError(f"graph {k} has other units than graph 0 (layers {g.layer_names[:4]}... vs "
                                  f"{ref.layer_names[:4]}...); pass graphs of one architecture")
    if all(np.array_equal(g.src, ref.src) and np.array_equal(g.dst, ref.dst) for g in graphs):
        return [g._replace(src=ref.src, dst=ref.dst) for g in graphs]
    n = max(ref.num_nodes, 1)
    keys = np.unique(np.concatenate([g.dst * n + g.src for g in graphs]))
    src, dst = keys % n, keys // n
    out = []
    for g in graphs:
        pos = np.searchsorted(keys, g.dst * n + g.src)
        w = np.zeros(keys.size, dtype=np.float64)
        w[pos] = g.weight
        attrs = {}
        for name, col in g.edge_attrs.items():
            a = np.zeros(keys.size, dtype=col.dtype)
            a[pos] = col
            attrs[name] = a
        out.append(Connectome(layers=g.layers, node_units=g.node_units, src=src, dst=dst, weight=w,
                              edge_attrs=attrs, node_attrs=g.node_attrs, meta=g.meta))
    return out


def over_training(
    model: Any,
    checkpoints: Sequence[Any] | str | os.PathLike[str],
    data: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    target: Any = "label",
    categories: Sequence[str] | None = None,
    device: Any = None,
    batch_size: int = 64,
    **kwargs: Any,
) -> list[Connectome] | dict[str, list[Connectome]]:
    """One connectome per checkpoint of one architecture, all on one topology.

    Parameters
    ----------
    model : nn.Module
        The architecture; left as found (each checkpoint is loaded into a copy).
    checkpoints : sequence of state dicts or paths, or a folder
        In training order. A folder: its ``.pt``/``.pth`` files ordered by the last number
        in their names (``step_00100.pt``), as ``connectome zoo train --save-every`` writes.
        A file may hold ``{"state_dict": ...}``.
    data : optional
        ``None``: weight graphs (:func:`connectome.extract.weights`, needs ``input_shape``).
        Else images with labels: attribution graphs per category
        (:func:`connectome.extract.attribution_by_category`).
    input_shape : sequence of int, optional
        ``C, H, W`` of one input, for weight graphs.
    labels : sequence of str, optional
        Class names of the output units (weight graphs; attribution takes them from the data
        or from ``labels=`` in ``kwargs``).
    steps : sequence of int, optional
        The training step of each checkpoint (stored as ``meta["step"]``); default the last
        number in each file name, else the position.
    target, categories, device, batch_size, **kwargs
        Passed to :func:`~connectome.extract.attribution_by_category` (``progress`` defaults
        to False).

    Returns
    -------
    list of Connectome, or dict of str -> list of Connectome
        Weight graphs in checkpoint order, or per category its graphs in checkpoint order.
        Every graph has ``meta["step"]`` and ``meta["checkpoint"]`` (the position).

    Raises
    ------
    ConnectomeError
        No checkpoints, a checkpoint that does not fit the model (missing or unexpected
        keys, other shapes: the message names it), no ``input_shape`` for weight graphs,
        ``steps`` of another length.
    BadFileError
        A path that is not a file, or a file that holds no state dict.

    Examples
    --------
    >>> gs = over_training(model, "ckpts/", input_shape=(3, 32, 32))     # doctest: +SKIP
    >>> traj = connectome.analysis.trajectory(gs)                       # doctest: +SKIP
    """
    from connectome.extract.flow import attribution_by_category
    from connectome.extract.weights import weights

    if isinstance(checkpoints, (str, os.PathLike)):
        if not Path(checkpoints).is_dir():
            raise BadFileError(f"checkpoints {str(checkpoints)!r} is not a folder; pass a folder of .pt files or a "
                               "list of state dicts / paths")
        checkpoints = checkpoint_files(checkpoints)
    items = list(checkpoints)
    if not items:
        raise ConnectomeError("no checkpoints; pass a sequence of state dicts or paths (in training order)")
    if steps is None:
        steps = [_step_of(it, i) for i, it in enumerate(items)]
    elif len(steps) != len(items):
        raise ConnectomeError(f"{len(steps)} steps for {len(items)} checkpoints; pass one step per checkpoint")
    if data is None and input_shape is None:
        raise ConnectomeError("weight graphs need input_shape (C, H, W of one input), or pass data for attribution")
    kwargs.setdefault("progress", False)
    per_step: list[Any] = []
    for i, item in enumerate(items):
        m = copy.deepcopy(model)
        try:
            m.load_state_dict(_state(item, i), strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise ConnectomeError(f"checkpoint {i} does not fit the model: {first}") from None
        info = {"step": int(steps[i]), "checkpoint": i}
        if data is None:
            per_step.append(weights(m, tuple(input_shape), labels=labels).with_meta(**info))
        else:
            gs = attribution_by_category(m, data, target, categories=categories, device=device, batch_size=batch_size,
                                         **kwargs)
            per_step.append({c: g.with_meta(**info) for c, g in gs.items()})
    if data is None:
        return same_topology(per_step)
    cats = list(per_step[0])
    return {c: same_topology([d[c] for d in per_step]) for c in cats}
