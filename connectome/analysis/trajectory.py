"""How a connectome changes over training: edges, communities, circuits, hubs.

:func:`trajectory` reads a sequence of graphs of one topology (from
:func:`connectome.extract.over_training`) and reports, per step, how much the edge weights
into each layer changed, how stable the Leiden communities are (normalised mutual
information between consecutive partitions), how close each category's circuit is to its
final one (Jaccard of the unit sets) and when it forms (the first step with Jaccard >= 0.5),
and which hubs persist.

References
----------
Danon, L. et al. (2005). Comparing community structure identification. J. Stat. Mech. (NMI).
Achille, A., Rovere, M. & Soatto, S. (2019). Critical learning periods in deep networks. ICLR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from connectome.errors import ConnectomeError
from connectome.graph import Connectome

__all__ = ["trajectory", "Trajectory", "FORMED_AT"]

#: Jaccard to the final circuit at which a category's circuit counts as formed.
FORMED_AT = 0.5


@dataclass(frozen=True, eq=False)
class Trajectory:
    """A connectome over training.

    Attributes
    ----------
    steps : tuple of int
        The checkpoints' steps (``meta["step"]``, else positions).
    layers : list of str
        Layers with incoming edges, rows of ``change``.
    change : ndarray, shape (n_layers, n_steps - 1)
        Relative change of the edge weights into each layer from the step before:
        ``sum |w_t - w_{t-1}| / sum |w_{t-1}|`` (averaged over categories for attribution
        graphs; ``inf`` when the weights were all zero before and are not now).
    nmi : ndarray, shape (n_steps - 1,)
        Normalised mutual information between the Leiden partitions of consecutive steps
        (1: the same communities).
    jaccard : dict of str -> ndarray, shape (n_steps,)
        Per category, Jaccard index of its circuit's units with the final circuit's.
    formed : dict of str -> int or None
        Per category, the first step whose circuit has Jaccard >= ``FORMED_AT`` with the final
        one.
    hubs : list of str
        Hidden units among the ``top`` strongest (total ``|w|``) at every step (persistent
        hubs), strongest at the final step first.
    hub_presence : dict of str -> float
        For every unit that is a hub at some step, the fraction of steps it is one.
    memberships : list of ndarray
        The Leiden partition of each step.
    """

    steps: tuple[int, ...]
    layers: list[str]
    change: np.ndarray
    nmi: np.ndarray
    jaccard: dict[str, np.ndarray]
    formed: dict[str, int | None]
    hubs: list[str]
    hub_presence: dict[str, float]
    memberships: list[np.ndarray]

    def to_dict(self) -> dict[str, Any]:
        f = (lambda a: [None if not math.isfinite(float(v)) else float(v) for v in np.ravel(a)])
        return {
            "steps": list(self.steps), "layers": list(self.layers),
            "change": [f(r) for r in self.change], "nmi": f(self.nmi),
            "jaccard": {k: f(v) for k, v in self.jaccard.items()}, "formed": dict(self.formed),
            "hubs": list(self.hubs), "hub_presence": dict(self.hub_presence),
        }

    def __repr__(self) -> str:
        formed = ", ".join(f"{k}@{v}" for k, v in list(self.formed.items())[:6])
        nmi = " ".join(f"{v:.2f}" for v in self.nmi[:8])
        return (f"Trajectory({len(self.steps)} steps {self.steps[0]}..{self.steps[-1]}, {len(self.layers)} layers; "
                f"NMI {nmi}; circuits formed {formed}; {len(self.hubs)} persistent hubs {self.hubs[:5]})")


def _jaccard(a: set[str], b: set[str]) -> float:
    u = len(a | b)
    return 1.0 if u == 0 else len(a & b) / u


def _circuit_units(circuit: Any, g: Connectome, target: Any, mass: float) -> set[str]:
    """The circuit's node ids; empty where no flow reaches the target yet (early in training)."""
    from connectome.errors import EmptyGraphError

    try:
        return set(circuit(g, target=target, mass=mass).node_ids.tolist())
    except EmptyGraphError:
        return set()


def _as_series(graphs: Any) -> tuple[dict[str, list[Connectome]] | None, list[Connectome]]:
    if isinstance(graphs, Mapping):
        series = {str(k): list(v) for k, v in graphs.items()}
        if not series or any(not v for v in series.values()):
            raise ConnectomeError("graphs is empty; pass one graph per checkpoint (or per category a list of them)")
        lengths = {len(v) for v in series.values()}
        if len(lengths) != 1:
            raise ConnectomeError(f"categories have different numbers of checkpoints: {sorted(lengths)}")
        for v in series.values():
            _check_graphs(v)
        return series, next(iter(series.values()))
    gs = list(graphs)
    if not gs:
        raise ConnectomeError("graphs is empty; pass one graph per checkpoint")
    _check_graphs(gs)
    return None, gs


def _check_graphs(gs: Sequence[Any]) -> None:
    for k, g in enumerate(gs):
        if not isinstance(g, Connectome):
            raise ConnectomeError(f"graph {k} is a {type(g).__name__}; pass Connectomes (from over_training)")
    ref = gs[0]
    for k, g in enumerate(gs[1:], 1):
        if (g.layer_names != ref.layer_names or not np.array_equal(g.src, ref.src)
                or not np.array_equal(g.dst, ref.dst)):
            raise ConnectomeError(f"graph {k} has another topology than graph 0; put them on one with "
                                  "connectome.extract.over_training.same_topology")


