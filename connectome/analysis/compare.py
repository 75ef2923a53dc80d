"""Compare graphs of one model: two categories unit by unit, or many categories layer by layer.

Node ids are stable across the graphs of one model, so "the same unit" has a meaning here:
:func:`compare` tells which units matter for both categories (*same* units) and which for
only one, and measures how similar the two graphs are per layer (top-unit Jaccard, weighted
overlap and rank correlation of attribution, overlap of the circuits, agreement of the
community structure). That some structure is *analogous* rather than the same, i.e. carried
by different units, is what :func:`connectome.analysis.find_analogous` looks for.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from connectome.analysis._util import finish_correlation
from connectome.analysis._util import nan_to_none as _nan_to_none
from connectome.analysis._util import progress_bar
from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome

__all__ = ["compare", "compare_categories", "Comparison", "LayerComparison", "CategoryCorrelation"]


# ---------------------------------------------------------------------- helpers
def _check_same_model(graphs: Mapping[str, Connectome]) -> None:
    """Raise unless all graphs have the same layers (names, sizes) and units."""
    items = list(graphs.items())
    name0, g0 = items[0]
    shape0 = [(l.name, l.size) for l in g0.layers]
    for name, g in items[1:]:
        shape = [(l.name, l.size) for l in g.layers]
        if shape != shape0:
            diff = next(
                (f"layer {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(shape0, shape)) if a != b),
                f"{len(shape0)} vs {len(shape)} layers",
            )
            raise ConnectomeError(
                f"graphs of different models: {name0!r} and {name!r} have different layers "
                f"(name, size) ({diff}); compare graphs extracted from one model, or use "
                "find_analogous / match_units across models"
            )
        if not np.array_equal(g.node_units, g0.node_units):
            raise ConnectomeError(
                f"graphs {name0!r} and {name!r} have the same layers but different units (subgraphs or "
                "pruned nodes?); compare full graphs of one model"
            )


def _strength(g: Connectome) -> np.ndarray:
    """Total |weight| in and out of each node."""
    a = np.abs(np.asarray(g.weight, dtype=np.float64))
    return np.bincount(g.src, weights=a, minlength=g.num_nodes) + np.bincount(g.dst, weights=a, minlength=g.num_nodes)




def _jaccard(a: set, b: set) -> float:
    u = a | b
    return len(a & b) / len(u) if u else float("nan")


def _top_set(imp: np.ndarray, top: int) -> np.ndarray:
    """Positions of the ``top`` largest non-zero ``|imp|`` (ties by position)."""
    a = np.abs(imp)
    nz = np.flatnonzero(np.isfinite(a) & (a > 0))
    order = nz[np.lexsort((nz, -a[nz]))]
    return order[:top]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(a, b).statistic
    return float(r)


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information ``2 I / (H_a + H_b)`` (Danon et al. 2005); 1 for two
    one-cluster partitions."""
    a = np.unique(np.asarray(a), return_inverse=True)[1]
    b = np.unique(np.asarray(b), return_inverse=True)[1]
    n = a.size
    if n == 0:
        return float("nan")
    cont = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(cont, (a, b), 1.0)
    p = cont / n
    pa, pb = p.sum(axis=1), p.sum(axis=0)

    def h(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    ha, hb = h(pa), h(pb)
    if ha + hb == 0:
        return 1.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, min(1.0, 2 * mi / (ha + hb)))


def _default_membership(g: Connectome, seed: int) -> np.ndarray:
    """The partition :func:`connectome.analysis.communities` gives by default (cached per graph)."""
    from connectome.analysis.communities import communities

    try:
        return communities(g, method="modularity", seed=seed).membership
    except EmptyGraphError:  # no edge of non-zero weight: every unit on its own
        return np.arange(g.num_nodes)


def _step(bar: Any, what: str, n: int = 1) -> None:
    if bar is not None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(n)


def _as_membership(p: Any, g: Connectome, which: str) -> np.ndarray:
    m = np.asarray(getattr(p, "membership", p))
    if m.shape != (g.num_nodes,):
        raise ConnectomeError(
            f"partition of graph {which} has shape {m.shape}, expected ({g.num_nodes},) aligned with node_ids"
        )
    return m


