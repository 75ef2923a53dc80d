"""Is a structure special? Null models that keep the layered wiring, and z-scores against them.

Two null models keep what every network of the same architecture shares and randomise the
rest:

- ``shuffle`` keeps the topology and permutes weights within each (source layer, target
  layer) block: is it *which* edges are strong that matters?
- ``rewire`` keeps every unit's in- and out-degree and the layer pair of every edge, and
  swaps edge targets within each block (Maslov-Sneppen double-edge swaps); weights travel
  with their edges: is it *who* is wired to whom that matters?

Both keep the graph a layered DAG. :func:`significance` compares modularity, the weighted
rich-club coefficient and 3-unit motif counts of a graph with their null distributions;
:func:`hub_roles` places units in the Guimera-Amaral roles of a partition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from connectome.analysis._util import check_nonempty as _check_nonempty
from connectome.analysis._util import edge_values as _edge_values
from connectome.analysis._util import topology as _topology
from connectome.errors import ConnectomeError
from connectome.graph import Connectome

if TYPE_CHECKING:  # pragma: no cover
    from connectome.analysis.communities import Partition

__all__ = [
    "null_models",
    "significance",
    "rich_club",
    "motif_counts",
    "hub_roles",
    "Significance",
    "NullStat",
    "MOTIFS",
    "ROLE_THRESHOLDS",
]

KINDS = ("shuffle", "rewire")
SIGNIFICANCE_MEASURES = ("modularity", "rich_club", "motifs")

#: The connected 3-unit motifs a DAG can hold, with their edges on units (0, 1, 2). The
#: other connected directed classes need a mutual edge or a directed cycle.
MOTIFS = {
    "fan_in": ((1, 0), (2, 0)),  # convergence: two units feed one
    "fan_out": ((0, 1), (0, 2)),  # divergence: one unit feeds two
    "chain": ((0, 1), (1, 2)),  # a two-step path with no shortcut
    "feed_forward_loop": ((0, 1), (1, 2), (0, 2)),  # a path and its shortcut
}

#: Guimera & Amaral (2005) thresholds on the within-module degree z-score and the
#: participation coefficient P, merged into four roles (see :func:`hub_roles`).
ROLE_THRESHOLDS = {"hub_z": 2.5, "connector_hub_p": 0.30, "connector_p": 0.62}


# ----------------------------------------------------------------------------- null models
def _shuffled(g: Connectome, rng: np.random.Generator, block: np.ndarray, meta: dict) -> Connectome:
    # Sorting by (block, random key) lists each block's edges in random order; assigning
    # them to the block's edges in stable order permutes weights within every block.
    dest = np.argsort(block, kind="stable")
    source = np.lexsort((rng.random(block.size), block))
    perm = np.empty(block.size, dtype=np.int64)
    perm[dest] = source
    return _like(g, g.dst, g.weight[perm], {k: v[perm] for k, v in g.edge_attrs.items()}, meta)


def _like(g: Connectome, dst: np.ndarray, weight: np.ndarray, edge_attrs: dict[str, np.ndarray], meta: dict) -> Connectome:
    return Connectome(
        layers=g.layers,
        node_units=g.node_units,
        src=g.src,
        dst=dst,
        weight=weight,
        edge_attrs=edge_attrs,
        node_attrs=g.node_attrs,
        meta=meta,
    )


def _rewired(g: Connectome, rng: np.random.Generator, block: np.ndarray, rounds: int, meta: dict) -> Connectome:
    n = g.num_nodes
    src = g.src
    dst = g.dst.copy()
    keys = src * n + dst
    E = block.size
    for _ in range(rounds):
        # Pair every edge with a random partner of its block: shuffle within blocks, then
        # pair positions (0, 1), (2, 3), ... of each block.
        order = np.lexsort((rng.random(E), block))
        b = block[order]
        starts = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
        rank = np.arange(E) - np.repeat(starts, np.diff(np.r_[starts, E]))
        first = np.flatnonzero((rank % 2 == 0)[:-1] & (b[1:] == b[:-1]))
        e1, e2 = order[first], order[first + 1]
        a, bb, c, d = src[e1], dst[e1], src[e2], dst[e2]
        # (a -> bb, c -> d) becomes (a -> d, c -> bb): same degrees, same block.
        k1, k2 = a * n + d, c * n + bb
        ok = (a != c) & (bb != d)
        sorted_keys = np.sort(keys)
        ok &= ~_isin_sorted(k1, sorted_keys) & ~_isin_sorted(k2, sorted_keys)
        # Two accepted swaps must not create the same new edge.
        new = np.concatenate([k1[ok], k2[ok]])
        _, inv, cnt = np.unique(new, return_inverse=True, return_counts=True)
        if (cnt > 1).any():
            dup = cnt[inv] > 1
            m = ok.sum()
            bad = dup[:m] | dup[m:]
            ok[np.flatnonzero(ok)[bad]] = False
        dst[e1[ok]], dst[e2[ok]] = d[ok], bb[ok]
        keys[e1[ok]], keys[e2[ok]] = k1[ok], k2[ok]
    return _like(g, dst, g.weight, g.edge_attrs, meta)


def _isin_sorted(x: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(x.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, x), sorted_keys.size - 1)
    return sorted_keys[pos] == x


def _iter_null_models(
    g: Connectome, kind: str, n: int, seed: int, swaps_per_edge: int
) -> Iterator[Connectome]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if int(swaps_per_edge) != swaps_per_edge or swaps_per_edge < 1:
        raise ValueError(f"swaps_per_edge must be a positive integer, got {swaps_per_edge!r}")
    _check_nonempty(g, "null_models")
    L = len(g.layers)
    block = g.node_layer[g.src] * L + g.node_layer[g.dst]
    # One child seed per null model: model i is the same whatever n is.
    for i, child in enumerate(np.random.SeedSequence(int(seed)).spawn(int(n))):
        rng = np.random.default_rng(child)
        meta = {**g.meta, "null_model": {"kind": kind, "seed": int(seed), "index": i}}
        if kind == "shuffle":
            yield _shuffled(g, rng, block, meta)
        else:
            yield _rewired(g, rng, block, int(swaps_per_edge), meta)


def null_models(
    g: Connectome,
    kind: str = "shuffle",
    n: int = 20,
    seed: int = 0,
    *,
    swaps_per_edge: int = 10,
) -> list[Connectome]:
    """Random graphs that keep the layered wiring of ``g``.

    Parameters
    ----------
    g : Connectome
    kind : {"shuffle", "rewire"}, default "shuffle"
        ``"shuffle"``: same edges; the weights (and every edge column, together) are
        permuted within each (source layer, target layer) block, so each block keeps its
        multiset of weights. ``"rewire"``: degree-preserving rewiring within each block:
        repeated double-edge swaps ``(a -> b, c -> d)`` to ``(a -> d, c -> b)`` between
        edges of the same block, rejecting swaps that would duplicate an edge. Every unit
        keeps its in- and out-degree, every edge its source, weight and layer pair, so the
        result is still a layered DAG.
    n : int, default 20
        Number of null graphs.
    seed : int, default 0
        Null graph ``i`` depends only on ``seed`` and ``i`` (not on ``n``).
    swaps_per_edge : int, default 10
        Rewiring rounds; each round pairs every edge with a random partner in its block and
        tries all those swaps at once (vectorised), so each edge takes part in about this
        many swap attempts. Ignored by ``"shuffle"``.

    Returns
    -------
    list of Connectome
        Same layers, node attributes (not recomputed) and meta, plus
        ``meta["null_model"] = {"kind", "seed", "index"}``.

    Raises
    ------
    ValueError
        Unknown ``kind``, ``n < 1``.

    Notes
    -----
    All ``n`` graphs are held in memory; :func:`significance` streams them instead. A block
    that is complete (every source wired to every target) or has a single edge cannot be
    rewired and stays as it is.

    References
    ----------
    .. [1] Maslov, S. & Sneppen, K. (2002). Specificity and stability in topology of
       protein networks. Science 296, 910-913.
    .. [2] Rubinov, M. & Sporns, O. (2010). Complex network measures of brain
       connectivity: uses and interpretations. NeuroImage 52, 1059-1069.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 2), ("out", "output", 2)],
    ...     [("in:0", "out:0", 1.0), ("in:1", "out:1", 2.0)])
    >>> [h.weight.tolist() for h in null_models(g, "shuffle", n=2, seed=1)]
    [[2.0, 1.0], [1.0, 2.0]]
    """
    return list(_iter_null_models(g, kind, n, seed, swaps_per_edge))


# ----------------------------------------------------------------------------- measures
def rich_club(g: Connectome, k: int | None = None, weighted: bool = True) -> float:
    """Rich-club coefficient of the units of total degree greater than ``k``.

    Parameters
    ----------
    g : Connectome
    k : int, optional
        Degree threshold on total (in + out, unweighted) degree; the rich club is the units
        with degree ``> k``. Default: the 90th percentile of degree, so roughly the top
        tenth of units (fewer when degrees tie at the threshold).
    weighted : bool, default True
        ``True``: Opsahl et al.'s weighted coefficient on ``|w|``,
        ``phi_w = W_rich / (sum of the E_rich strongest |w| in the whole graph)``, where
        ``E_rich`` and ``W_rich`` are the number and total ``|w|`` of edges among rich units:
        1 when the rich club holds the strongest edges it possibly could. ``False``: the
        unweighted density of the rich club, ``phi = E_rich / (N_rich (N_rich - 1) / 2)``
        (a DAG holds at most one edge per pair).

    Returns
    -------
    float
        In [0, 1]; NaN when fewer than two units are rich.

    Notes
    -----
    The raw coefficient grows with degree in any network; compare it with null models
    (:func:`significance`), which keep every degree, so that the rich club is the same set
    of units in the graph and its nulls. The weighted form is the default because
    ``shuffle`` nulls keep the topology and thus the unweighted coefficient.

    References
    ----------
    .. [1] Colizza, V., Flammini, A., Serrano, M. A. & Vespignani, A. (2006). Detecting
       rich-club ordering in complex networks. Nat. Phys. 2, 110-115.
    .. [2] Opsahl, T., Colizza, V., Panzarasa, P. & Ramasco, J. J. (2008). Prominence and
       control: the weighted rich-club effect. Phys. Rev. Lett. 101, 168702.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 2), ("h", "conv", 2), ("out", "output", 1)],
    ...     [("in:0", "h:0", 3.0), ("in:0", "h:1", 1.0), ("in:1", "h:0", 1.0),
    ...      ("h:0", "out:0", 2.0)])
    >>> rich_club(g, k=1)     # rich: in:0, h:0 (degree 2, 3); their edge is the strongest
    1.0
    """
    _check_nonempty(g, "rich_club")
    deg = np.bincount(g.src, minlength=g.num_nodes) + np.bincount(g.dst, minlength=g.num_nodes)
    if k is None:
        k = int(np.percentile(deg, 90))
    rich = deg > k
    n_rich = int(rich.sum())
    if n_rich < 2:
        return float("nan")
    inside = rich[g.src] & rich[g.dst]
    e_rich = int(inside.sum())
    if not weighted:
        return e_rich / (n_rich * (n_rich - 1) / 2)
    if e_rich == 0:
        return 0.0
    a = np.abs(_edge_values(g, "weight"))
    best = np.partition(a, a.size - e_rich)[a.size - e_rich :].sum()
    return float(a[inside].sum() / best) if best > 0 else 0.0


@lru_cache(maxsize=1)
def _motif_classes() -> dict[str, int]:
    import igraph as ig

    return {name: ig.Graph(n=3, edges=list(e), directed=True).isoclass() for name, e in MOTIFS.items()}


def motif_counts(g: Connectome) -> dict[str, int]:
    """Counts of the 3-unit motifs a DAG can hold (induced subgraphs, edge direction kept).

    Parameters
    ----------
    g : Connectome

    Returns
    -------
    dict of str -> int
        ``fan_in`` (a <- b, a <- c), ``fan_out`` (a -> b, a -> c), ``chain``
        (a -> b -> c, no a -> c) and ``feed_forward_loop`` (a -> b -> c and a -> c), from
        igraph's ``motifs_randesu(size=3)`` (exact, no sampling) on the directed graph; the
        other connected isoclasses need a cycle or a mutual edge and cannot occur. Edge
        weights are ignored.

    References
    ----------
    .. [1] Milo, R. et al. (2002). Network motifs: simple building blocks of complex
       networks. Science 298, 824-827.
    .. [2] Wernicke, S. & Rasche, F. (2006). FANMOD: a tool for fast network motif
       detection. Bioinformatics 22, 1152-1153.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("a", "input", 1), ("b", "conv", 1), ("c", "output", 1)],
    ...     [("a:0", "b:0", 1.0), ("b:0", "c:0", 1.0), ("a:0", "c:0", 1.0)])
    >>> motif_counts(g)
    {'fan_in': 0, 'fan_out': 0, 'chain': 0, 'feed_forward_loop': 1}
    """
    _check_nonempty(g, "motif_counts")
    if g.num_nodes < 3 or g.num_edges == 0:
        return {name: 0 for name in MOTIFS}
    counts = _topology(g).motifs_randesu(size=3)
    return {name: int(counts[c]) for name, c in _motif_classes().items()}


# ----------------------------------------------------------------------------- significance
@dataclass(frozen=True, eq=False)
class NullStat:
    """One measure against its null distribution.

    ``z = (observed - null_mean) / null_std`` with the sample std (ddof=1); ``z`` is 0 when
    the nulls have no spread and equal the observation, NaN when they have no spread and
    differ from it (or when a value is NaN).
    """

    name: str
    observed: float
    null_mean: float
    null_std: float
    z: float
    null_values: np.ndarray = field(repr=False)


@dataclass(frozen=True, eq=False)
class Significance:
    """Result of :func:`significance`: one :class:`NullStat` per measure."""

    kind: str
    n: int
    seed: int
    stats: tuple[NullStat, ...]
    rich_club_k: int | None = None

    def __getitem__(self, name: str) -> NullStat:
        for s in self.stats:
            if s.name == name:
                return s
        raise KeyError(f"no measure {name!r}; measures are {[s.name for s in self.stats]}")

    def __iter__(self) -> Iterator[NullStat]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    @property
    def z(self) -> dict[str, float]:
        """z-score per measure."""
        return {s.name: s.z for s in self.stats}

    def __repr__(self) -> str:
        lines = [f"Significance(against {self.n} {self.kind} null models, seed={self.seed})"]
        w = max((len(s.name) for s in self.stats), default=7)
        lines.append(f"  {'measure':<{w}} {'observed':>12} {'null mean':>12} {'null std':>11} {'z':>8}")
        for s in self.stats:
            lines.append(f"  {s.name:<{w}} {s.observed:>12.5g} {s.null_mean:>12.5g} {s.null_std:>11.4g} {s.z:>8.2f}")
        return "\n".join(lines)


def _zscore(obs: float, null: np.ndarray) -> tuple[float, float, float]:
    mean = float(np.mean(null))
    std = float(np.std(null, ddof=1)) if null.size > 1 else 0.0
    if np.isnan(obs) or np.isnan(mean):
        return mean, std, float("nan")
    if std > 0:
        return mean, std, (obs - mean) / std
    return mean, std, 0.0 if np.isclose(obs, mean, rtol=1e-9, atol=1e-12) else float("nan")


def significance(
    g: Connectome,
    n: int = 20,
    kind: str = "shuffle",
    seed: int = 0,
    measures: Sequence[str] = SIGNIFICANCE_MEASURES,
    *,
    rich_club_k: int | None = None,
    swaps_per_edge: int = 10,
) -> Significance:
    """Observed modularity, rich club and motif counts against null models.

    Parameters
    ----------
    g : Connectome
    n : int, default 20
        Number of null graphs (streamed, one in memory at a time).
    kind : {"shuffle", "rewire"}, default "shuffle"
        Null model, see :func:`null_models`.
    seed : int, default 0
        Seeds the null models and the Leiden runs.
    measures : sequence of {"modularity", "rich_club", "motifs"}
        ``modularity``: ``Partition.quality`` of :func:`communities` with its defaults
        (directed modularity on ``|w|``, Leiden, ``seed``), re-optimised on every null
        graph. ``rich_club``: the weighted coefficient of :func:`rich_club` at
        ``rich_club_k`` (default: 90th percentile of the observed degrees; both nulls keep
        degrees, so the rich units are the same in every graph). ``motifs``: the four DAG
        motif counts of :func:`motif_counts`, one row each. Under ``shuffle`` the topology
        and therefore the motif counts are kept exactly (z = 0).
    rich_club_k : int, optional
        Degree threshold of the rich club.
    swaps_per_edge : int, default 10
        For ``rewire``, see :func:`null_models`.

    Returns
    -------
    Significance
        Observed value, null mean, null std (ddof=1) and z-score per measure.

    Raises
    ------
    ValueError
        Unknown measure or kind, ``n < 2``.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 3), ("out", "output", 3)],
    ...     [("in:0", "out:0", 3.0), ("in:1", "out:1", 2.0), ("in:2", "out:2", 1.0),
    ...      ("in:0", "out:1", 0.1)])
    >>> s = significance(g, n=5, measures=["motifs"])
    >>> s["fan_out"].observed, s["fan_out"].z
    (1.0, 0.0)
    """
    from connectome.analysis.communities import communities

    measures = list(dict.fromkeys([measures] if isinstance(measures, str) else measures))
    unknown = [m for m in measures if m not in SIGNIFICANCE_MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; valid measures are {list(SIGNIFICANCE_MEASURES)}")
    if int(n) != n or n < 2:
        raise ValueError(f"significance needs n >= 2 null models for a spread, got {n!r}")
    _check_nonempty(g, "significance")
    if "rich_club" in measures and rich_club_k is None:
        deg = np.bincount(g.src, minlength=g.num_nodes) + np.bincount(g.dst, minlength=g.num_nodes)
        rich_club_k = int(np.percentile(deg, 90))

    def measure(h: Connectome) -> dict[str, float]:
        out: dict[str, float] = {}
        if "modularity" in measures:
            out["modularity"] = communities(h, seed=seed).quality
        if "rich_club" in measures:
            out["rich_club"] = rich_club(h, rich_club_k)
        if "motifs" in measures:
            out.update({k: float(v) for k, v in motif_counts(h).items()})
        return out

    observed = measure(g)
    null_rows = [measure(h) for h in _iter_null_models(g, kind, n, seed, swaps_per_edge)]
    stats = []
    for name, obs in observed.items():
        null = np.array([r[name] for r in null_rows], dtype=np.float64)
        mean, std, z = _zscore(obs, null)
        null.setflags(write=False)
        stats.append(NullStat(name, float(obs), mean, std, float(z), null))
    return Significance(kind=kind, n=int(n), seed=int(seed), stats=tuple(stats), rich_club_k=rich_club_k)


# ----------------------------------------------------------------------------- hub roles
def hub_roles(g: Connectome, partition: Partition | np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Within-module degree z-score, participation coefficient and role of every unit.

    Computed on total ``|w|`` strength of the undirected view (in + out edges).

    Parameters
    ----------
    g : Connectome
    partition : Partition or array-like of int, shape (n_nodes,)
        Community of each unit.

    Returns
    -------
    dict of str -> ndarray, each shape (n_nodes,)
        ``within_module_strength``: ``kappa_i``, the ``|w|`` of ``i``'s edges inside its own
        community. ``within_module_z``: ``(kappa_i - mean) / std`` over the units of the
        community (population std; 0 when the community has no spread).
        ``participation``: ``P_i = 1 - sum_s (kappa_is / k_i)^2`` over communities ``s``
        (``k_i`` total strength; 0 for a unit with no weighted edge, and for one whose edges
        all stay in its community). ``role``: one of ``"connector hub"``,
        ``"provincial hub"``, ``"connector"``, ``"peripheral"``.

    Notes
    -----
    Roles follow Guimera & Amaral (2005) with their thresholds (``ROLE_THRESHOLDS``), their
    seven roles merged into four: hubs have ``z >= 2.5``; a hub with ``P > 0.30`` is a
    connector hub (G&A's R6 and kinless hubs R7), else a provincial hub (R5); a non-hub with
    ``P > 0.62`` is a connector (R3 and kinless R4), else peripheral (R1 ultra-peripheral
    and R2 peripheral).

    References
    ----------
    .. [1] Guimera, R. & Amaral, L. A. N. (2005). Functional cartography of complex
       metabolic networks. Nature 433, 895-900.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 2), ("out", "output", 2)],
    ...     [("in:0", "out:0", 1.0), ("in:0", "out:1", 1.0), ("in:1", "out:1", 2.0)])
    >>> r = hub_roles(g, [0, 1, 0, 1])
    >>> r["participation"].tolist()
    [0.5, 0.0, 0.0, 0.4444444444444444]
    """
    _check_nonempty(g, "hub_roles")
    m = np.asarray(getattr(partition, "membership", partition))
    if m.shape != (g.num_nodes,) or (m.size and m.dtype.kind not in "iu" and not np.all(m == np.round(m))):
        raise ConnectomeError(
            f"partition must be a Partition of this graph or an integer array of shape ({g.num_nodes},), "
            f"got shape {m.shape}"
        )
    m = m.astype(np.int64)
    if m.size and m.min() < 0:
        raise ConnectomeError("community labels must be >= 0")
    from scipy import sparse

    n = g.num_nodes
    a = np.abs(_edge_values(g, "weight"))
    C = int(m.max()) + 1 if m.size else 0
    # kappa[i, s]: |w| between unit i and community s, both edge directions.
    rows = np.concatenate([g.src, g.dst])
    cols = np.concatenate([m[g.dst], m[g.src]])
    kappa = sparse.csr_matrix((np.concatenate([a, a]), (rows, cols)), shape=(n, C))
    kappa.sum_duplicates()
    k = np.asarray(kappa.sum(axis=1)).ravel()
    own = np.asarray(kappa[np.arange(n), m]).ravel()
    sq = np.asarray(kappa.multiply(kappa).sum(axis=1)).ravel()
    participation = np.divide(sq, k * k, out=np.ones(n), where=k > 0)
    participation = np.clip(1.0 - participation, 0.0, 1.0)
    size = np.maximum(np.bincount(m, minlength=C), 1)
    mean = (np.bincount(m, weights=own, minlength=C) / size)[m]
    dev = own - mean
    std = np.sqrt(np.bincount(m, weights=dev * dev, minlength=C) / size)[m]
    # Equal strengths leave a rounding-level std (~1e-16 of the mean): that is no spread.
    z = np.divide(dev, std, out=np.zeros(n), where=std > 1e-9 * mean)
    t = ROLE_THRESHOLDS
    hub = z >= t["hub_z"]
    role = np.where(
        hub,
        np.where(participation > t["connector_hub_p"], "connector hub", "provincial hub"),
        np.where(participation > t["connector_p"], "connector", "peripheral"),
    )
    return {
        "within_module_strength": own,
        "within_module_z": z,
        "participation": participation,
        "role": role,
    }