def _change(gs: Sequence[Connectome]) -> tuple[list[str], np.ndarray]:
    ref = gs[0]
    dl = ref.node_layer[ref.dst]
    rows = sorted(set(dl.tolist()))
    out = np.zeros((len(rows), len(gs) - 1))
    for t in range(1, len(gs)):
        d = np.abs(gs[t].weight.astype(np.float64) - gs[t - 1].weight)
        base = np.abs(gs[t - 1].weight.astype(np.float64))
        num = np.bincount(dl, weights=d, minlength=len(ref.layers))
        den = np.bincount(dl, weights=base, minlength=len(ref.layers))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
        out[:, t - 1] = rel[rows]
    return [ref.layers[i].name for i in rows], out


def trajectory(
    graphs: Sequence[Connectome] | Mapping[str, Sequence[Connectome]],
    *,
    categories: Sequence[str] | None = None,
    mass: float = 0.8,
    top: int = 10,
    seed: int = 0,
) -> Trajectory:
    """Edge change per layer, community and circuit stability, and persistent hubs over
    training.

    Parameters
    ----------
    graphs : sequence of Connectome, or mapping category -> sequence of Connectome
        One graph per checkpoint, in training order, on one topology (as
        :func:`connectome.extract.over_training` returns them): weight graphs, or attribution
        graphs per category.
    categories : sequence of str, optional
        Categories whose circuits are followed. Weight graphs: output units (labels or
        indices), default every output unit. Attribution graphs: keys of ``graphs``,
        default all.
    mass : float, default 0.8
        Circuit mass (:func:`connectome.analysis.circuit`).
    top : int, default 10
        Hubs: the ``top`` units of largest strength at each step.
    seed : int, default 0
        Leiden seed (the same at every step, so identical graphs give identical partitions).

    Returns
    -------
    Trajectory

    Raises
    ------
    ConnectomeError
        No graphs, graphs of different topologies, an unknown category.

    Examples
    --------
    >>> traj = trajectory(cn.extract.over_training(model, ckpts, input_shape=(3, 32, 32)))  # doctest: +SKIP
    >>> traj.formed                                                                          # doctest: +SKIP
    {'circle': 400, 'square': 200, ...}
    """
    from connectome.analysis.centrality import strength
    from connectome.analysis.circuits import circuit
    from connectome.analysis.communities import _compare, communities

    series, base = _as_series(graphs)
    steps = tuple(int(g.meta.get("step", i)) for i, g in enumerate(base))
    T = len(base)
    # edges into each layer
    if series is None:
        layers, change = _change(base)
        comm_graphs = base
    else:
        parts = [_change(v) for v in series.values()]
        layers = parts[0][0]
        change = np.mean([p[1] for p in parts], axis=0) if T > 1 else parts[0][1]
        # communities of the summed |flow| over categories
        comm_graphs = [base[t].with_weight(sum(np.abs(v[t].weight.astype(np.float64)) for v in series.values()))
                       for t in range(T)]
    memberships = [np.asarray(communities(g, seed=seed).membership) for g in comm_graphs]
    nmi = np.array([_compare(memberships[t - 1], memberships[t], "nmi") for t in range(1, T)])

    # circuits per category
    if series is None:
        out = base[-1].layers[-1]
        names = list(out.labels) if out.labels is not None else [str(i) for i in range(out.size)]
        wanted = names if categories is None else [str(c) for c in categories]
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise ConnectomeError(f"unknown categories {unknown}; the output units are {names[:10]}")
        cseries = {c: [(g, f"{out.name}:{names.index(c)}") for g in base] for c in wanted}
    else:
        wanted = list(series) if categories is None else [str(c) for c in categories]
        unknown = [c for c in wanted if c not in series]
        if unknown:
            raise ConnectomeError(f"unknown categories {unknown}; graphs has {list(series)[:10]}")
        cseries = {c: [(g, None) for g in series[c]] for c in wanted}
    jaccard, formed = {}, {}
    for c, gts in cseries.items():
        sets = [_circuit_units(circuit, g, tg, mass) for g, tg in gts]
        j = np.array([_jaccard(s, sets[-1]) for s in sets])
        jaccard[c] = j
        hit = np.flatnonzero(j >= FORMED_AT)
        formed[c] = int(steps[hit[0]]) if hit.size else None

    # hubs
    from connectome.kinds import is_hidden

    hidden = np.array([is_hidden(l.kind) for l in base[0].layers])[base[0].node_layer]
    tops = []
    for g in comm_graphs:
        s = np.where(hidden, strength(g), -np.inf)  # hubs among hidden units, not the image or the logits
        order = np.lexsort((np.arange(s.size), -s))[: min(max(1, int(top)), int(hidden.sum()) or 1)]
        tops.append(set(g.node_ids[order].tolist()))
    final = strength(comm_graphs[-1])
    ids = comm_graphs[-1].node_ids.tolist()
    idx = {n: i for i, n in enumerate(ids)}
    persistent = set.intersection(*tops)
    hubs = sorted(persistent, key=lambda n: (-final[idx[n]], idx[n]))
    presence = {n: sum(n in s for s in tops) / T for n in sorted(set.union(*tops), key=lambda n: idx[n])}
    return Trajectory(steps=steps, layers=layers, change=change, nmi=nmi, jaccard=jaccard, formed=formed, hubs=hubs,
                      hub_presence=presence, memberships=memberships)
