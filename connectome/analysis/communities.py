"""Leiden communities of a connectome: groups of units wired more densely among themselves.

Two engines optimise the same objectives on the *directed* graph:

- ``"igraph"``: igraph's C implementation of Leiden (``Graph.community_leiden``). Since
  igraph 1.0 it takes separate node out- and in-weights; given out- and in-strengths (CPM
  form, resolution divided by the total weight) it optimises exactly the directed
  modularity. About 5x faster than leidenalg on a ResNet-50-sized graph, and on layered
  graphs it reaches a higher modularity (leidenalg's directed runs stop in poorer local
  optima there).
- ``"leidenalg"``: the reference implementation (Traag), needed for the Constant Potts
  Model as leidenalg defines it and for signed graphs (a multiplex of a positive and a
  negative layer).

``engine="auto"`` picks igraph for ``method="modularity"`` with non-negative weights and
leidenalg for ``method="cpm"`` and ``weights="signed"``. ``Partition.objective`` names what
was optimised, and ``Partition.quality`` is that objective's value for the returned
membership, recomputed independently of the optimiser (``igraph.Graph.modularity`` or
leidenalg's ``quality()``).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from connectome._igraph import edge_topology
from connectome.analysis._util import check_nonempty as _check_nonempty
from connectome.analysis._util import edge_values as _edge_values
from connectome.analysis._util import seeded_igraph as _seeded_igraph
from connectome.analysis._util import topology as _topology
from connectome.analysis.centrality import strength
from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome

if TYPE_CHECKING:  # pragma: no cover
    import igraph

__all__ = ["communities", "resolution_sweep", "Partition", "Community", "SweepRow", "ResolutionSweep"]

METHODS = ("modularity", "cpm")
WEIGHT_MODES = ("abs", "positive", "signed")
ENGINES = ("auto", "igraph", "leidenalg")

#: How many units each community summary lists.
TOP_UNITS = 5

# Partitions already computed, per graph and arguments: a report, a comparison and the
# user's own call then share one Leiden run (tens of seconds on ResNet-50). Connectomes are
# immutable and Partitions frozen, so a cached result is the result.
_PARTITIONS: weakref.WeakKeyDictionary[Connectome, dict[tuple, Partition]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Community:
    """Summary of one community.

    Attributes
    ----------
    label : int
        Community label (0 is the largest).
    size : int
        Number of units.
    layers : tuple of str
        Names of the layers it has units in, in layer order.
    internal_flow : float
        Sum of the signed weights of the edges with both ends inside.
    top_units : tuple of str
        Up to ``TOP_UNITS`` node ids, by ``|attribution|`` when the graph has that node
        attribute, else by total ``|w|`` strength; ties by node order.
    """

    label: int
    size: int
    layers: tuple[str, ...]
    internal_flow: float
    top_units: tuple[str, ...]

    def __repr__(self) -> str:
        return (
            f"Community({self.label}: {self.size} units in {_span(self.layers)}, "
            f"internal flow {self.internal_flow:+.4g}, top {', '.join(self.top_units)})"
        )


def _span(layers: Sequence[str]) -> str:
    if len(layers) == 1:
        return layers[0]
    return f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"


@dataclass(frozen=True, eq=False)
class Partition:
    """A partition of a connectome's units into communities.

    Attributes
    ----------
    membership : ndarray of int64, shape (n_nodes,)
        Community label of each unit, aligned with ``g.node_ids``; labels ``0..k-1``,
        ``0`` the largest community (ties: the one holding the smaller node index).
    quality : float
        Value of the optimised objective for this membership (see ``objective``).
    objective : str
        What was optimised, e.g. ``"modularity (directed, igraph Leiden)"``.
    resolution : float
        Resolution parameter.
    n_communities : int
        Number of communities (isolated units are singleton communities).
    communities : tuple of Community
        One summary per label, in label order.
    method, weights : str
        The arguments of :func:`communities`.
    seed : int
        Seed used.
    """

    membership: np.ndarray
    quality: float
    objective: str
    resolution: float
    n_communities: int
    communities: tuple[Community, ...] = field(repr=False)
    method: str = "modularity"
    weights: str = "abs"
    seed: int = 0

    def __post_init__(self) -> None:
        m = np.array(self.membership, dtype=np.int64).reshape(-1)
        m.setflags(write=False)
        object.__setattr__(self, "membership", m)

    def sizes(self) -> np.ndarray:
        """Number of units per community, shape (n_communities,)."""
        return np.bincount(self.membership, minlength=self.n_communities)

    def to_node_attr(self, g: Connectome, name: str = "community") -> Connectome:
        """A new graph with the node attribute ``name`` (default ``community``) = membership.

        Raises
        ------
        ConnectomeError
            ``g`` has another number of nodes than the partitioned graph.
        """
        if g.num_nodes != self.membership.shape[0]:
            raise ConnectomeError(
                f"this partition covers {self.membership.shape[0]} units but the graph has "
                f"{g.num_nodes}; pass the graph the partition was computed on"
            )
        return g.with_node_attrs(**{name: self.membership})

    def __repr__(self) -> str:
        n = self.membership.shape[0]
        lines = [
            f"Partition({self.n_communities} communities of {n} units; {self.objective} "
            f"= {self.quality:.4f}, resolution={self.resolution:g})"
        ]
        shown = self.communities[:10]
        if shown:
            span_w = max(len(_span(c.layers)) for c in shown)
            lines.append(f"  {'#':>3} {'size':>6}  {'layers':<{span_w}}  {'internal flow':>13}  top units")
            for c in shown:
                lines.append(
                    f"  {c.label:>3} {c.size:>6}  {_span(c.layers):<{span_w}}  "
                    f"{c.internal_flow:>+13.4g}  {', '.join(c.top_units)}"
                )
        if len(self.communities) > len(shown):
            rest = self.communities[len(shown):]
            singles = sum(c.size == 1 for c in rest)
            lines.append(f"  ... {len(rest)} more ({singles} singletons)")
        return "\n".join(lines)


def _relabel(raw: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labels renumbered so that 0 is the largest community, ties by smallest node index."""
    raw = np.asarray(raw, dtype=np.int64)
    if raw.size == 0:
        return raw
    _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
    size = np.bincount(inv)
    order = np.lexsort((first, -size))
    new = np.empty(order.size, dtype=np.int64)
    new[order] = np.arange(order.size)
    return new[inv.reshape(-1)]