def _circuit_nodes(g: Connectome, mass: float) -> set[str] | None:
    """Node ids of the graph's circuit, ``None`` when it has no category target."""
    from connectome.analysis.circuits import circuit, has_target

    if not has_target(g):
        return None
    try:
        return set(circuit(g, mass=mass).node_ids.tolist())
    except EmptyGraphError:
        return set()


# ---------------------------------------------------------------------- compare
@dataclass(frozen=True)
class LayerComparison:
    """How one layer of two graphs compares.

    Attributes
    ----------
    layer : str
    n_units : int
    top : int
        Size cap of the top sets (``min(top, n_units)``).
    jaccard : float
        Jaccard index of the two top sets (NaN when both are empty).
    weighted_overlap : float
        ``sum min(|a|, |b|) / sum max(|a|, |b|)`` over the layer's units.
    spearman : float
        Spearman rank correlation of the signed importance (NaN when constant).
    circuit_jaccard : float or None
        Jaccard index of the circuits' units in this layer (None without circuits).
    nmi : float
        NMI of the two community partitions restricted to this layer.
    shared, only_a, only_b : tuple of str
        Units in both top sets, only in the first, only in the second.
    """

    layer: str
    n_units: int
    top: int
    jaccard: float
    weighted_overlap: float
    spearman: float
    circuit_jaccard: float | None
    nmi: float
    shared: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return _nan_to_none(
            {
                "layer": self.layer,
                "n_units": self.n_units,
                "top": self.top,
                "jaccard": self.jaccard,
                "weighted_overlap": self.weighted_overlap,
                "spearman": self.spearman,
                "circuit_jaccard": self.circuit_jaccard,
                "nmi": self.nmi,
                "shared": list(self.shared),
                "only_a": list(self.only_a),
                "only_b": list(self.only_b),
            }
        )


