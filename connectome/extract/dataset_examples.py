"""Dataset examples per unit: the images (and positions) that drive each unit most.

For every unit, a streaming top-k over the images is kept on the device: by the unit's
maximum activation over positions (the value it passes on, with the position of the
maximum), and, in an attribution run, by its attribution to the target (``A * dT/dA``
summed over positions per image, with the position where it is largest). Each batch's
candidates are merged with the current top-k by one sort over ``k + batch`` values per
unit, so memory is ``O(units x k)``, nothing crosses to the host per batch and no image is
read twice. Ties go to the image read first (a stable sort), so the result does not
depend on the batch size or on how the images were split across processes.

The module is named for what it holds; :func:`examples` (re-exported as
``connectome.extract.examples``) is the entry point without flows, and
``connectome.extract.attribution(..., examples=k)`` keeps the same lists during the flow run.

References
----------
Olah, Mordvintsev and Schubert (2017), "Feature Visualization" (dataset examples), Distill.
Hohman et al. (2020), "Summit: Scaling Deep Learning Interpretability by Visualizing
Activation and Attribution Summarizations", IEEE TVCG.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

from connectome.kinds import Kind
from connectome.patches import LISTS, example_columns

__all__ = ["ExampleTracker", "ImageOrder", "examples", "topk_merge"]

VALUE, INDEX, POS = 0, 1, 2  # columns of a top-k state tensor (rows, k, 3)


def topk_merge(cand: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best of candidate triples ``(value, image index, position)`` per row.

    ``cand`` has shape ``(rows, m, 3)``; the result ``(rows, k, 3)`` is ordered by value,
    largest first, ties by the smaller image index; empty slots (index -1, value -inf) last.
    Used to merge the top-k of several processes, whose image indices interleave.
    """
    idx = cand[..., INDEX]
    # two stable sorts make a lexicographic one: by value descending, then index ascending
    o1 = torch.sort(torch.where(idx < 0, math.inf, idx), dim=1, stable=True).indices
    c = cand.gather(1, o1[..., None].expand_as(cand))
    o2 = torch.sort(c[..., VALUE], dim=1, descending=True, stable=True).indices[:, :k]
    return c.gather(1, o2[..., None].expand(-1, -1, cand.shape[2]))


