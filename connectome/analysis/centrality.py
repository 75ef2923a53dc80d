"""Which units matter: strength, PageRank, betweenness, HITS, eigenvector and flow centrality.

Every measure is an array aligned with ``g.node_ids``. Graph algorithms run in igraph's C
core on a bare topology graph (vertex ``i`` is node ``i``) that is built once per
Connectome and cached; edge weights travel with each call. Strengths are plain numpy sums
over the edge arrays.

Conventions
-----------
- Weights are signed; every measure but the ``signed_*`` strengths and ``flow`` uses
  ``|w|``, so that a strong inhibitory connection counts as a strong connection.
- Shortest paths (betweenness) use the distance ``-log(|w| / max|w|)``: the strongest edge
  is (almost) free and each factor of ``e`` weaker costs one unit, so the length of a path
  is minus the log of the product of its normalised weights. Edges with ``w == 0`` carry
  nothing and are left out.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from connectome._igraph import edge_topology
from connectome.analysis._util import check_nonempty as _check_nonempty
from connectome.analysis._util import edge_values as _edge_values
from connectome.analysis._util import progress_bar
from connectome.analysis._util import seeded_igraph as _seeded_igraph
from connectome.errors import ConnectomeError
from connectome.graph import Connectome

__all__ = ["centrality", "strength", "top_nodes", "MEASURES", "DEFAULT_MEASURES", "default_measures", "CentralityResult",
           "auto_betweenness_samples"]

#: Every measure :func:`centrality` knows, in the order results are returned.
MEASURES = (
    "in_strength",
    "out_strength",
    "strength",
    "signed_in_strength",
    "signed_out_strength",
    "signed_strength",
    "pagerank",
    "betweenness",
    "eigenvector",
    "hub",
    "authority",
    "flow",
)

#: Used when ``measures=None``; ``flow`` only when the graph has ``attribution``.
DEFAULT_MEASURES = ("strength", "pagerank", "betweenness", "flow")

#: Length given to the strongest edges, whose distance ``-log(1)`` is 0: igraph's weighted
#: shortest paths need strictly positive lengths. 1e-9 is far below any difference between
#: real paths (a factor ``1 + 1e-9`` in weight) and still separates paths by hop count.
ZERO_DISTANCE = 1e-9

_STRENGTHS = {
    "in_strength": ("in", True),
    "out_strength": ("out", True),
    "strength": ("total", True),
    "signed_in_strength": ("in", False),
    "signed_out_strength": ("out", False),
    "signed_strength": ("total", False),
}

def strength(
    g: Connectome,
    direction: str = "total",
    absolute: bool = True,
    weight: str = "weight",
) -> np.ndarray:
    """Weighted degree of every unit.

    Parameters
    ----------
    g : Connectome
    direction : {"total", "in", "out"}, default "total"
        Sum over incoming edges, outgoing edges, or both.
    absolute : bool, default True
        Sum ``|w|`` (how strongly a unit is connected) rather than signed ``w`` (net
        excitation minus inhibition).
    weight : str, default "weight"
        Edge column to sum.

    Returns
    -------
    ndarray of float64, shape (n_nodes,)
        Aligned with ``g.node_ids``.

    Raises
    ------
    ValueError
        Unknown ``direction``.
    ConnectomeError
        Unknown or non-finite edge column.

    Examples
    --------
    >>> g = Connectome.from_edges([("in", "input", 2), ("fc", "linear", 1)],
    ...                           [("in:0", "fc:0", 0.5), ("in:1", "fc:0", -1.0)])
    >>> strength(g).tolist()
    [0.5, 1.0, 1.5]
    >>> strength(g, "in", absolute=False).tolist()
    [0.0, 0.0, -0.5]
    """
    if direction not in ("total", "in", "out"):
        raise ValueError(f"direction must be 'total', 'in' or 'out', got {direction!r}")
    _check_nonempty(g, "strength")
    w = _edge_values(g, weight)
    if absolute:
        w = np.abs(w)
    n = g.num_nodes
    out = np.zeros(n)
    if direction in ("in", "total"):
        out += np.bincount(g.dst, weights=w, minlength=n)
    if direction in ("out", "total"):
        out += np.bincount(g.src, weights=w, minlength=n)
    return out


#: Automatic betweenness is exact while ``n_nodes * n_edges`` (the edge relaxations of one
#: Dijkstra pass per unit) stays under this, and otherwise samples about this much work
#: worth of sources: about 20 s on ResNet-50's 15.5M edges on 2 CPU cores.
BETWEENNESS_WORK = 3e8
#: The fewest sources an automatic estimate uses.
MIN_BETWEENNESS_SAMPLES = 16
#: Above this many edge relaxations a betweenness run shows a progress bar (``progress=None``).
PROGRESS_WORK = 5e7


def auto_betweenness_samples(n_nodes: int, n_edges: int) -> int | None:
    """Sources :func:`centrality` samples by default: ``None`` (exact) on small graphs.

    Exact betweenness runs one Dijkstra pass per unit, ``n_nodes * n_edges`` relaxations;
    above ``BETWEENNESS_WORK`` the default samples ``max(MIN_BETWEENNESS_SAMPLES,
    BETWEENNESS_WORK / n_edges)`` sources instead.
    """
    if n_nodes * max(n_edges, 1) <= BETWEENNESS_WORK:
        return None
    k = max(MIN_BETWEENNESS_SAMPLES, int(BETWEENNESS_WORK // max(n_edges, 1)))
    return None if k >= n_nodes else k


class CentralityResult(dict):
    """The measures of :func:`centrality`: a ``dict`` of name -> array over ``g.node_ids``.

    Attributes
    ----------
    betweenness_samples : int or None
        Sources the betweenness estimate used; ``None`` when it is exact or was not asked for.
    """

    def __init__(self, values: Any = (), *, betweenness_samples: int | None = None) -> None:
        super().__init__(values)
        self.betweenness_samples = betweenness_samples

    def __repr__(self) -> str:
        how = "" if self.betweenness_samples is None else f", betweenness from {self.betweenness_samples} sampled sources"
        return f"CentralityResult({list(self)}{how})"


def _betweenness(
    g: Connectome, absw: np.ndarray, samples: int | None, seed: int, progress: bool | None = None
) -> np.ndarray:
    n = g.num_nodes
    keep = absw > 0
    if not keep.any():
        return np.zeros(n)
    G = edge_topology(g, keep)
    dist = -np.log(absw[keep] / absw.max())
    dist = np.maximum(dist, ZERO_DISTANCE)
    weights = dist.tolist()
    del dist
    if samples is None or samples >= n:
        sources = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        sources = np.sort(rng.choice(n, size=samples, replace=False))
    # Betweenness restricted to a set of sources is the sum over its sources (Brandes'
    # accumulation is per source), so running the sources in chunks gives the same values
    # and lets a bar say where a long run is.
    bar = progress_bar(sources.size, "betweenness (sources)", progress, heavy=sources.size * G.ecount() > PROGRESS_WORK)
    chunks = np.array_split(sources, min(sources.size, 50)) if bar is not None else [sources]
    raw = np.zeros(n)
    try:
        for chunk in chunks:
            if sources.size == n and bar is None:
                raw += np.asarray(G.betweenness(directed=True, weights=weights), dtype=np.float64)
            else:
                raw += np.asarray(G.betweenness(directed=True, weights=weights, sources=chunk.tolist()), dtype=np.float64)
            if bar is not None:
                bar.update(chunk.size)
    finally:
        if bar is not None:
            bar.close()
    if sources.size == n:
        return raw
    # Unbiased scale-up (Brandes & Pich 2007), as networkx does for k sources: a node that
    # is not a source saw k of the n - 1 other sources; a source node saw k - 1 of them.
    k = sources.size
    scale = np.full(n, (n - 1) / k)
    scale[sources] = (n - 1) / (k - 1)
    return raw * scale


def default_measures(g: Connectome, betweenness: bool = True) -> list[str]:
    """The measures :func:`centrality` computes by default: :data:`DEFAULT_MEASURES`, ``flow``
    only when ``g`` has node attribution, ``betweenness`` only when asked (the command line
    and reports leave it out: it is the one that does not scale linearly with the edges).
    """
    return [m for m in DEFAULT_MEASURES
            if (m != "flow" or "attribution" in g.node_attrs) and (m != "betweenness" or betweenness)]


def centrality(
    g: Connectome,
    measures: Sequence[str] | str | None = None,
    *,
    normalized_by_layer: bool = False,
    weight: str = "weight",
    betweenness_samples: int | str | None = "auto",
    seed: int = 0,
    damping: float = 0.85,
    progress: bool | None = None,
) -> CentralityResult:
    """Centrality of every unit, one array per measure.

    Parameters
    ----------
    g : Connectome
    measures : sequence of str, str or None, default None
        Any of ``MEASURES``:

        - ``in_strength``, ``out_strength``, ``strength`` (in + out): sums of ``|w|``.
          ``"strength"`` is the total only; ask for the in/out ones by name.
        - ``signed_in_strength``, ``signed_out_strength``, ``signed_strength``: sums of ``w``.
        - ``pagerank``: directed PageRank on ``|w|`` (igraph PRPACK). Rank accumulates along
          edge direction, i.e. towards the output layer; output units are dangling and
          teleport uniformly (the networkx convention too).
        - ``betweenness``: directed, unnormalised shortest-path betweenness with edge length
          ``-log(|w| / max|w|)`` (see ``ZERO_DISTANCE``); exact on small graphs, estimated
          from sampled sources on large ones (see ``betweenness_samples``).
        - ``eigenvector``: eigenvector centrality of the *undirected* ``|w|`` graph, scaled
          to max 1. On a DAG the directed version is identically zero (the adjacency
          matrix is nilpotent), so the undirected one is the informative choice. Meaningful
          per connected component only.
        - ``hub``, ``authority``: Kleinberg's HITS scores on ``|w|`` (igraph), scaled to
          max 1. A hub feeds many strong authorities; an authority is fed by strong hubs.
          Input units have authority 0 and output units hub 0 by construction, so igraph's
          warning about many zero scores is silenced; the scores are unique when the
          leading eigenvalue of ``A A^T`` is simple (it is for connected random-like
          graphs, not for, e.g., two identical disconnected blocks).
        - ``flow``: the node attribute ``attribution`` (a unit's total attribution flow).

        ``None`` computes ``strength, pagerank, betweenness`` and ``flow`` when the graph
        has ``attribution``. Asking for ``flow`` by name on a graph without it is an error.
    normalized_by_layer : bool, default False
        Divide each measure by its largest ``|value|`` within each layer (layers differ in
        size and scale); a layer whose values are all 0 stays 0.
    weight : str, default "weight"
        Edge column to use (e.g. ``"abs_weight"``).
    betweenness_samples : int, "auto" or None, default "auto"
        Estimate betweenness from this many source vertices drawn without replacement
        (seeded), scaled up to the full value; exact when None or >= the number of nodes.
        Each source costs one Dijkstra pass over the edges, so time is linear in it.
        ``"auto"``: exact while ``n_nodes * n_edges <= BETWEENNESS_WORK`` (zoo-sized graphs,
        well under a second), else :func:`auto_betweenness_samples` sources (16 on
        ResNet-50's 15.5M edges, about 20 s on 2 cores). Exact betweenness on a graph that
        size would take hours. The result's ``betweenness_samples`` says what was used.
    seed : int, default 0
        Seed of the betweenness source sample, and of ARPACK's start vector (eigenvector,
        hub, authority) so that degenerate cases are reproducible.
    damping : float, default 0.85
        PageRank damping factor.
    progress : bool, optional
        Show a progress bar on stderr for betweenness; by default only when the run is
        long (more than ``PROGRESS_WORK`` edge relaxations).

    Returns
    -------
    CentralityResult
        A dict of str -> ndarray of float64, shape (n_nodes,), in the order of
        ``measures``, each aligned with ``g.node_ids``; ``.betweenness_samples`` is the
        number of sampled sources (``None``: exact, or no betweenness).

    Raises
    ------
    ValueError
        Unknown measure (the message lists the valid ones), ``betweenness_samples < 2``.
    ConnectomeError
        ``flow`` asked for on a graph without ``attribution``; unknown or non-finite edge
        column.
    EmptyGraphError
        A graph without nodes.

    Notes
    -----
    Sampled betweenness uses igraph's subset betweenness (``betweenness(sources=...)``),
    which runs the per-source Brandes passes in C for exactly the sampled sources; that is
    the estimator of Brandes & Pich (2007) and of networkx's ``k=``. A path-length
    ``cutoff`` would instead drop long paths (biased, and ``-log`` lengths have no natural
    scale to cut at), and a subgraph would change the paths themselves. The scale-up is
    ``(n - 1) / k`` for non-source nodes and ``(n - 1) / (k - 1)`` for sampled ones,
    unbiased for both, and equal to networkx's for the same sources.

    References
    ----------
    .. [1] Brandes, U. (2001). A faster algorithm for betweenness centrality. J. Math.
       Sociol. 25(2), 163-177.
    .. [2] Brandes, U. & Pich, C. (2007). Centrality estimation in large networks. Int. J.
       Bifurcation and Chaos 17(7), 2303-2318.
    .. [3] Page, L., Brin, S., Motwani, R. & Winograd, T. (1999). The PageRank citation
       ranking: bringing order to the web. Stanford InfoLab.
    .. [4] Kleinberg, J. (1999). Authoritative sources in a hyperlinked environment.
       J. ACM 46(5), 604-632.

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     [("in", "input", 2), ("h", "conv", 1), ("out", "output", 2)],
    ...     [("in:0", "h:0", 1.0), ("in:1", "h:0", -1.0), ("h:0", "out:0", 2.0), ("h:0", "out:1", 0.5)])
    >>> c = centrality(g, ["strength", "betweenness"])
    >>> c["strength"].tolist()
    [1.0, 1.0, 4.5, 2.0, 0.5]
    >>> int(c["betweenness"].argmax())   # every path goes through h:0
    2
    """
    _check_nonempty(g, "centrality")
    if measures is None:
        measures = default_measures(g)
    elif isinstance(measures, str):
        measures = [measures]
    measures = list(dict.fromkeys(measures))
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; valid measures are {list(MEASURES)}")
    if betweenness_samples == "auto":
        betweenness_samples = auto_betweenness_samples(g.num_nodes, g.num_edges)
    elif betweenness_samples is not None and (
        isinstance(betweenness_samples, (str, bool)) or int(betweenness_samples) != betweenness_samples
        or betweenness_samples < 2
    ):
        raise ValueError(f"betweenness_samples must be 'auto', an integer >= 2 or None, got {betweenness_samples!r}")
    elif betweenness_samples is not None:
        betweenness_samples = int(betweenness_samples)
    if betweenness_samples is not None and betweenness_samples >= g.num_nodes:
        betweenness_samples = None
    if "flow" in measures and "attribution" not in g.node_attrs:
        raise ConnectomeError(
            "measure 'flow' is the node attribute 'attribution', which this graph lacks "
            f"(it has {sorted(g.node_attrs) or 'no node attributes'}); extract an attribution graph "
            "(connectome.extract.attribution) or leave 'flow' out of measures"
        )
    w = _edge_values(g, weight)
    absw = np.abs(w)
    needs_igraph = {"pagerank", "eigenvector", "hub", "authority"} & set(measures)
    if needs_igraph and g.num_edges and absw.any():
        # zero edges change none of these measures (a unit whose out-edges are all zero is
        # dangling either way), so they stay out of igraph: less to convert and to hold
        nonzero = absw > 0
        G = edge_topology(g, nonzero)
        wl = absw[nonzero].tolist()
    out: dict[str, np.ndarray] = {}
    for m in measures:
        if m in _STRENGTHS:
            direction, absolute = _STRENGTHS[m]
            v = strength(g, direction, absolute, weight)
        elif m == "flow":
            v = np.asarray(g.node_attrs["attribution"], dtype=np.float64).copy()
        elif m == "betweenness":
            v = _betweenness(g, absw, betweenness_samples, seed, progress)
        elif not g.num_edges or not absw.any():
            # No weighted edges: PageRank is the teleport distribution, the rest vanish.
            v = np.full(g.num_nodes, 1.0 / g.num_nodes) if m == "pagerank" else np.zeros(g.num_nodes)
        elif m == "pagerank":
            v = np.asarray(G.pagerank(directed=True, damping=damping, weights=wl), dtype=np.float64)
        elif m == "eigenvector":
            # python-igraph 1.0 rejects directed=False on a directed graph; mode="each" keeps
            # edge e as edge e (a DAG has no reciprocal pairs to merge).
            U = G.as_undirected(mode="each")
            with _seeded_igraph(seed):
                v = np.asarray(U.eigenvector_centrality(weights=wl), dtype=np.float64)
        else:
            # ARPACK starts from a random vector; seeded, a degenerate case is reproducible.
            with warnings.catch_warnings(), _seeded_igraph(seed):
                # Sources of a DAG have authority 0 and sinks hub 0, so igraph's "more than
                # 30% zeros" warning fires on every layered graph.
                warnings.filterwarnings("ignore", message="More than 30% of hub or authority scores are zeros")
                score = G.hub_score if m == "hub" else G.authority_score
                v = np.asarray(score(weights=wl), dtype=np.float64)
        if m in ("eigenvector", "hub", "authority"):
            # Perron vectors are >= 0; ARPACK leaves -0.0 and -1e-17 where 0 is meant.
            v = np.where(v > 0, v, 0.0)
        out[m] = v
    if normalized_by_layer:
        out = {k: _normalize_by_layer(g, v) for k, v in out.items()}
    return CentralityResult(out, betweenness_samples=betweenness_samples if "betweenness" in measures else None)


def _normalize_by_layer(g: Connectome, v: np.ndarray) -> np.ndarray:
    top = np.zeros(len(g.layers))
    np.maximum.at(top, g.node_layer, np.abs(v))
    denom = top[g.node_layer]
    return np.divide(v, denom, out=np.zeros_like(v, dtype=np.float64), where=denom > 0)


def top_nodes(
    g: Connectome,
    scores: np.ndarray | Sequence[float] | str,
    k: int = 10,
    layer: str | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring units as ``(node id, score)``, highest first.

    Parameters
    ----------
    g : Connectome
    scores : array-like, shape (n_nodes,), or str
        Scores aligned with ``g.node_ids`` (e.g. ``centrality(g)["pagerank"]``), or the
        name of a node attribute (``"attribution"``).
    k : int, default 10
        How many to return (fewer when there are fewer units).
    layer : str, optional
        Rank only the units of this layer.

    Returns
    -------
    list of (str, float)
        Highest score first; ties broken by node order (layer, then unit). NaN scores are
        never ranked.

    Raises
    ------
    ValueError
        ``scores`` of the wrong shape, ``k < 1``.
    ConnectomeError
        Unknown layer or node attribute.

    Examples
    --------
    >>> g = Connectome.from_edges([("in", "input", 3)])
    >>> top_nodes(g, [0.5, 2.0, 0.5], k=2)
    [('in:1', 2.0), ('in:0', 0.5)]
    """
    if isinstance(scores, str):
        scores = g.node_attr(scores)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != g.num_nodes:
        raise ValueError(f"scores must have one value per node ({g.num_nodes}), got {s.shape[0]}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    idx = np.arange(g.num_nodes)
    if layer is not None:
        idx = idx[g.layer_slice(layer)]
    idx = idx[~np.isnan(s[idx])]
    order = idx[np.lexsort((idx, -s[idx]))][: int(k)]
    ids = g.node_ids
    return [(str(ids[i]), float(s[i])) for i in order]
