"""Lesion studies: remove units (or edges) cumulatively and watch the model fail.

Network neuroscience asks how a connectome degrades under damage: a *targeted attack*
removes hubs first (by PageRank, strength or attribution), a *random failure* removes units
in random order; scale-free wiring tolerates the second and collapses under the first.
:func:`lesion_curve` removes hidden units in an order and records accuracy and the mean
target-class probability after each step; :func:`lesion_edges` zeroes the weights of a
graph's strongest edges. Each step is one mask pattern (units) or one weight state (edges)
run over the probe images, reusing the ablation machinery of
:mod:`connectome.analysis.ablation`: a unit is silenced by zeroing the value it passes on.

References
----------
Albert, R., Jeong, H. & Barabasi, A.-L. (2000). Error and attack tolerance of complex networks.
Nature 406.
Alstott, J. et al. (2009). Modeling the impact of lesions in the human brain. PLoS Comput Biol 5(6).
Morcos, A. S. et al. (2018). On the importance of single directions for generalization. ICLR.
"""

from __future__ import annotations

import copy
from collections import Counter
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome

__all__ = ["lesion_curve", "lesion_edges", "LesionCurve", "ORDERS"]

#: Named unit orders of :func:`lesion_curve` (besides a score array or mapping).
ORDERS = ("pagerank", "strength", "attribution", "random")


