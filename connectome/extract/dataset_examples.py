"""Dataset examples per unit: the images (and positions) that drive each unit most.

For every unit, a streaming top-k over the images is kept on the device: by the unit's
maximum activation over positions (the value it passes on, with the position of the
maximum), and, in an attribution run, by its attribution to the target (``A * dT/dA``
summed over positions per image, with the position of the unit's maximum activation in
that image, where its crop is cut). Each batch's
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

from connectome._version import versions
from connectome.extract.labels import labels_for_output
from connectome.extract.topk import INDEX, POS, VALUE
from connectome.kinds import Kind
from connectome.patches import LISTS, example_columns

__all__ = ["ExampleTracker", "ImageOrder", "examples"]



def _merge(old: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Merge a batch (``vals``, ``pos`` of shape (N, L); ``index`` (N,)) into ``old`` (L, k, 3).

    ``old`` holds images read before this batch, in order, so one stable sort by value
    keeps ties in reading order.
    """
    L, k, _ = old.shape
    cand = torch.cat([old, torch.stack([vals.T, index.to(old.dtype).expand(L, -1), pos.T], -1)], 1)
    order = torch.sort(cand[..., VALUE], dim=1, descending=True, stable=True).indices[:, :k]
    return cand.gather(1, order[..., None].expand(-1, -1, 3))


def _per_unit_sum(view: Any, t: torch.Tensor) -> torch.Tensor:
    """Per image and unit, the sum over positions: (N, L) float64."""
    s = view._rows(t).sum(2).double()
    if view.index is None:
        return s
    K = s.shape[1]
    index = view.index if view.index.numel() == K else view.index.expand(K)
    return torch.zeros(s.shape[0], view.size, dtype=torch.float64, device=t.device).index_add_(1, index, s)