def _summaries(g: Connectome, membership: np.ndarray) -> tuple[Community, ...]:
    k = int(membership.max()) + 1 if membership.size else 0
    size = np.bincount(membership, minlength=k)
    inside = membership[g.src] == membership[g.dst]
    flow = np.bincount(membership[g.src[inside]], weights=g.weight[inside].astype(np.float64), minlength=k)
    # (community, layer) pairs present, sorted by community then layer
    L = len(g.layers)
    pairs = np.unique(membership * L + g.node_layer)
    pc, pl = pairs // L, pairs % L
    starts = np.searchsorted(pc, np.arange(k + 1))
    if "attribution" in g.node_attrs:
        score = np.abs(np.asarray(g.node_attrs["attribution"], dtype=np.float64))
        score = np.where(np.isnan(score), -np.inf, score)
    else:
        score = strength(g)
    idx = np.arange(g.num_nodes)
    order = np.lexsort((idx, -score, membership))  # by community, best first, node order
    cstart = np.r_[0, np.cumsum(size)]
    ids = g.node_ids
    names = g.layer_names
    out = []
    for c in range(k):
        top = order[cstart[c] : min(cstart[c] + TOP_UNITS, cstart[c + 1])]
        out.append(
            Community(
                label=c,
                size=int(size[c]),
                layers=tuple(names[i] for i in pl[starts[c] : starts[c + 1]]),
                internal_flow=float(flow[c]),
                top_units=tuple(str(ids[i]) for i in top),
            )
        )
    return tuple(out)