def _fmt(x: float | None, width: int = 8) -> str:
    if x is None:
        return f"{'-':>{width}}"
    if not math.isfinite(x):
        return f"{'nan':>{width}}"
    return f"{x:>{width}.3f}"


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`.

    Attributes
    ----------
    a, b : str
        Names of the two graphs (their categories when known).
    importance : str
        ``"attribution"`` (|node attribution|) or ``"strength"`` (total |weight|).
    per_layer : tuple of LayerComparison
        One row per layer, in layer order.
    shared_units : tuple of str
        Node ids in the top sets of both graphs, over all layers (the *same* units).
    summary : dict
        Means over layers (NaN-skipping) of ``jaccard``, ``weighted_overlap``, ``spearman``;
        ``circuit_jaccard`` over all units (None without circuits); ``nmi`` of the whole
        partitions; ``n_shared``; ``top``; ``mass``.
    """

    a: str
    b: str
    importance: str
    per_layer: tuple[LayerComparison, ...]
    shared_units: tuple[str, ...]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None)."""
        return {
            "a": self.a,
            "b": self.b,
            "importance": self.importance,
            "per_layer": [r.to_dict() for r in self.per_layer],
            "shared_units": list(self.shared_units),
            "summary": _nan_to_none(dict(self.summary)),
        }

    def __repr__(self) -> str:
        s = self.summary
        lines = [
            f"Comparison({self.a!r} vs {self.b!r}: importance={self.importance}, top={s.get('top')}, "
            f"{len(self.shared_units)} shared units)"
        ]
        width = max([len(r.layer) for r in self.per_layer] + [5])
        lines.append(
            f"  {'layer':<{width}} {'units':>6} {'jaccard':>8} {'overlap':>8} {'spearman':>8} "
            f"{'circuit':>8} {'nmi':>8} {'shared':>7} {'only a':>7} {'only b':>7}"
        )
        for r in self.per_layer:
            lines.append(
                f"  {r.layer:<{width}} {r.n_units:>6} {_fmt(r.jaccard)} {_fmt(r.weighted_overlap)} "
                f"{_fmt(r.spearman)} {_fmt(r.circuit_jaccard)} {_fmt(r.nmi)} "
                f"{len(r.shared):>7} {len(r.only_a):>7} {len(r.only_b):>7}"
            )
        lines.append(
            "  summary: "
            + ", ".join(
                f"{k}={_fmt(s.get(k), 0).strip()}"
                for k in ("jaccard", "weighted_overlap", "spearman", "circuit_jaccard", "nmi")
            )
        )
        return "\n".join(lines)


def _nanmean(xs: Sequence[float | None]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def compare(
    g_a: Connectome,
    g_b: Connectome,
    top: int = 20,
    mass: float = 0.8,
    partitions: tuple[Any, Any] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> Comparison:
    """Compare two graphs of one model (typically two categories) layer by layer.

    Unit importance is ``|attribution|`` when both graphs carry node attribution, else
    strength (total ``|weight|`` in and out). Per layer:

    - ``jaccard``: Jaccard index of the ``top`` most important units (non-zero only);
    - ``weighted_overlap``: ``sum min(|a|, |b|) / sum max(|a|, |b|)`` (Ruzicka similarity);
    - ``spearman``: Spearman rank correlation of the signed importance;
    - ``circuit_jaccard``: Jaccard index of the units of ``circuit(g, mass=mass)`` of each
      graph, when both have a category target (else None);
    - ``nmi``: normalised mutual information of the two community partitions on the
      layer's units;
    - ``shared`` / ``only_a`` / ``only_b``: units in both top sets (the *same* units) or in
      one only.

    Parameters
    ----------
    g_a, g_b : Connectome
        Graphs of one model: same layers (names and sizes) and units.
    top : int, default 20
        Size of the per-layer top sets.
    mass : float, default 0.8
        ``mass`` of the circuits compared.
    partitions : (partition, partition), optional
        Community partitions of ``g_a`` and ``g_b`` (arrays aligned with ``node_ids`` or
        objects with ``.membership``, e.g. :func:`connectome.analysis.communities`).
        Default: ``communities(g, seed=seed)`` of each graph (Leiden, directed modularity
        on ``|weight|``), the same partition the user and the reports get from that call:
        it is computed once per graph and reused.
    seed : int, default 0
        Seed of the default Leiden runs.
    progress : bool, optional
        Show the steps on a progress bar (stderr); by default on graphs of more than a
        million edges, where each takes seconds.

    Returns
    -------
    Comparison

    Raises
    ------
    ConnectomeError
        Graphs of different models (different layers or units).

    Examples
    --------
    >>> from connectome.analysis._toys import toy_attribution
    >>> c = compare(toy_attribution("cat"), toy_attribution("dog"), top=2)
    >>> c.shared_units, c.per_layer[1].only_a, c.per_layer[1].only_b
    (('in:1',), ('h1:0', 'h1:1'), ('h1:2', 'h1:3'))

    References
    ----------
    Danon, L. et al. (2005). Comparing community structure identification. J. Stat. Mech.
    Traag, V. A., Waltman, L. & van Eck, N. J. (2019). From Louvain to Leiden: guaranteeing
    well-connected communities. Sci. Rep. 9, 5233.
    """
    if isinstance(top, bool) or int(top) != top or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    top = int(top)
    name_a = str(g_a.meta.get("category") or "a")
    name_b = str(g_b.meta.get("category") or "b")
    if name_a == name_b:
        name_a, name_b = f"{name_a} (a)", f"{name_b} (b)"
    _check_same_model({name_a: g_a, name_b: g_b})
    if "attribution" in g_a.node_attrs and "attribution" in g_b.node_attrs:
        importance = "attribution"
        imp_a = np.asarray(g_a.node_attrs["attribution"], dtype=np.float64)
        imp_b = np.asarray(g_b.node_attrs["attribution"], dtype=np.float64)
    else:
        importance = "strength"
        imp_a, imp_b = _strength(g_a), _strength(g_b)
    bar = progress_bar(4, "compare", progress, heavy=g_a.num_edges > 1_000_000)
    try:
        if partitions is None:
            mem_a = _default_membership(g_a, seed)
            _step(bar, f"communities of {name_a}")
            mem_b = _default_membership(g_b, seed)
            _step(bar, f"communities of {name_b}")
        else:
            mem_a, mem_b = _as_membership(partitions[0], g_a, "a"), _as_membership(partitions[1], g_b, "b")
            _step(bar, "partitions given", 2)
        circ_a = _circuit_nodes(g_a, mass)
        _step(bar, f"circuit of {name_a}")
        circ_b = _circuit_nodes(g_b, mass)
        _step(bar, f"circuit of {name_b}")
    finally:
        if bar is not None:
            bar.close()
    have_circuits = circ_a is not None and circ_b is not None
    ids = g_a.node_ids
    rows = []
    shared_all: list[str] = []
    for l in g_a.layers:
        s = g_a.layer_slice(l.name)
        a, b = imp_a[s], imp_b[s]
        lid = ids[s]
        ta, tb = _top_set(a, top), _top_set(b, top)
        set_a, set_b = set(lid[ta].tolist()), set(lid[tb].tolist())
        aa, ab = np.abs(np.nan_to_num(a)), np.abs(np.nan_to_num(b))
        den = np.maximum(aa, ab).sum()
        wo = float(np.minimum(aa, ab).sum() / den) if den > 0 else float("nan")
        cj = None
        if have_circuits:
            lset = set(lid.tolist())
            cj = _jaccard(circ_a & lset, circ_b & lset)
        order = {u: i for i, u in enumerate(lid.tolist())}
        shared = tuple(sorted(set_a & set_b, key=order.__getitem__))
        rows.append(
            LayerComparison(
                layer=l.name,
                n_units=int(l.size),
                top=min(top, int(l.size)),
                jaccard=_jaccard(set_a, set_b),
                weighted_overlap=wo,
                spearman=_spearman(a, b),
                circuit_jaccard=cj,
                nmi=_nmi(mem_a[s], mem_b[s]),
                shared=shared,
                only_a=tuple(sorted(set_a - set_b, key=order.__getitem__)),
                only_b=tuple(sorted(set_b - set_a, key=order.__getitem__)),
            )
        )
        shared_all.extend(shared)
    summary = {
        "jaccard": _nanmean([r.jaccard for r in rows]),
        "weighted_overlap": _nanmean([r.weighted_overlap for r in rows]),
        "spearman": _nanmean([r.spearman for r in rows]),
        "circuit_jaccard": _jaccard(circ_a, circ_b) if have_circuits else None,
        "nmi": _nmi(mem_a, mem_b),
        "n_shared": len(shared_all),
        "top": top,
        "mass": float(mass),
        "partition": "given" if partitions is not None else f"communities(g, seed={seed}): Leiden, directed modularity",
    }
    return Comparison(
        a=name_a, b=name_b, importance=importance, per_layer=tuple(rows), shared_units=tuple(shared_all), summary=summary
    )


# ---------------------------------------------------------------------- many categories
@dataclass(frozen=True)
class CategoryCorrelation:
    """Per layer, the correlation across categories of per-unit profiles.

    Behaves as a read-only mapping ``layer name -> (classes, matrix)``.

    Attributes
    ----------
    classes : tuple of str
        Category names, the row/column order of every matrix.
    attr : str
        Node attribute that was correlated.
    matrices : dict of str -> ndarray, shape (n_classes, n_classes)
        Pearson correlation per layer (NaN where a profile is constant).
    """

    classes: tuple[str, ...]
    attr: str
    matrices: dict[str, np.ndarray]

    def __getitem__(self, layer: str) -> tuple[tuple[str, ...], np.ndarray]:
        try:
            return self.classes, self.matrices[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r}; layers are {list(self.matrices)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.matrices)

    def __len__(self) -> int:
        return len(self.matrices)

    def keys(self):
        return self.matrices.keys()

    def items(self):
        return ((k, (self.classes, m)) for k, m in self.matrices.items())

    def mean_offdiagonal(self) -> dict[str, float]:
        """Mean correlation between different categories, per layer (NaN-skipping)."""
        out = {}
        k = len(self.classes)
        off = ~np.eye(k, dtype=bool)
        for name, m in self.matrices.items():
            v = m[off]
            v = v[np.isfinite(v)]
            out[name] = float(v.mean()) if v.size else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None)."""
        return {
            "classes": list(self.classes),
            "attr": self.attr,
            "matrices": {k: _nan_to_none(m.tolist()) for k, m in self.matrices.items()},
        }

    def __repr__(self) -> str:
        mo = self.mean_offdiagonal()
        lines = [f"CategoryCorrelation({len(self.classes)} categories x {len(self.matrices)} layers, attr={self.attr!r})"]
        width = max([len(k) for k in mo] + [5])
        lines.append(f"  {'layer':<{width}}  mean corr between categories")
        for k, v in mo.items():
            lines.append(f"  {k:<{width}}  {_fmt(v, 6).strip()}")
        return "\n".join(lines)


def compare_categories(graphs: Mapping[str, Connectome], attr: str = "attribution", **kwargs: Any) -> Any:
    """Correlate per-unit profiles across categories, layer by layer.

    Given a category store (``cn.load(DIR)`` of an ``extract`` folder), compares every
    category with every other without holding the graphs: see
    :func:`connectome.analysis.categories.compare_store` (flows and ``attr`` per layer,
    circuit overlap, clustering, generalist and specialist units); ``kwargs`` go there.

    For each layer, each category's profile is the vector of node attribute ``attr`` over
    the layer's units; the result holds the Pearson correlation matrix of these profiles.
    With ``attr="activation_mean"`` this answers "do categories activate a layer alike?";
    with ``attribution``, "do they use it alike?".

    Parameters
    ----------
    graphs : dict of str -> Connectome
        One graph per category, all of one model (same layers and units).
    attr : str, default "attribution"
        Node attribute to correlate (``activation_mean`` ...).

    Returns
    -------
    CategoryCorrelation or StoreComparison
        Mapping ``layer -> (classes, matrix)``; matrices are symmetric with unit diagonal
        (NaN rows and columns where a profile is constant or the layer has one unit). For
        a store, a :class:`~connectome.analysis.categories.StoreComparison`.

    Raises
    ------
    ConnectomeError
        Graphs of different models, or a graph without ``attr``.

    Examples
    --------
    >>> from connectome.analysis._toys import toy_attribution
    >>> cc = compare_categories({c: toy_attribution(c) for c in ("cat", "dog")})
    >>> cc["h1"][1].shape
    (2, 2)
    """
    from connectome.store import CategoryStore

    if isinstance(graphs, CategoryStore):
        from connectome.analysis.categories import compare_store

        return compare_store(graphs, attr, **kwargs)
    if kwargs:
        raise TypeError(f"compare_categories of graphs takes no {sorted(kwargs)} (those are for a store)")
    if not graphs:
        raise ValueError("compare_categories needs at least one graph")
    graphs = {str(k): v for k, v in graphs.items()}
    _check_same_model(graphs)
    for name, g in graphs.items():
        if attr not in g.node_attrs:
            raise ConnectomeError(
                f"graph {name!r} has no node attribute {attr!r} (it has {sorted(g.node_attrs) or 'none'}); "
                "extract attribution or activation statistics first, or pass attr="
            )
    classes = tuple(graphs)
    X = np.vstack([np.asarray(g.node_attrs[attr], dtype=np.float64) for g in graphs.values()])
    g0 = next(iter(graphs.values()))
    matrices: dict[str, np.ndarray] = {}
    for l in g0.layers:
        P = X[:, g0.layer_slice(l.name)]
        if P.shape[1] < 2:
            C = np.full((len(classes), len(classes)), np.nan)
            C.setflags(write=False)
            matrices[l.name] = C
            continue
        P = np.where(np.isfinite(P), P, 0.0)
        Pc = P - P.mean(axis=1, keepdims=True)
        norm = np.sqrt((Pc**2).sum(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            C = (Pc @ Pc.T) / np.outer(norm, norm)
        bad = norm <= 1e-12 * np.maximum(np.abs(P).max(axis=1), 1e-300)
        matrices[l.name] = finish_correlation(C, bad)
    return CategoryCorrelation(classes=classes, attr=attr, matrices=matrices)