def _per_unit(view: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and unit: the max over positions and its position; (N, L) float64 each.

    ``view`` says where the units of ``t`` are (:class:`connectome.extract.unit_sums.UnitView`).
    """
    rows = view._rows(t)  # (N, K, P): K unit slots, P positions
    n, K, P = rows.shape
    mx, arg = rows.max(2)
    mx = mx.double()
    if view.index is None:
        return mx, arg.double()
    L = view.size
    index = view.index if view.index.numel() == K else view.index.expand(K)
    at = index[None, :].expand(n, K)
    best = torch.full((n, L), -math.inf, dtype=torch.float64, device=t.device).scatter_reduce(
        1, at, mx, "amax", include_self=True)
    # the position of the best slot of each unit (slot * P + position within it)
    q = torch.where(mx == best.gather(1, at), (torch.arange(K, device=t.device) * P)[None, :] + arg, -1).double()
    pos = torch.full((n, L), -1.0, dtype=torch.float64, device=t.device).scatter_reduce(1, at, q, "amax")
    return best, torch.where(pos >= 0, pos % P, pos)


class ExampleTracker:
    """Streaming top-k dataset examples per unit, for a traced model.

    Holds no lists of its own: they live on the :class:`FlowAccumulator` (or the loop of
    :func:`examples`) as fields declared with reduction ``"topk"``, one ``(n_units, k, 3)``
    float64 tensor per list over all units of the model in layer order (value, image index,
    position; index -1 marks an empty slot), so that checkpoints save them and
    :func:`~connectome.extract.distributed.all_reduce_accumulator` merges them with
    :func:`topk_merge`. During a batch, :meth:`observe` takes each layer's per-image maxima
    (or sums); :meth:`merge` then folds the whole batch into a list with one sort over all
    units, so the cost per batch does not grow with the number of layers.

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
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"examples must be a positive number of images per unit, got {k!r}")
        self.ug, self.device, self.k = ug, device, int(k)
        self.layers = [li for li, s in enumerate(ug.layers) if s.kind != Kind.INPUT and (layers is None or li in layers)]
        self.sizes = [s.size for s in ug.layers]
        self._pending: dict[bool, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {False: {}, True: {}}

    def empty(self) -> torch.Tensor:
        """One list's initial state: (n_units, k, 3) of (-inf, -1, -1)."""
        t = torch.full((sum(self.sizes), self.k, 3), -1.0, dtype=torch.float64, device=self.device)
        t[..., VALUE] = -math.inf
        return t

    def observe(self, li: int, view: Any, t: torch.Tensor, by_sum: bool = False) -> torch.Tensor | None:
        """Take one batch of layer ``li``'s values ``t`` (its candidates wait for :meth:`merge`).

        ``by_sum``: rank by the per-image sum over positions (attribution), else by the max;
        then returns the sum over the batch per unit, shape (L,) float64.
        """
        if li not in self.layers:
            return view.sum(t) if by_sum else None
        if by_sum:
            # ranked by the sum; cropped where the unit is most active in that image (the activation
            # list's position, observed in the same batch): no second arg-max pass
            s = _per_unit_sum(view, t.detach())
            self._pending[True][li] = (s, None)
            return s.sum(0)
        self._pending[False][li] = _per_unit(view, t.detach())
        return None

    def merge(self, state: torch.Tensor, by: str, index: torch.Tensor) -> torch.Tensor:
        """``state`` with the observed batch of list ``by`` ("activation" or "attribution") merged in.

        ``index``: the dataset index of each image of the batch, shape (N,).
        """
        pending = self._pending[by == "attribution"]
        if not pending:
            return state
        positions = self._pending[False]
        n = index.shape[0]
        vals, poss = [], []
        for li, size in enumerate(self.sizes):  # layers not observed this batch stay out (-inf)
            v, p = pending.get(li, (None, None))
            if v is not None and p is None:
                p = positions[li][1]
            if v is None:
                v = torch.full((n, size), -math.inf, dtype=torch.float64, device=state.device)
                p = torch.full((n, size), -1.0, dtype=torch.float64, device=state.device)
            vals.append(v)
            poss.append(p)
        out = _merge(state, torch.cat(vals, 1), torch.cat(poss, 1), index)
        pending.clear()
        return out

    def columns(self, state: torch.Tensor, by: str) -> dict[str, np.ndarray]:
        """Node attribute columns of one list, aligned with the graph's nodes (layer order)."""
        a = state.detach().cpu().numpy().copy()
        empty = a[..., INDEX] < 0
        a[..., VALUE][empty] = np.nan
        a[..., POS][empty] = -1
        return example_columns(LISTS[by], a[..., INDEX].astype(np.int64), a[..., VALUE],
                               a[..., POS].astype(np.int64))

    def meta(self) -> dict[str, Any]:
        """``meta["examples"]``: how many per unit and the receptive fields for crops."""
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
        """The index in the loader's dataset (its order's space) of the item at ``path``: for a
        category (a ``Subset``), its position in the subset, found through the root's samples."""
        if self._paths is None:
            samples = getattr(self.root, "samples", None) or []
            if self.map is None:
                self._paths = {str(p): i for i, (p, *_) in enumerate(samples)}
            else:
                self._paths = {str(samples[int(r)][0]): i for i, r in enumerate(self.map) if int(r) < len(samples)}
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
            out["stamps"] = file_stamps(out["paths"])
        return out


def file_stamps(paths: dict[str, str]) -> dict[str, list[int]]:
    """``index -> [size in bytes, modification time in ns]`` of each example image file, so that
    patches cut later from a file that changed since (:func:`connectome.patches.image_source`)
    are said to be suspect. A file that cannot be read now gets no stamp."""
    out: dict[str, list[int]] = {}
    for i, p in paths.items():
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[i] = [int(st.st_size), int(st.st_mtime_ns)]
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

    from connectome.extract._model import check_model, eval_mode, model_dtype, model_on, resolve_device
    from connectome.extract.unit_sums import UnitView
    from connectome.extract.build import graph_layers
    from connectome.extract.data import make_loader, no_images_error, unpack_batch, warn_skipped
    from connectome.extract.trace import run_nodes, trace_units
    from connectome.extract.targets import as_layer_names
    from connectome.graph import Connectome

    check_model(model)
    if max_images is not None and (int(max_images) != max_images or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive number of examples per unit, got {k!r}")
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
                    names = as_layer_names(layers)
                    wanted = None if names is None else [ug.layer_index(n) for n in names]
                    tracker = ExampleTracker(ug, dev, k, wanted)
                    state = tracker.empty()
                    for li in tracker.layers:
                        node = ug.layers[li].out_node
                        u = ug.units[node]
                        watch[node] = (li, UnitView(u, ug.layers[u.layer].size, dev))

                def on_value(node: Any, value: Any) -> Any:
                    hit = watch.get(node.name)
                    if hit is not None:  # observed as computed: a later in-place op cannot change it
                        tracker.observe(hit[0], hit[1], value)
                    return value

                run_nodes(ug.gm, (x,), on_value=on_value)
                state = tracker.merge(state, "activation", index)
                seen += n_used
                bar.update(n_used)
                if max_images is not None and seen >= max_images:
                    break
    finally:
        bar.close()
    warn_skipped(skipped)
    if tracker is None:
        raise no_images_error(skipped)
    n_out = ug.layers[ug.output_layer].size
    cols = tracker.columns(state, "activation")
    used = np.concatenate([v for c, v in cols.items() if c.startswith("example_index_")])
    meta = {"model": name or type(model).__name__, "method": "examples", "n_images": seen,
            "examples": {**tracker.meta(), "lists": ["activation"], **order.describe(used)},
            "seconds": round(time.perf_counter() - t0, 3), "device": str(dev), "versions": versions()}
    layers_ = graph_layers(ug, labels_for_output(labels, info.classes, n_out))
    units = np.concatenate([np.arange(l.size, dtype=np.int64) for l in layers_])
    empty = np.zeros(0, dtype=np.int64)
    return Connectome(layers=tuple(layers_), node_units=units, src=empty, dst=empty, weight=np.zeros(0),
                      node_attrs=cols, meta=meta)