def _weights_for(g: Connectome, weights: str | np.ndarray) -> tuple[str, np.ndarray]:
    """(mode, non-negative or signed weight array) for ``weights``."""
    if isinstance(weights, str) and weights in WEIGHT_MODES:
        w = _edge_values(g, "weight")
        if weights == "abs":
            return "abs", np.abs(w)
        if weights == "positive":
            return "positive", np.where(w > 0, w, 0.0)
        return "signed", w
    if isinstance(weights, str):
        if weights != "weight" and weights not in g.edge_attrs:
            raise ValueError(
                f"weights must be one of {list(WEIGHT_MODES)}, an edge column or an array of "
                f"shape (n_edges,); got {weights!r} (edge columns: {['weight', *g.edge_attrs]})"
            )
        label, w = weights, _edge_values(g, weights)
    else:
        label, w = "custom", np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != g.num_edges:
            raise ValueError(f"weights array must have shape ({g.num_edges},), got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ConnectomeError("weights array holds non-finite values; fix or drop those edges")
    if (w < 0).any():
        raise ConnectomeError(
            f"weights {label!r} hold {int((w < 0).sum())} negative values, which modularity and "
            "CPM cannot use; pass weights='abs' (|w|), 'positive' (drop negative edges) or "
            "'signed' (positive and negative edges as two layers)"
        )
    return label, w


def _edge_graph(G: igraph.Graph, keep: np.ndarray) -> igraph.Graph:
    if keep.all():
        return G
    return G.subgraph_edges(np.flatnonzero(keep).tolist(), delete_vertices=False)


def _modularity(G: igraph.Graph, membership: np.ndarray, w: np.ndarray, resolution: float) -> float:
    """Directed generalised modularity (Leicht & Newman 2008) as ``igraph.Graph.modularity``."""
    if G.ecount() == 0 or w.sum() == 0:
        return 0.0
    return float(G.modularity(membership.tolist(), weights=w.tolist(), resolution=resolution, directed=True))


def communities(
    g: Connectome,
    method: str = "modularity",
    resolution: float = 1.0,
    seed: int = 0,
    weights: str | np.ndarray = "abs",
    n_iterations: int = -1,
    engine: str = "auto",
) -> Partition:
    """Leiden communities of a connectome.

    Parameters
    ----------
    g : Connectome
    method : {"modularity", "cpm"}, default "modularity"
        ``"modularity"``: directed generalised modularity (Leicht & Newman 2008),
        ``Q = 1/m sum_ij (A_ij - resolution * kout_i kin_j / m) delta(c_i, c_j)``, the
        objective of leidenalg's ``RBConfigurationVertexPartition`` divided by ``m`` and of
        ``igraph.Graph.modularity(..., directed=True)``. ``"cpm"``: the Constant Potts Model
        of leidenalg's ``CPMVertexPartition``, ``sum_c (w_c - resolution * n_c (n_c - 1))``
        on the directed graph (``w_c`` weight inside community ``c`` of ``n_c`` units);
        ``resolution`` is then a density threshold in weight units.
    resolution : float, default 1.0
        Higher gives more, smaller communities.
    seed : int, default 0
        Seeds the engine's random number generator; the same seed gives the same partition.
    weights : {"abs", "positive", "signed"}, edge column name or array, default "abs"
        ``"abs"``: ``|w|``. ``"positive"``: negative edges dropped. ``"signed"``: positive
        and negative edges as two layers of one multiplex optimised together (layer weights
        ``+1`` and ``-1``, leidenalg), so negative edges push their ends apart. An edge
        column (``"weight"`` itself included) or an array of shape (n_edges,) is used as
        given and must be non-negative.
    n_iterations : int, default -1
        Leiden iterations; negative runs until an iteration no longer improves the
        partition.
    engine : {"auto", "igraph", "leidenalg"}, default "auto"
        ``"auto"`` uses igraph for modularity with non-negative weights (fast) and leidenalg
        for CPM and signed weights (igraph implements neither as defined here).

    Returns
    -------
    Partition
        ``quality`` is: for modularity, ``Q`` above (igraph's ``modularity`` of the
        membership); for signed modularity, ``(m+ Q+ - m- Q-) / (m+ + m-)`` (Gomez et al.
        2009; leidenalg's multiplex objective ``q+ - q-`` divided by the total ``|w|``);
        for CPM, leidenalg's ``CPMVertexPartition.quality()``; for signed CPM, the
        multiplex objective ``q+ - q-`` with the negative layer at resolution 0 (so that
        the size penalty is not cancelled): ``sum_c (w+_c - w-_c - resolution n_c (n_c - 1))``.

    Raises
    ------
    ValueError
        Unknown ``method``, ``weights`` or ``engine``; an engine that cannot run
        ``method``/``weights``.
    ConnectomeError
        Negative values in a weight column or array (the message names the modes to use).
    EmptyGraphError
        No node, or no edge with a non-zero weight to partition by.

    Notes
    -----
    Isolated units (no edge of non-zero weight, e.g. units whose only edges were negative
    under ``weights="positive"``) are kept as singleton communities, not dropped, so that
    ``membership`` stays aligned with ``g.node_ids``; they take the highest labels.

    The result is remembered per graph and arguments (``weights`` given as a mode or a
    column name), so calling again, or :func:`connectome.analysis.compare` and the reports,
    which ask for the same partition, cost nothing the second time.

    References
    ----------
    .. [1] Traag, V. A., Waltman, L. & van Eck, N. J. (2019). From Louvain to Leiden:
       guaranteeing well-connected communities. Sci. Rep. 9, 5233.
    .. [2] Leicht, E. A. & Newman, M. E. J. (2008). Community structure in directed
       networks. Phys. Rev. Lett. 100, 118703.
    .. [3] Traag, V. A., Van Dooren, P. & Nesterov, Y. (2011). Narrow scope for
       resolution-limit-free community detection. Phys. Rev. E 84, 016114.
    .. [4] Gomez, S., Jensen, P. & Arenas, A. (2009). Analysis of community structure in
       networks of correlated data. Phys. Rev. E 80, 016114.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 4), ("out", "output", 4)],
    ...     [("in:0", "out:0", 1.0), ("in:0", "out:1", 1.0), ("in:1", "out:1", 1.0),
    ...      ("in:2", "out:2", 1.0), ("in:2", "out:3", 1.0), ("in:3", "out:3", 1.0),
    ...      ("in:1", "out:2", 0.1)])
    >>> p = communities(g)
    >>> p.membership.tolist()
    [0, 0, 1, 1, 0, 0, 1, 1]
    >>> p.objective
    'modularity (directed, igraph Leiden)'
    """
    _check_nonempty(g, "communities")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(n_iterations) != n_iterations or n_iterations == 0:
        raise ValueError(f"n_iterations must be a non-zero integer (negative: until stable), got {n_iterations!r}")
    resolution = float(resolution)
    if not np.isfinite(resolution) or resolution < 0:
        raise ValueError(f"resolution must be a finite number >= 0, got {resolution!r}")
    cache_key = (method, resolution, int(seed), weights, int(n_iterations), engine) if isinstance(weights, str) else None
    if cache_key is not None:
        hit = _PARTITIONS.get(g, {}).get(cache_key)
        if hit is not None:
            return hit
    mode, w = _weights_for(g, weights)
    signed = mode == "signed"
    if engine == "auto":
        engine = "igraph" if method == "modularity" and not signed else "leidenalg"
    if engine == "igraph" and (method == "cpm" or signed):
        raise ValueError(
            f"engine='igraph' runs modularity with non-negative weights only; use engine='leidenalg' "
            f"(or 'auto') for method={method!r}, weights={mode!r}"
        )
    if not np.any(w != 0):
        raise EmptyGraphError(
            f"communities needs at least one edge with a non-zero weight under weights={mode!r}; "
            f"this graph has {g.num_edges} edges"
            + (" and none is positive; try weights='abs'" if mode == "positive" and g.num_edges else "")
        )
    seed = int(seed)
    n_iterations = int(n_iterations)
    if engine == "igraph":
        keep = w > 0
        H, wk = edge_topology(g, keep), w[keep]
        n = g.num_nodes
        # Directed modularity spelt out for igraph's Leiden: CPM with node out-weights
        # k_out, in-weights k_in and resolution gamma / m has quality
        # sum_ij (A_ij - gamma kout_i kin_j / m) delta = m * Q (Leicht-Newman). Its own
        # objective_function="modularity" on a directed graph reports a quality that is not
        # Graph.modularity(directed=True), and reached about half the directed modularity of
        # this form on dense layered graphs.
        with _seeded_igraph(seed):
            raw = H.community_leiden(
                objective_function="CPM",
                weights=wk.tolist(),
                node_weights=np.bincount(g.src[keep], weights=wk, minlength=n).tolist(),
                node_in_weights=np.bincount(g.dst[keep], weights=wk, minlength=n).tolist(),
                resolution=resolution / wk.sum(),
                n_iterations=n_iterations,
            ).membership
        membership = _relabel(raw)
        quality = _modularity(H, membership, wk, resolution)
        objective = "modularity (directed, igraph Leiden)"
    else:
        membership, quality, objective = _leidenalg(_topology(g), w, method, resolution, seed, n_iterations, signed)
    part = Partition(
        membership=membership,
        quality=float(quality),
        objective=objective,
        resolution=resolution,
        n_communities=int(membership.max()) + 1,
        communities=_summaries(g, membership),
        method=method,
        weights=mode,
        seed=seed,
    )
    if cache_key is not None:
        _PARTITIONS.setdefault(g, {})[cache_key] = part
    return part


def _leidenalg(
    G: igraph.Graph,
    w: np.ndarray,
    method: str,
    resolution: float,
    seed: int,
    n_iterations: int,
    signed: bool,
) -> tuple[np.ndarray, float, str]:
    import leidenalg as la

    Part = la.RBConfigurationVertexPartition if method == "modularity" else la.CPMVertexPartition
    opt = la.Optimiser()
    opt.set_rng_seed(seed)
    pos_keep = w > 0
    neg_keep = w < 0
    G_pos, w_pos = _edge_graph(G, pos_keep), w[pos_keep]
    if signed and neg_keep.any():
        G_neg, w_neg = _edge_graph(G, neg_keep), -w[neg_keep]
        p_pos = Part(G_pos, weights=w_pos.tolist(), resolution_parameter=resolution)
        # CPM's size penalty would cancel between the layers; the negative layer only
        # penalises negative weight inside communities.
        neg_res = resolution if method == "modularity" else 0.0
        p_neg = Part(G_neg, weights=w_neg.tolist(), resolution_parameter=neg_res)
        opt.optimise_partition_multiplex([p_pos, p_neg], layer_weights=[1, -1], n_iterations=n_iterations)
        membership = _relabel(p_pos.membership)
        if method == "modularity":
            m_pos, m_neg = w_pos.sum(), w_neg.sum()
            q = (
                m_pos * _modularity(G_pos, membership, w_pos, resolution)
                - m_neg * _modularity(G_neg, membership, w_neg, resolution)
            ) / (m_pos + m_neg)
            objective = "signed modularity (directed, leidenalg RBConfiguration multiplex +1/-1)"
        else:
            q = p_pos.quality() - p_neg.quality()
            objective = "signed CPM (directed, leidenalg CPM multiplex +1/-1)"
        return membership, q, objective
    p = Part(G_pos, weights=w_pos.tolist(), resolution_parameter=resolution)
    opt.optimise_partition(p, n_iterations=n_iterations)
    membership = _relabel(p.membership)
    if method == "modularity":
        q = _modularity(G_pos, membership, w_pos, resolution)
        objective = "modularity (directed, leidenalg RBConfiguration)"
    else:
        q = p.quality()
        objective = "CPM (directed, leidenalg)"
    if signed:
        objective = "signed " + objective + ", no negative edges"
    return membership, q, objective


@dataclass(frozen=True)
class SweepRow:
    """One resolution of a :func:`resolution_sweep`.

    Attributes
    ----------
    resolution : float
    n_communities : float
        Mean number of communities over seeds.
    n_communities_std : float
        Its standard deviation over seeds.
    quality : float
        Mean ``Partition.quality`` over seeds.
    nmi, ari : float
        Stability: mean pairwise normalised mutual information and adjusted Rand index
        between the seeds' partitions (1 = identical); NaN with a single seed.
    """

    resolution: float
    n_communities: float
    n_communities_std: float
    quality: float
    nmi: float
    ari: float


@dataclass(frozen=True, eq=False)
class ResolutionSweep:
    """Result of :func:`resolution_sweep`: one row per resolution, plus the partitions.

    Iterating yields the rows; ``partitions[i]`` holds the partitions of row ``i``, one per
    seed.
    """

    rows: tuple[SweepRow, ...]
    seeds: tuple[int, ...]
    objective: str
    partitions: tuple[tuple[Partition, ...], ...] = field(repr=False)

    def __iter__(self) -> Iterator[SweepRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> SweepRow:
        return self.rows[i]

    def column(self, name: str) -> np.ndarray:
        """One column of the table as an array (``"resolution"``, ``"nmi"`` ...)."""
        return np.array([getattr(r, name) for r in self.rows], dtype=np.float64)

    def __repr__(self) -> str:
        lines = [f"ResolutionSweep({self.objective}; {len(self.seeds)} seeds per resolution)"]
        lines.append(f"  {'resolution':>10} {'communities':>15} {'quality':>10} {'NMI':>6} {'ARI':>6}")
        for r in self.rows:
            nc = f"{r.n_communities:.1f}+-{r.n_communities_std:.1f}"
            lines.append(f"  {r.resolution:>10.4g} {nc:>15} {r.quality:>10.4f} {r.nmi:>6.3f} {r.ari:>6.3f}")
        return "\n".join(lines)


def _compare(a: np.ndarray, b: np.ndarray, method: str) -> float:
    import igraph as ig

    # Labels are canonical, so equal partitions are equal arrays; igraph's ARI is 0/0 = NaN
    # for two equal trivial partitions (one community, or all singletons), 1 by convention.
    if np.array_equal(a, b):
        return 1.0
    return float(ig.compare_communities(a.tolist(), b.tolist(), method=method))


def resolution_sweep(
    g: Connectome,
    resolutions: Sequence[float] | np.ndarray,
    seeds: Sequence[int] = (0, 1, 2),
    method: str = "modularity",
    **kw: Any,
) -> ResolutionSweep:
    """Communities at several resolutions and seeds: how many, how good, how stable.

    Parameters
    ----------
    g : Connectome
    resolutions : sequence of float
        Resolution parameters to try.
    seeds : sequence of int, default (0, 1, 2)
        One Leiden run per seed at each resolution.
    method : {"modularity", "cpm"}, default "modularity"
    **kw
        Passed on to :func:`communities` (``weights``, ``n_iterations``, ``engine``).

    Returns
    -------
    ResolutionSweep
        One :class:`SweepRow` per resolution: mean number of communities, mean quality,
        and stability across seeds as mean pairwise NMI and adjusted Rand index
        (``igraph.compare_communities`` with ``"nmi"`` and ``"adjusted_rand"``). A
        resolution where every seed finds the same partition has NMI = ARI = 1.

    Raises
    ------
    ValueError
        No resolution or no seed; and whatever :func:`communities` raises.

    References
    ----------
    .. [1] Danon, L., Diaz-Guilera, A., Duch, J. & Arenas, A. (2005). Comparing community
       structure identification. J. Stat. Mech. P09008.
    .. [2] Hubert, L. & Arabie, P. (1985). Comparing partitions. J. Classification 2,
       193-218.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 4), ("out", "output", 4)],
    ...     [("in:0", "out:0", 1.0), ("in:0", "out:1", 1.0), ("in:1", "out:1", 1.0),
    ...      ("in:2", "out:2", 1.0), ("in:2", "out:3", 1.0), ("in:3", "out:3", 1.0)])
    >>> sweep = resolution_sweep(g, [0.5, 1.0])
    >>> [r.nmi for r in sweep]
    [1.0, 1.0]
    """
    if "seed" in kw:
        raise ValueError("resolution_sweep runs one partition per seed: pass seeds=[...], not seed=")
    resolutions = [float(r) for r in np.asarray(resolutions, dtype=np.float64).reshape(-1)]
    seeds = tuple(int(s) for s in seeds)
    if not resolutions:
        raise ValueError("resolution_sweep needs at least one resolution")
    if not seeds:
        raise ValueError("resolution_sweep needs at least one seed")
    rows, parts = [], []
    objective = ""
    for res in resolutions:
        ps = tuple(communities(g, method=method, resolution=res, seed=s, **kw) for s in seeds)
        objective = ps[0].objective
        nc = np.array([p.n_communities for p in ps], dtype=np.float64)
        pairs = list(itertools.combinations(ps, 2))
        if pairs:
            nmi = float(np.mean([_compare(a.membership, b.membership, "nmi") for a, b in pairs]))
            ari = float(np.mean([_compare(a.membership, b.membership, "adjusted_rand") for a, b in pairs]))
        else:
            nmi = ari = float("nan")
        rows.append(
            SweepRow(
                resolution=res,
                n_communities=float(nc.mean()),
                n_communities_std=float(nc.std()),
                quality=float(np.mean([p.quality for p in ps])),
                nmi=nmi,
                ari=ari,
            )
        )
        parts.append(ps)
    return ResolutionSweep(rows=tuple(rows), seeds=seeds, objective=objective, partitions=tuple(parts))