def _merge(old: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Merge a batch (``vals``, ``pos`` of shape (N, L); ``index`` (N,)) into ``old`` (L, k, 3).

    ``old`` holds images read before this batch, in order, so one stable sort by value
    keeps ties in reading order.
    """
    L, k, _ = old.shape
    cand = torch.cat([old, torch.stack([vals.T, index.to(old.dtype).expand(L, -1), pos.T], -1)], 1)
    order = torch.sort(cand[..., VALUE], dim=1, descending=True, stable=True).indices[:, :k]
    return cand.gather(1, order[..., None].expand(-1, -1, 3))


def _per_unit(view: Any, t: torch.Tensor, with_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per image and unit: max over positions, its position, and (``with_sum``) the sum; (N, L) each.

    ``view`` says where the units of ``t`` are (:class:`connectome.extract.accumulator._View`).
    """
    rows = view._rows(t)  # (N, K, P): K unit slots, P positions
    n, K, P = rows.shape
    mx, arg = rows.max(2)
    mx = mx.double()
    s = rows.sum(2).double() if with_sum else None
    if view.index is None:
        return mx, arg.double(), s
    L = view.size
    index = view.index if view.index.numel() == K else view.index.expand(K)
    at = index[None, :].expand(n, K)
    best = torch.full((n, L), -math.inf, dtype=torch.float64, device=t.device).scatter_reduce(
        1, at, mx, "amax", include_self=True)
    # the position of the best slot of each unit (slot * P + position within it)
    q = torch.where(mx == best.gather(1, at), (torch.arange(K, device=t.device) * P)[None, :] + arg, -1).double()
    pos = torch.full((n, L), -1.0, dtype=torch.float64, device=t.device).scatter_reduce(1, at, q, "amax")
    pos = torch.where(pos >= 0, pos % P, pos)
    if s is not None:
        s = torch.zeros(n, L, dtype=torch.float64, device=t.device).index_add_(1, index, s)
    return best, pos, s


class ExampleTracker:
    """Streaming top-k dataset examples per unit, for a traced model.

    Holds no state of its own: the lists live on the :class:`FlowAccumulator` (or the loop of
    :func:`examples`) as fields declared with reduction ``"topk"``, one ``(units, k, 3)``
    float64 tensor per layer (value, image index, position; index -1 marks an empty slot),
    so that checkpoints save them and :func:`~connectome.extract.distributed.all_reduce_accumulator`
    merges them with :func:`topk_merge`.

    Parameters
    ----------
    ug : UnitGraph
    device : torch.device
    k : int
        Images kept per unit and list.
    layers : sequence of int, optional
        Layer positions to track (default: every layer but the input).
    """

    def __init__(self, ug: Any, device: torch.device, k: int, layers: Sequence[int] | None = None):
        if int(k) != k or k < 1:
            raise ValueError(f"examples must be a positive number of images per unit, got {k!r}")
        self.ug, self.device, self.k = ug, device, int(k)
        self.layers = [li for li, s in enumerate(ug.layers) if s.kind != Kind.INPUT and (layers is None or li in layers)]

    def empty(self) -> list[torch.Tensor | None]:
        """One list's initial state: per layer (units, k, 3) of (-inf, -1, -1), None where untracked."""
        out: list[torch.Tensor | None] = [None] * len(self.ug.layers)
        for li in self.layers:
            t = torch.full((self.ug.layers[li].size, self.k, 3), -1.0, dtype=torch.float64, device=self.device)
            t[..., VALUE] = -math.inf
            out[li] = t
        return out

    def observe(self, state: list[Any], li: int, view: Any, t: torch.Tensor, index: torch.Tensor,
                by_sum: bool = False) -> torch.Tensor | None:
        """Merge one batch of layer ``li``'s values ``t`` into ``state[li]``.

        ``by_sum``: rank by the per-image sum over positions (attribution), else by the max;
        then returns the sum over the batch per unit, shape (L,) float64.
        """
        if state[li] is None:
            return view.sum(t) if by_sum else None
        mx, pos, s = _per_unit(view, t.detach(), by_sum)
        state[li] = _merge(state[li], s if by_sum else mx, pos, index)
        return s.sum(0) if by_sum else None

    def columns(self, state: list[Any], by: str) -> dict[str, np.ndarray]:
        """Node attribute columns of one list, aligned with the graph's nodes (layer order)."""
        parts = []
        for li, s in enumerate(self.ug.layers):
            t = state[li]
            if t is None:
                a = np.full((s.size, self.k, 3), -1.0)
                a[..., VALUE] = np.nan
            else:
                a = t.detach().cpu().numpy().copy()
                empty = a[..., INDEX] < 0
                a[..., VALUE][empty] = np.nan
                a[..., POS][empty] = -1
            parts.append(a)
        a = np.concatenate(parts) if parts else np.zeros((0, self.k, 3))
        return example_columns(LISTS[by], a[..., INDEX].astype(np.int64), a[..., VALUE],
                               a[..., POS].astype(np.int64))

    def meta(self) -> dict[str, Any]:
        """``meta["examples"]``: how many per unit, which lists, and the receptive fields for crops."""
        from connectome.extract.build import graph_layers
        from connectome.extract.receptive import receptive_fields

        fields, size = receptive_fields(self.ug)
        # keyed by the graph's layer names (the output layer is renamed "logits")
        names = [l.name for l in graph_layers(self.ug)]
        return {"k": self.k, "fields": {n: fields[s.name] for n, s in zip(names, self.ug.layers)}, "input_size": size}


# ----------------------------------------------------------------------------- image order
class ImageOrder:
    """Which dataset item each image of a batch is, so that a stored image index can be found again.

    The loaders of this package read the dataset in order (or one shard of it, in order):
    the ``i``-th item read is ``order[i]``. Items that fail to decode are dropped from a batch
    (their paths come back from the loader) and so are dropped here too. A ``Subset`` (one
    category of :func:`attribution_by_category`) maps back to the indices of its dataset.
    With a loader of its own order (a shuffling sampler) the index is the reading order.
    """

    def __init__(self, loader: Any, dataset: Any):
        from torch.utils.data import SequentialSampler

        from connectome.extract.distributed import ShardSampler

        sampler = getattr(loader, "sampler", None)
        n = len(dataset) if hasattr(dataset, "__len__") else None
        if isinstance(sampler, ShardSampler):
            self.order: Any = sampler.indices
        elif isinstance(sampler, SequentialSampler) and n is not None:
            self.order = range(n)
        else:
            self.order = None
        self.dataset, self.read, self.kept = dataset, 0, 0
        self.root, self.map = dataset, None
        while isinstance(self.root, Subset):  # a category of attribution_by_category
            inner = np.asarray(self.root.indices, dtype=np.int64)
            self.map = inner if self.map is None else inner[self.map]
            self.root = self.root.dataset
        self._paths: dict[str, int] | None = None

    def next(self, n_kept: int, skipped: Sequence[str] = (), n_used: int | None = None) -> torch.Tensor:
        """Dataset indices (float64) of the images of the next batch: ``n_kept`` decoded, ``skipped`` not;
        ``n_used`` of them summed (a batch cut short by ``max_images``)."""
        n_read = n_kept + len(skipped)
        if self.order is None:
            ids = np.arange(self.kept, self.kept + n_kept, dtype=np.int64)
        else:
            ids = np.asarray(self.order[self.read : self.read + n_read], dtype=np.int64)
            if skipped:
                bad = {self._path_index(p) for p in skipped}
                ids = np.asarray([i for i in ids if i not in bad], dtype=np.int64)[:n_kept]
            if self.map is not None:
                ids = self.map[ids]
        self.read += n_read
        self.kept += n_kept
        return torch.from_numpy(ids[: n_kept if n_used is None else n_used].astype(np.float64))

    def _path_index(self, path: str) -> int:
        if self._paths is None:
            samples = getattr(self.dataset, "samples", None) or []
            self._paths = {str(p): i for i, (p, *_) in enumerate(samples)}
        return self._paths.get(str(path), -1)

    def describe(self, used: np.ndarray) -> dict[str, Any]:
        """``meta["examples"]`` entries saying what an image index means (paths of ``used`` ones)."""
        out: dict[str, Any] = {"index": "dataset" if self.order is not None else "read order",
                               "dataset": type(self.root).__name__}
        samples = getattr(self.root, "samples", None)
        if samples is not None and self.order is not None:
            used = np.unique(used[used >= 0])
            # absolute: the graph is read again from other folders (view, report, export)
            out["paths"] = {str(int(i)): os.path.abspath(str(samples[int(i)][0])) for i in used if int(i) < len(samples)}
        return out


# ----------------------------------------------------------------------------- without flows
def examples(
    model: torch.nn.Module,
    data: Any,
    layers: Sequence[str] | None = None,
    k: int = 16,
    *,
    device: Any = None,
    batch_size: int = 64,
    num_workers: int = 0,
    transform: Callable[[Any], Any] | None = None,
    labels: Sequence[str] | None = None,
    max_images: int | None = None,
    progress: bool = True,
    name: str | None = None,
) -> Any:
    """The top-k dataset examples of every unit by its maximum activation, without flows.

    One forward pass per batch (no gradient): for each unit the ``k`` images whose largest
    value over positions is highest, with that position, so that
    :func:`connectome.patches.crop_box` can cut out the part of the image the unit saw.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable model, as for :func:`connectome.extract.attribution`.
    data : str, Path, Dataset, DataLoader, Tensor or (Tensor, Tensor)
        As for :func:`connectome.extract.attribution`; labels are not needed.
    layers : sequence of str, optional
        Track only these layers (module names); default every layer but the input.
    k : int, default 16
        Images per unit.
    device, batch_size, num_workers, transform, labels, max_images, progress, name
        As for :func:`connectome.extract.attribution`.

    Returns
    -------
    Connectome
        The model's layers and units with no edges; node attributes ``example_index_j``,
        ``example_value_j``, ``example_pos_j`` for ``j < k`` (index -1 and value NaN where
        fewer than ``k`` images were read or the layer is not tracked) and
        ``meta["examples"]`` (k, receptive fields, what an index means and, for an
        ImageFolder, the path of every image used). Attach them to another graph of the
        model with :func:`connectome.patches.with_examples`.

    Raises
    ------
    DataError
        Empty data.
    ExtractionError
        The model cannot be traced, or a name in ``layers`` is not one of its layers.

    Examples
    --------
    >>> ex = cn.extract.examples(model, "images/", k=8)                 # doctest: +SKIP
    >>> g = cn.patches.with_examples(cn.load("cat.npz"), ex)            # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from connectome.errors import DataError
    from connectome.extract._model import check_model, eval_mode, model_dtype, model_on, resolve_device
    from connectome.extract.accumulator import _View
    from connectome.extract.build import graph_layers
    from connectome.extract.data import make_loader, unpack_batch, warn_skipped
    from connectome.extract.flow import _labels_for_output, _versions
    from connectome.extract.trace import run_nodes, trace_units
    from connectome.graph import Connectome

    check_model(model)
    if max_images is not None and (int(max_images) != max_images or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}")
    dev = resolve_device(device)
    info = make_loader(data, batch_size=batch_size, num_workers=num_workers, transform=transform,
                       pin_memory=dev.type == "cuda")
    t0 = time.perf_counter()
    m = model_on(model, dev)
    dtype = model_dtype(m)
    order = ImageOrder(info.loader, info.dataset)
    tracker = state = ug = None
    watch: dict[str, tuple[int, Any]] = {}
    skipped: list[str] = []
    seen = 0
    total = info.n_images if max_images is None else min(info.n_images or max_images, max_images)
    bar = tqdm(total=total, unit="img", desc="examples", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        with eval_mode(m), torch.inference_mode():
            for batch in info.loader:
                x, _, sk = unpack_batch(batch)
                skipped.extend(sk)
                if x is None:
                    order.next(0, sk)
                    continue
                n_used = x.shape[0] if max_images is None else min(x.shape[0], max_images - seen)
                index = order.next(x.shape[0], sk, n_used).to(dev)
                x = x[:n_used].to(dev, dtype=dtype, non_blocking=True)
                if tracker is None:
                    ug = trace_units(m, x[:1])
                    wanted = None if layers is None else [ug.layer_index(str(l)) for l in layers]
                    tracker = ExampleTracker(ug, dev, k, wanted)
                    state = tracker.empty()
                    for li in tracker.layers:
                        node = ug.layers[li].out_node
                        u = ug.units[node]
                        watch[node] = (li, _View(u, ug.layers[u.layer].size, dev))

                def on_value(node: Any, value: Any) -> Any:
                    hit = watch.get(node.name)
                    if hit is not None:  # observed as computed: a later in-place op cannot change it
                        tracker.observe(state, hit[0], hit[1], value, index)
                    return value

                run_nodes(ug.gm, (x,), on_value=on_value)
                seen += n_used
                bar.update(n_used)
                if max_images is not None and seen >= max_images:
                    break
    finally:
        bar.close()
    warn_skipped(skipped)
    if tracker is None:
        raise DataError("no images could be read" + (f": all {len(skipped)} files failed to decode" if skipped
                                                     else "; the data is empty"))
    n_out = ug.layers[ug.output_layer].size
    cols = tracker.columns(state, "activation")
    used = np.concatenate([v for c, v in cols.items() if c.startswith("example_index_")])
    meta = {"model": name or type(model).__name__, "method": "examples", "n_images": seen,
            "examples": {**tracker.meta(), "lists": ["activation"], **order.describe(used)},
            "seconds": round(time.perf_counter() - t0, 3), "device": str(dev), "versions": _versions()}
    layers_ = graph_layers(ug, _labels_for_output(labels, info.classes, n_out))
    units = np.concatenate([np.arange(l.size, dtype=np.int64) for l in layers_])
    empty = np.zeros(0, dtype=np.int64)
    return Connectome(layers=tuple(layers_), node_units=units, src=empty, dst=empty, weight=np.zeros(0),
                      node_attrs=cols, meta=meta)