@dataclass(frozen=True, eq=False)
class LesionCurve:
    """Accuracy and target probability as units (or edges) are removed.

    Attributes
    ----------
    order : str
        ``"pagerank"``, ``"strength"``, ``"attribution"``, ``"scores"`` or ``"random"``.
    what : str
        ``"units"`` or ``"edges"``.
    scope : str
        ``"global"`` (one ranking over all hidden units) or ``"layer"`` (the same fraction of
        every layer); ``"edges"`` for edge lesions.
    x : ndarray, shape (steps + 1,)
        Fraction removed at each step (0 first: the intact model).
    n_removed : ndarray of int, shape (steps + 1,)
        Units (edges) removed at each step.
    accuracy, prob : ndarray, shape (n_curves, steps + 1)
        Accuracy against the labels (NaN without labels) and mean target probability, one row
        per curve (one for a targeted order, one per seed for ``"random"``).
    removed : tuple of str
        The removed units (edges ``"src->dst"``) of the first curve, in removal order
        (``removed[:n_removed[k]]`` are gone at step ``k`` for ``scope="global"``).
    seeds : tuple of int
        The seeds of the random curves (empty for a targeted order).
    n_images : int
    target : str or int
    """

    order: str
    what: str
    scope: str
    x: np.ndarray
    n_removed: np.ndarray
    accuracy: np.ndarray
    prob: np.ndarray
    removed: tuple[str, ...]
    seeds: tuple[int, ...]
    n_images: int
    target: Any

    @property
    def accuracy_mean(self) -> np.ndarray:
        return self.accuracy.mean(0)

    @property
    def prob_mean(self) -> np.ndarray:
        return self.prob.mean(0)

    def band(self, what: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest value of the curves at each step."""
        v = self.accuracy if what == "accuracy" else self.prob
        return v.min(0), v.max(0)

    def _area(self, v: np.ndarray) -> float:
        span = float(self.x[-1] - self.x[0])
        if span <= 0:
            return float(v.mean())
        return float(np.trapezoid(v.mean(0), self.x) / span)

    @property
    def auc_accuracy(self) -> float:
        """Area under the mean accuracy curve over the removed fraction, divided by its span
        (the mean accuracy along the attack; 1 when nothing ever fails)."""
        return self._area(self.accuracy)

    @property
    def auc_prob(self) -> float:
        """Area under the mean target-probability curve, divided by the span of ``x``."""
        return self._area(self.prob)

    def to_dict(self) -> dict[str, Any]:
        f = (lambda a: [None if not math.isfinite(v) else float(v) for v in np.ravel(a)])
        return {
            "order": self.order, "what": self.what, "scope": self.scope, "x": self.x.tolist(),
            "n_removed": self.n_removed.tolist(), "accuracy": [f(r) for r in self.accuracy],
            "prob": [f(r) for r in self.prob], "removed": list(self.removed), "seeds": list(self.seeds),
            "n_images": self.n_images, "target": self.target,
            "auc_accuracy": f([self.auc_accuracy])[0], "auc_prob": f([self.auc_prob])[0],
        }

    def __repr__(self) -> str:
        band = f", {len(self.seeds)} random seeds" if self.seeds else ""
        acc = " ".join(f"{v:.2f}" for v in self.accuracy_mean[: min(8, self.x.size)])
        more = " ..." if self.x.size > 8 else ""
        return (f"LesionCurve({self.what} by {self.order}, {self.scope}{band}: {self.x.size - 1} steps to "
                f"{self.x[-1]:.0%} removed; AUC accuracy {self.auc_accuracy:.3f}, prob {self.auc_prob:.3f}; "
                f"accuracy {acc}{more})")


# ----------------------------------------------------------------------------- unit scores
def _node_scores(order: Any, graph: Connectome | None, model: Any, x: Any, y: Any, target: Any, device: Any,
                 batch_size: int) -> tuple[str, Connectome, np.ndarray]:
    """``(name, graph, score per graph node)`` for a named order or given scores."""
    from connectome.analysis.centrality import centrality, strength

    if isinstance(order, str):
        if order not in ORDERS:
            raise ConnectomeError(f"order must be one of {', '.join(ORDERS)}, a score array or a mapping of node id "
                                  f"to score; got {order!r}")
        if order == "random":
            raise AssertionError("random orders have no scores")  # pragma: no cover - handled by the caller
        if graph is None:
            from connectome.extract import attribution, weights

            if order == "attribution":
                graph = attribution(model, (x, y) if y is not None else x, target, device=device,
                                    batch_size=batch_size, progress=False)
            else:
                graph = weights(model, tuple(x.shape[1:]))
        if order == "strength":
            return order, graph, strength(graph)
        if order == "pagerank":
            return order, graph, centrality(graph, "pagerank")["pagerank"]
        if "attribution" not in graph.node_attrs:
            raise ConnectomeError("order='attribution' needs an attribution graph (node attribute 'attribution'); "
                                  "pass graph=cn.extract.attribution(model, data) or graph=None to compute one")
        return order, graph, np.abs(np.asarray(graph.node_attrs["attribution"], dtype=np.float64))
    if isinstance(order, Mapping):
        if graph is None:
            ids = list(order)
            scores = np.asarray([float(order[k]) for k in ids])
            return "scores", None, (ids, scores)  # type: ignore[return-value]
        s = np.full(graph.num_nodes, -np.inf)
        s[graph.index_of(list(order))] = [float(v) for v in order.values()]
        return "scores", graph, s
    s = np.asarray(order, dtype=np.float64)
    if graph is None:
        raise ConnectomeError("a score array needs the graph it is aligned with: pass graph=... (one score per node)")
    if s.shape != (graph.num_nodes,):
        raise ConnectomeError(f"order has {s.size} scores for a graph of {graph.num_nodes} nodes; "
                              "pass one score per node of graph, in graph.node_ids order")
    return "scores", graph, s


def _ranked_units(t: Any, graph: Connectome | None, scores: Any) -> np.ndarray:
    """Every hidden unit of the model as ``(traced layer, unit)`` rows, highest score first
    (ties in layer-then-unit order; unscored units last, in that order too)."""
    from connectome.extract.probe import IO_KINDS

    if graph is None:  # a mapping without a graph
        ids, s = scores
    else:
        ids, s = graph.node_ids.tolist(), np.asarray(scores, dtype=np.float64)
    hidden = [li for li, l in enumerate(t.layers) if l.kind not in IO_KINDS]
    score = {li: np.full(t.ug.layers[li].size, -np.inf) for li in hidden}
    scored = 0
    for nid, v in zip(ids, s.tolist()):
        layer, _, unit = str(nid).rpartition(":")
        li = t.index(layer)
        if li not in score or not unit.isdigit() or int(unit) >= score[li].size:
            continue
        score[li][int(unit)] = v if math.isfinite(v) else -np.inf
        scored += 1
    if not scored:
        raise EmptyGraphError("no hidden unit of the model is scored; pass a graph (or scores) of this model's units")
    units = np.array([(li, u) for li in hidden for u in range(score[li].size)], dtype=np.int64).reshape(-1, 2)
    flat = np.concatenate([score[li] for li in hidden])
    return units[np.lexsort((units[:, 1], units[:, 0], -flat))]


def _check_steps(steps: Any, fraction: Any) -> tuple[int, float]:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConnectomeError(f"steps must be a positive integer; got {steps!r}")
    if isinstance(fraction, bool) or not 0 < float(fraction) <= 1:
        raise ConnectomeError(f"fraction must be in (0, 1]; got {fraction!r}")
    return int(steps), float(fraction)


def _seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConnectomeError(f"seeds must be a positive count or a list of seeds; got {seeds!r}")
        return list(range(int(seeds)))
    out = [int(s) for s in seeds]
    if not out:
        raise ConnectomeError("seeds is empty; pass a count (e.g. 10) or a list of seeds")
    return out


def _step_masks(ranked: np.ndarray, sizes: Mapping[int, int], xs: np.ndarray,
                scope: str) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Keep-masks ``(len(xs), size)`` per hidden layer and units removed per step: step ``k``
    removes the first ``round(xs[k] * total hidden units)`` of ``ranked`` (``(n, 2)`` rows of
    ``(layer, unit)``), or with ``scope == "layer"`` the first ``round(xs[k] * size)`` of each
    layer's own ranked units."""
    big = np.iinfo(np.int64).max  # units left out of ``ranked`` are never removed
    masks, cut = {}, np.zeros(len(xs), dtype=np.int64)
    if scope == "global":
        total = sum(sizes.values())
        cut = np.asarray([int(round(f * total)) for f in xs], dtype=np.int64)
    for li, size in sizes.items():
        at = np.flatnonzero(ranked[:, 0] == li)
        pos = np.full(size, big, dtype=np.int64)
        if scope == "global":
            pos[ranked[at, 1]] = at
            c = cut
        else:
            pos[ranked[at, 1]] = np.arange(at.size)
            c = np.minimum([int(round(f * size)) for f in xs], at.size)
            cut += c
        masks[li] = (pos[None, :] >= c[:, None]).astype(np.float32)
    return masks, cut


# ----------------------------------------------------------------------------- unit lesions
def lesion_curve(
    model: Any,
    data: Any,
    order: Any = "strength",
    *,
    graph: Connectome | None = None,
    steps: int = 10,
    fraction: float = 1.0,
    scope: str = "global",
    seeds: Any = 10,
    target: Any = "label",
    device: Any = None,
    batch_size: int | None = None,
) -> LesionCurve:
    """Remove hidden units cumulatively in an order; accuracy and target probability per step.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable classifier; left as found (see :func:`connectome.analysis.ablate`).
    data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        Probe images (held in memory), with labels for accuracy.
    order : {"strength", "pagerank", "attribution", "random"}, array or mapping
        Most important unit first: by total ``|w|`` strength or PageRank in ``graph``, by
        ``|attribution|`` (node attribute of ``graph``), by a score array aligned with
        ``graph.node_ids`` or a mapping node id -> score (unscored units come last), or in a
        random order per seed (a band of curves).
    graph : Connectome, optional
        The graph the order reads. ``None``: the model's weight graph (strength, pagerank) or
        its attribution graph on ``data`` for ``target`` (attribution).
    steps : int, default 10
        The curve has ``steps + 1`` points at ``x = fraction * k / steps``.
    fraction : float, default 1.0
        The largest fraction of hidden units removed.
    scope : {"global", "layer"}, default "global"
        ``"global"``: step ``k`` removes the ``round(x_k * n)`` best-ranked of all ``n``
        hidden units; ``"layer"``: in every hidden layer, its ``round(x_k * size)``
        best-ranked units (every layer loses the same share).
    seeds : int or sequence of int, default 10
        For ``order="random"``: the number of random orders (seeds ``0..n-1``) or the seeds.
    target : "label", "predicted", int or str, default "label"
        The class whose probability is recorded (as in :func:`connectome.analysis.ablate`).
    device : optional
        ``None``: CUDA when available.
    batch_size : int, optional
        Rows of (step, image) per forward; ``None``: the number of images, i.e. one batched
        forward pass per step.

    Returns
    -------
    LesionCurve

    Raises
    ------
    ConnectomeError
        Unknown order or scope, bad ``steps`` / ``fraction`` / ``seeds``, scores that do not
        fit the graph, an attribution order without attribution.
    DataError
        No images, ``target="label"`` without labels.

    Examples
    --------
    >>> hubs = lesion_curve(model, (x, y), "pagerank", steps=10, fraction=0.5)     # doctest: +SKIP
    >>> rand = lesion_curve(model, (x, y), "random", steps=10, fraction=0.5)       # doctest: +SKIP
    >>> hubs.auc_accuracy < rand.auc_accuracy                                       # doctest: +SKIP
    True
    """
    import torch

    from connectome.analysis.ablation import _run_patterns, _scores, _target
    from connectome.extract.probe import IO_KINDS, load_probe, traced

    steps, fraction = _check_steps(steps, fraction)
    if scope not in ("global", "layer"):
        raise ConnectomeError(f"scope must be 'global' or 'layer'; got {scope!r}")
    rand = isinstance(order, str) and order == "random"
    seed_list = _seeds(seeds) if rand else []
    x_cpu, y, classes = load_probe(data, batch_size or 64)
    n = int(x_cpu.shape[0])
    bs = int(batch_size) if batch_size else n
    if bs < 1:
        raise ConnectomeError(f"batch_size must be >= 1; got {batch_size!r}")
    if not rand:
        name, graph, scores = _node_scores(order, graph, model, x_cpu, y, target, device, bs)
    with traced(model, x_cpu, device) as t:
        tgt = _target(target, y, t, classes, "lesion_curve")
        hidden = [i for i, l in enumerate(t.layers) if l.kind not in IO_KINDS]
        if not hidden:
            raise EmptyGraphError("the model has no hidden units to remove")
        sizes = {li: t.ug.layers[li].size for li in hidden}
        if rand:
            name = "random"
            all_units = np.array([(li, u) for li in hidden for u in range(sizes[li])], dtype=np.int64).reshape(-1, 2)
            orders = [all_units[np.random.default_rng(s).permutation(len(all_units))] for s in seed_list]
        else:
            orders = [_ranked_units(t, graph, scores)]
        xs = fraction * np.arange(steps + 1) / steps
        P = steps + 1
        acc, prob, counts = [], [], None
        x = x_cpu.to(t.device, dtype=t.dtype)
        for ranked in orders:
            masks, cut = _step_masks(ranked, sizes, xs, scope)
            counts = cut if counts is None else counts
            s = _scores(_run_patterns(t, x, {li: torch.from_numpy(m) for li, m in masks.items()}, P, bs), tgt, y)
            acc.append(s["acc"])
            prob.append(s["prob"])
        first = orders[0]
        if scope == "layer":
            removed = tuple(f"{t.layers[li].name}:{u}" for li, u in first if li in hidden)
        else:
            removed = tuple(f"{t.layers[li].name}:{u}" for li, u in first[: int(counts[-1])])
    return LesionCurve(order=name, what="units", scope=scope, x=xs, n_removed=counts, accuracy=np.vstack(acc),
                       prob=np.vstack(prob), removed=removed, seeds=tuple(seed_list), n_images=n,
                       target=target if isinstance(target, str) else int(target))


# ----------------------------------------------------------------------------- edge lesions
def _edge_slices(model: Any, t: Any, graph: Connectome) -> tuple[list[tuple[str, int, int, int]], list[int]]:
    """For every edge of ``graph`` into a Conv2d / Linear layer fed directly by the source
    layer: ``(parameter name, output row, first input column, columns)`` to zero; and the
    edges kept."""
    import torch.nn as nn

    modules = dict(model.named_modules())
    where: list[tuple[str, int, Any]] = []
    keep: list[int] = []
    layers = graph.layers
    nl = graph.node_layer
    # a module called twice is a layer per call with one weight: zeroing an edge of one call
    # would remove it from both, so the edges into such layers are not lesioned
    calls = Counter(l.module or l.name for l in layers)
    for e in range(graph.num_edges):
        ls, ld = layers[nl[graph.src[e]]], layers[nl[graph.dst[e]]]
        if calls[ld.module or ld.name] > 1:
            continue
        mod = modules.get(ld.module or ld.name)
        li = t.index(ls.name)
        if mod is None or li is None:
            continue
        size = t.ug.layers[li].size
        i, j = int(graph.node_units[graph.src[e]]), int(graph.node_units[graph.dst[e]])
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.in_channels == size:
            where.append((f"{ld.module or ld.name}.weight", j, i, 1))
        elif isinstance(mod, nn.Linear) and size and mod.in_features % size == 0:
            p = mod.in_features // size
            where.append((f"{ld.module or ld.name}.weight", j, i * p, p))
        else:
            continue
        keep.append(e)
    return where, keep


def _zero_edges(params: Mapping[str, Any], where: Sequence[np.ndarray], edges: np.ndarray) -> None:
    """Zero the weights of ``edges``: one indexed write per parameter. ``where`` holds the
    columns of :func:`_edge_slices`'s rows as arrays (name, row, first column, columns)."""
    import torch

    names, row, start, width = (v[edges] for v in where)
    for pname in np.unique(names).tolist():
        at = names == pname
        w = width[at]
        offset = np.arange(int(w.sum())) - np.repeat(np.cumsum(w) - w, w)  # 0..w-1 within each edge
        rows, cols = np.repeat(row[at], w), np.repeat(start[at], w) + offset
        params[pname][torch.from_numpy(rows), torch.from_numpy(cols)] = 0.0


def lesion_edges(
    model: Any,
    graph: Connectome,
    data: Any,
    order: str = "strength",
    *,
    steps: int = 10,
    fraction: float = 1.0,
    seeds: Any = 10,
    target: Any = "label",
    device: Any = None,
    batch_size: int | None = None,
) -> LesionCurve:
    """Zero the weights of a graph's edges cumulatively, strongest ``|weight|`` first (or in
    random orders); accuracy and target probability per step.

    Only edges into a ``Conv2d`` (``groups=1``) or ``Linear`` layer whose input is the
    source layer can be lesioned: their weights ``W[j, i]`` (a Linear reading a flattened
    ``C x H x W`` map: the ``H * W`` columns of channel ``i``) are set to 0 in a copy of the
    model. Other edges (identity edges of residual adds, concats) have no weight of their
    own and are left out of the ranking.

    Parameters
    ----------
    model : nn.Module
        Left as found: a copy is changed.
    graph : Connectome
        A weight (or attribution) graph of ``model``; its ``|weight|`` ranks the edges.
    data : as :func:`lesion_curve`
    order : {"strength", "random"}, default "strength"
    steps, fraction, seeds, target, device, batch_size : as :func:`lesion_curve`
        ``fraction`` is of the lesionable edges; each step is one forward pass over the
        images (``batch_size`` images at a time, default all).

    Returns
    -------
    LesionCurve
        ``what == "edges"``; ``removed`` lists ``"src->dst"`` node ids.

    Raises
    ------
    ConnectomeError
        No lesionable edge, an unknown order, bad steps / fraction / seeds.
    """
    import torch

    from connectome.analysis.ablation import _scores, _target
    from connectome.extract._model import eval_mode, model_dtype, resolve_device
    from connectome.extract.probe import load_probe, traced

    if not isinstance(graph, Connectome):
        raise ConnectomeError(f"graph must be a Connectome of the model; got {type(graph).__name__}")
    if order not in ("strength", "random"):
        raise ConnectomeError(f"order must be 'strength' or 'random' for edges; got {order!r}")
    steps, fraction = _check_steps(steps, fraction)
    seed_list = _seeds(seeds) if order == "random" else []
    x_cpu, y, classes = load_probe(data, batch_size or 64)
    n = int(x_cpu.shape[0])
    bs = int(batch_size) if batch_size else n
    with traced(model, x_cpu, device) as t:
        tgt = _target(target, y, t, classes, "lesion_edges")
        where, keep = _edge_slices(model, t, graph)
    if not keep:
        raise ConnectomeError("no edge of the graph has a weight of its own to zero (edges into Conv2d or Linear "
                              "layers fed by their source layer); pass the model's weight graph")
    w = np.abs(np.asarray(graph.weight, dtype=np.float64))[keep]
    slices = [np.asarray(v) for v in zip(*where)]  # names, rows, first columns, widths
    ids = graph.node_ids
    names = [f"{ids[graph.src[e]]}->{ids[graph.dst[e]]}" for e in keep]
    if order == "random":
        orders = [np.random.default_rng(s).permutation(len(keep)) for s in seed_list]
    else:
        orders = [np.lexsort((np.arange(len(keep)), -w))]
    xs = fraction * np.arange(steps + 1) / steps
    cut = np.asarray([int(round(f * len(keep))) for f in xs], dtype=np.int64)
    dev = resolve_device(device)
    acc, prob = [], []
    for perm in orders:
        m = copy.deepcopy(model).to(dev)
        params = dict(m.named_parameters())
        dtype = model_dtype(m)
        logits = []
        with eval_mode(m), torch.inference_mode():
            done = 0
            for c in cut.tolist():
                _zero_edges(params, slices, perm[done:c])
                done = c
                out = [m(x_cpu[s:s + bs].to(dev, dtype=dtype)) for s in range(0, n, bs)]
                logits.append(torch.cat(out).reshape(n, -1))
        s = _scores(torch.stack(logits), tgt, y)
        acc.append(s["acc"])
        prob.append(s["prob"])
    removed = tuple(names[i] for i in orders[0][: int(cut[-1])].tolist())
    return LesionCurve(order=order, what="edges", scope="edges", x=xs, n_removed=cut, accuracy=np.vstack(acc),
                       prob=np.vstack(prob), removed=removed, seeds=tuple(seed_list), n_images=n,
                       target=target if isinstance(target, str) else int(target))
