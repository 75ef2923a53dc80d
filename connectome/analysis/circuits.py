"""Circuits: the units that carry most of the flow into a target, and their groups.

A circuit is traced backwards from one target unit (by default the logit of the graph's
category): layer by layer, in reverse layer order, the units that send the most flow into
the units kept so far are kept, until a fraction ``mass`` of that flow is held (or the
``top_k`` strongest). Because a unit is a candidate as soon as it has an edge into *any*
kept unit, skip connections (residual adds) are followed too. This is the graph analogue
of tracing a circuit by hand in Olah et al. (2020) and of the core-neuron selection of
NeurFlow (Cao et al. 2025); :func:`neuron_groups` then clusters the circuit's units into
groups with shared functional interactions, as NeurFlow does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome, Layer

__all__ = ["circuit", "flow_share", "top_contributors", "neuron_groups", "GroupGraph", "relative_depth"]

SELECTORS = ("layer", "global")


# ---------------------------------------------------------------------- targets
def _output_layer(g: Connectome) -> int:
    """Position of the output layer: the last layer of kind ``output``, else the last layer."""
    for i in range(len(g.layers) - 1, -1, -1):
        if g.layers[i].kind == "output":
            return i
    return len(g.layers) - 1


def _unit_in_layer(g: Connectome, li: int, unit: int) -> int | None:
    s = g.layer_slice(g.layers[li].name)
    hit = np.flatnonzero(g.node_units[s] == unit)
    return int(s.start + hit[0]) if hit.size else None


def _target_examples(g: Connectome) -> str:
    li = _output_layer(g)
    l = g.layers[li]
    s = g.layer_slice(l.name)
    ids = g.node_ids[s][:3].tolist()
    text = f"node ids such as {ids}"
    if l.labels:
        text += f" or class labels of layer {l.name!r} such as {list(l.labels[:3])}"
    return text


def has_target(g: Connectome) -> bool:
    """Whether the graph names its class unit: the default target of :func:`circuit` (an
    attribution graph of one category has one; a weight graph has none)."""
    try:
        target_node(g, None)
    except ConnectomeError:
        return False
    return True


def target_node(g: Connectome, target: Any) -> int:
    """Global node index of the unit a circuit is traced back from.

    Parameters
    ----------
    g : Connectome
    target : str, int or None
        A node id, a class label or a unit index of the output layer; ``None``: the unit of
        ``meta['target_class']`` (the target the flows were computed for), else of
        ``meta['category']``.

    Returns
    -------
    int

    Raises
    ------
    EmptyGraphError
        The graph has no nodes.
    ConnectomeError
        No such unit, or (``None``) a graph whose meta names no unit of its output layer.
    TypeError
        ``target`` of another type.
    """
    if g.num_nodes == 0:
        raise EmptyGraphError("the graph has no nodes")
    li = _output_layer(g)
    out = g.layers[li]
    if target is None:
        # the unit the flows were computed for comes first: a --target run's graph of category
        # 'dog' holds the flows into 'cat', and the circuit into 'dog' would be empty
        tc = g.meta.get("target_class")
        if tc is not None and not isinstance(tc, bool):
            try:
                idx = _unit_in_layer(g, li, int(tc))
            except (TypeError, ValueError, OverflowError):  # meta from a file: a list, a text, inf
                idx = None
            if idx is not None:
                return idx
        cat = g.meta.get("category")
        if cat is not None and out.labels is not None and str(cat) in out.labels:
            return g.layer_slice(out.name).start + out.labels.index(str(cat))
        raise ConnectomeError(
            "no default target: meta has no 'category' matching a label of the output layer "
            f"{out.name!r} and no 'target_class' among its units (meta category="
            f"{g.meta.get('category')!r}, target_class={g.meta.get('target_class')!r}); "
            f"pass target= one of the {_target_examples(g)}"
        )
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        idx = _unit_in_layer(g, li, int(target))
        if idx is None:
            raise ConnectomeError(
                f"no unit {int(target)} in the output layer {out.name!r}; pass one of the {_target_examples(g)}"
            )
        return idx
    if isinstance(target, str):
        if g.has_node(target):
            return int(g.index_of(target))
        if out.labels is not None and target in out.labels:
            return g.layer_slice(out.name).start + out.labels.index(target)
        raise ConnectomeError(f"no target {target!r} in this graph; pass one of the {_target_examples(g)}")
    raise TypeError(f"target must be a node id, a class label, a unit index or None, got {type(target).__name__}")


def relative_depth(g: Connectome) -> dict[str, float]:
    """Relative depth of each layer, ``position / (n_layers - 1)`` in ``[0, 1]``.

    For a circuit (or any graph whose ``meta["circuit"]["depth"]`` is set) the depths of the
    graph the circuit was traced in are used, so that a circuit that skips layers keeps them.
    """
    info = g.meta.get("circuit")
    known = info.get("depth") if isinstance(info, dict) else None
    n = len(g.layers)
    own = {l.name: (i / (n - 1) if n > 1 else 0.0) for i, l in enumerate(g.layers)}
    if isinstance(known, dict) and all(name in known for name in own):
        return {name: float(known[name]) for name in own}
    return own


def _flow(g: Connectome, attr: str) -> np.ndarray:
    v = np.abs(np.asarray(g.edge_attr(attr), dtype=np.float64))
    return np.where(np.isfinite(v), v, 0.0)


def flow_share(g: Connectome, target: str | int | None = None, attr: str = "weight") -> np.ndarray:
    """Each unit's share of the flow that reaches a target unit, over all paths.

    The target has share 1; a unit passes to each of its inputs the part of its share that
    the input's ``|flow|`` is of the unit's total incoming ``|flow|``, layer by layer in
    reverse order (skip connections split the share between the paths). Without skip
    connections the shares of each layer sum to 1 (less where flow enters from biases only).

    Parameters
    ----------
    g : Connectome
    target : str, int or None
        As in :func:`circuit`.
    attr : str, default "weight"
        Edge column holding the flow.

    Returns
    -------
    ndarray of float64, shape (n_nodes,)
        Aligned with ``g.node_ids``; 0 for units with no path to the target.

    Examples
    --------
    >>> from connectome.analysis._toys import toy_attribution
    >>> g = toy_attribution("cat")
    >>> s = flow_share(g)
    >>> float(s[g.index_of("logits:0")]), round(float(s[g.index_of("h2:0")]), 3)
    (1.0, 0.6)
    """
    return _share(g, target_node(g, target), _flow(g, attr))


def _share(g: Connectome, t: int, flow: np.ndarray) -> np.ndarray:
    n = g.num_nodes
    inflow = np.bincount(g.dst, weights=flow, minlength=n)
    share = np.zeros(n)
    share[t] = 1.0
    dst_layer = g.node_layer[g.dst]
    by_dst = np.argsort(dst_layer, kind="stable")
    bounds = np.searchsorted(dst_layer[by_dst], np.arange(len(g.layers) + 1))
    for li in range(int(g.node_layer[t]), 0, -1):
        e = by_dst[bounds[li] : bounds[li + 1]]
        d = g.dst[e]
        w = np.divide(flow[e], inflow[d], out=np.zeros(e.size), where=inflow[d] > 0) * share[d]
        share += np.bincount(g.src[e], weights=w, minlength=n)
    return share


def _select_global(g: Connectome, t: int, flow: np.ndarray, attr: str, mass: float, top_k: int | None,
                   max_units: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Kept mask and scores of the global selector (see :func:`circuit`)."""
    share = _share(g, t, flow)
    share[t] = 0.0
    cand = np.flatnonzero(share > 0)
    ranked = cand[np.lexsort((cand, -share[cand]))]
    if top_k is not None:
        n_keep = min(top_k, ranked.size)
    else:
        csum = np.cumsum(share[ranked])
        n_keep = min(int(np.searchsorted(csum, mass * csum[-1] * (1 - 1e-12))) + 1, ranked.size) if ranked.size else 0
    if max_units is not None:
        n_keep = min(n_keep, int(max_units) - 1)
    chosen = np.zeros(g.num_nodes, dtype=bool)
    chosen[ranked[:n_keep]] = True
    # a backbone: every layer's strongest unit, so that a small mass still reaches the input
    # (small layers hold large shares per unit and would otherwise take the whole budget)
    lay = g.node_layer[cand]
    for li in np.unique(lay):
        c = cand[lay == li]
        chosen[c[np.argmax(share[c])]] = True
    # keep only units wired to the target through kept units: walk back from the target
    kept = np.zeros(g.num_nodes, dtype=bool)
    kept[t] = True
    node_layer = g.node_layer
    src_layer = node_layer[g.src]
    live = flow > 0
    for li in range(int(node_layer[t]) - 1, -1, -1):
        e = np.flatnonzero((src_layer == li) & live)
        e = e[kept[g.dst[e]] & chosen[g.src[e]]]
        kept[g.src[e]] = True
    score = share
    score[t] = flow[g.dst == t].sum()
    return kept, score


# ---------------------------------------------------------------------- circuit
def circuit(
    g: Connectome,
    target: str | int | None = None,
    mass: float = 0.8,
    top_k: int | None = None,
    attr: str = "weight",
    max_units: int | None = None,
    select: str = "layer",
) -> Connectome:
    """The units that carry most of the flow into a target unit.

    Starting from the target, layers are visited in reverse order. In each layer, the
    candidates are the units with an edge into a unit kept so far (in any later layer, so
    skip connections are followed); each is scored by its total flow ``sum |E|`` into the
    kept units. The layer keeps the smallest set of strongest candidates whose scores sum
    to at least ``mass`` of the layer's total, or the ``top_k`` strongest.

    The mass is held per layer: without skip connections the target thus keeps at least
    ``mass`` of its incoming flow. With them, an input that skips to the target competes,
    in its own layer, with the inputs of the units it skips over, and may be dropped; pass
    a larger ``mass`` to keep weak paths.

    Parameters
    ----------
    g : Connectome
        An attribution graph (flows) or a weight graph (``|w|`` is used as flow).
    target : str or int, optional
        A node id (``"logits:3"``), a class label of the output layer (``"cat"``), or a unit
        index of the output layer. Default: unit ``meta["target_class"]`` (the target the
        flows were computed for), else the output unit labelled ``meta["category"]``.
    mass : float in (0, 1], default 0.8
        Fraction of each layer's flow into the kept units that the kept units of that layer
        must hold. Ignored when ``top_k`` is given.
    top_k : int, optional
        Keep the ``top_k`` strongest candidates per layer instead.
    attr : str, default "weight"
        Edge column holding the flow.
    max_units : int, optional
        A unit budget for the whole circuit, so that it stays readable on large models:
        each layer keeps at most ``max(1, (max_units - 1) // n)`` units (its strongest),
        ``n`` being the number of layers before the target's, so the circuit has at most
        ``max(max_units, n + 1)`` units. ``mass`` (or ``top_k``) still decides first; the
        cap only trims. On ResNet-50 (70 layers before the logits)
        ``mass=0.8`` keeps about 9,000 units, ``max_units=150`` two per layer.
    select : {"layer", "global"}, default "layer"
        ``"layer"``: the per-layer rule above. ``"global"``: every unit is scored by its share
        of the flow into the target over all paths (:func:`flow_share`); the strongest units
        of the whole graph are kept until they hold ``mass`` of the summed shares (or the
        ``top_k`` strongest, or at most ``max_units - 1``), together with each layer's
        strongest unit, and then only those wired to the target through kept units (an
        edge-attribution-patching-style circuit). Layers with
        few units hold larger shares per unit, so the global rule takes fewer units from
        wide layers. ``circuit_flow`` is then the unit's share. See the README's
        "Faithfulness" section for how the two rules compare under ablation.

    Returns
    -------
    Connectome
        The subgraph induced on the kept units (node ids, edges with their flows and node
        attributes as in ``g``), with node attribute ``circuit_flow`` (a unit's flow into
        the rest of the circuit; for the target, its total incoming flow) and
        ``meta["circuit"]`` = ``{target, target_label, mass, top_k, max_units, attr, sizes,
        coverage, capped, depth}``: units kept per layer, fraction of the candidates' flow
        they hold, how many units ``mass``/``top_k`` wanted in layers the budget trimmed,
        and the relative depth of each layer in ``g``.

    Raises
    ------
    ConnectomeError
        No default target, or a target not in the graph.
    EmptyGraphError
        No flow reaches the target.

    Examples
    --------
    >>> from connectome.analysis._toys import toy_attribution
    >>> c = circuit(toy_attribution("cat"), mass=0.8)
    >>> c.node_ids.tolist()
    ['in:0', 'in:1', 'h1:0', 'h1:1', 'h2:0', 'h2:1', 'logits:0']

    References
    ----------
    Olah, C. et al. (2020). Zoom In: An Introduction to Circuits. Distill.
    Cao, T. M. et al. (2025). NeurFlow: Interpreting Neural Networks through Neuron Groups
    and Functional Interactions. ICLR.
    """
    if top_k is not None:
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        top_k = int(top_k)
    elif not (0 < mass <= 1):
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    if max_units is not None and (isinstance(max_units, bool) or int(max_units) != max_units or max_units < 2):
        raise ValueError(f"max_units must be an integer >= 2 (the target and one unit), got {max_units!r}")
    if select not in SELECTORS:
        raise ValueError(f"select must be one of {SELECTORS}, got {select!r}")
    t = target_node(g, target)
    flow = _flow(g, attr)
    if select == "global":
        kept, score = _select_global(g, t, flow, attr, mass, top_k, max_units)
        return _finish(g, t, kept, score, attr, mass, top_k, max_units, select, {}, {})
    kept, score, coverage, capped = _select_layer(g, t, flow, mass, top_k, max_units)
    return _finish(g, t, kept, score, attr, mass, top_k, max_units, select, coverage, capped)


def circuit_units(g: Connectome, mass: float = 0.8) -> np.ndarray:
    """The units of ``circuit(g, mass=mass)`` as a mask over ``g``'s nodes, without building the subgraph.

    For many graphs at once (a category store keeps one per category): the selection alone,
    a fraction of the cost of :func:`circuit`.

    Parameters
    ----------
    g : Connectome
    mass : float in (0, 1], default 0.8

    Returns
    -------
    ndarray of bool, shape (n_nodes,)

    Raises
    ------
    ConnectomeError, EmptyGraphError
        As :func:`circuit`.
    """
    if not (0 < mass <= 1):
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    t = target_node(g, None)
    kept = _select_layer(g, t, _flow(g, "weight"), mass, None, None)[0]
    if kept.sum() == 1:
        raise EmptyGraphError(f"the circuit of {str(g.node_ids[t])!r} is empty: no flow reaches it")
    return kept


def _select_layer(g: Connectome, t: int, flow: np.ndarray, mass: float, top_k: int | None, max_units: int | None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, float], dict[str, int]]:
    """The per-layer rule of :func:`circuit`: (kept mask, score, coverage, capped)."""
    n = g.num_nodes
    node_layer = g.node_layer
    src_layer = node_layer[g.src]
    # Edges grouped by source layer once, so each layer step touches only its own edges.
    by_src = np.argsort(src_layer, kind="stable")
    bounds = np.searchsorted(src_layer[by_src], np.arange(len(g.layers) + 1))
    kept = np.zeros(n, dtype=bool)
    kept[t] = True
    score = np.zeros(n)
    score[t] = flow[g.dst == t].sum()
    coverage: dict[str, float] = {}
    capped: dict[str, int] = {}
    per_layer = None if max_units is None else max(1, (int(max_units) - 1) // max(int(node_layer[t]), 1))
    for li in range(int(node_layer[t]) - 1, -1, -1):
        e = by_src[bounds[li] : bounds[li + 1]]
        e = e[kept[g.dst[e]]]
        if e.size == 0:
            continue
        start = g.layer_slice(g.layers[li].name).start
        s = np.bincount(g.src[e] - start, weights=flow[e], minlength=g.layers[li].size)
        cand = np.flatnonzero(s > 0)
        if cand.size == 0:
            continue
        ranked = cand[np.lexsort((cand, -s[cand]))]  # strongest first, ties by unit order
        vals = s[ranked]
        if top_k is not None:
            n_keep = min(top_k, ranked.size)
        else:
            csum = np.cumsum(vals)
            # Relative slack so float rounding cannot cost an extra unit at mass=1.
            n_keep = min(int(np.searchsorted(csum, mass * csum[-1] * (1 - 1e-12))) + 1, ranked.size)
        if per_layer is not None and n_keep > per_layer:
            capped[g.layers[li].name] = n_keep
            n_keep = per_layer
        keep = ranked[:n_keep] + start
        kept[keep] = True
        score[keep] = vals[:n_keep]
        coverage[g.layers[li].name] = float(vals[:n_keep].sum() / vals.sum())
    return kept, score, coverage, capped


def _finish(g: Connectome, t: int, kept: np.ndarray, score: np.ndarray, attr: str, mass: float, top_k: int | None,
            max_units: int | None, select: str, coverage: dict[str, float], capped: dict[str, int]) -> Connectome:
    """The circuit subgraph on the kept units, with ``circuit_flow`` and ``meta["circuit"]``."""
    tid = str(g.node_ids[t])
    if kept.sum() == 1:
        raise EmptyGraphError(
            f"the circuit of {tid!r} is empty: no {attr!r} flow reaches it (its incoming edges are "
            "missing or zero); pass another target or a graph with flow into it"
        )
    idx = np.flatnonzero(kept)
    sub = g.subgraph(g.node_ids[idx])
    sizes = {l.name: int(l.size) for l in sub.layers}
    info = {
        "target": tid,
        "target_label": str(g.node_labels[t]),
        "mass": None if top_k is not None else float(mass),
        "top_k": top_k,
        "max_units": None if max_units is None else int(max_units),
        "attr": attr,
        "select": select,
        "sizes": sizes,
        "coverage": {name: coverage[name] for name in sizes if name in coverage},
        "capped": {name: capped[name] for name in sizes if name in capped},
        "depth": {name: d for name, d in relative_depth(g).items() if name in sizes},
    }
    return sub.with_node_attrs(circuit_flow=score[idx]).with_meta(circuit=info)


def _default_top_node(g: Connectome) -> int:
    li = _output_layer(g)
    s = g.layer_slice(g.layers[li].name)
    a = g.node_attrs.get("attribution")
    if a is not None:
        a = np.asarray(a[s], dtype=np.float64)
        nz = np.flatnonzero(np.isfinite(a) & (a != 0))
        if nz.size:
            # Among units with any attribution: in a graph attributed to one logit only that
            # unit is non-zero, even when the logit total is negative.
            return int(s.start + nz[np.argmax(a[nz])])
    return target_node(g, None)


def top_contributors(
    g: Connectome,
    node_id: str | int | None = None,
    k: int = 10,
    attr: str = "weight",
) -> list[tuple[str, float]]:
    """The direct inputs that sent the most flow into one unit, strongest first.

    The one-step case of :func:`circuit`: inputs (from any earlier layer, so skip
    connections count) ranked by ``|flow|``, the signed flow kept in the value.

    Parameters
    ----------
    g : Connectome
    node_id : str or int, optional
        A node id, a class label or an output unit index (as ``target`` of :func:`circuit`).
        Default: the top class, i.e. the output unit with the largest non-zero
        ``attribution``; without attribution, unit ``meta["target_class"]``, else the
        unit of ``meta["category"]``.
    k : int, default 10
        How many inputs to return (fewer if the unit has fewer non-zero inputs).
    attr : str, default "weight"
        Edge column holding the flow.

    Returns
    -------
    list of (str, float)
        ``(input node id, signed flow)``, sorted by ``|flow|`` descending, ties by node order.

    Examples
    --------
    >>> from connectome.analysis._toys import toy_attribution
    >>> top_contributors(toy_attribution("cat"), k=2)
    [('h2:0', 6.0), ('h2:1', 3.0)]
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    t = _default_top_node(g) if node_id is None else target_node(g, node_id)
    m = g.dst == t
    srcs = g.src[m]
    vals = np.asarray(g.edge_attr(attr)[m], dtype=np.float64)
    nz = vals != 0
    srcs, vals = srcs[nz], vals[nz]
    order = np.lexsort((srcs, -np.abs(vals)))[: int(k)]
    ids = g.node_ids
    return [(str(ids[srcs[i]]), float(vals[i])) for i in order]


# ---------------------------------------------------------------------- neuron groups
@dataclass(frozen=True, eq=False)
class GroupGraph:
    """Units of a circuit grouped per layer, and the flow between the groups.

    Attributes
    ----------
    graph : Connectome
        One layer per circuit layer (same names, kind ``"group"``), one unit per group; node
        ``size`` (members), summed ``attribution``/``bias_attribution``/``circuit_flow``,
        averaged ``activation_*``; edge ``weight`` = summed signed flow, ``abs_weight`` =
        summed ``|flow|``.
    members : dict of str -> list of str
        Group node id -> node ids of its units (in node order).
    membership : ndarray of int, shape (n_circuit_nodes,)
        For each node of the circuit, the index of its group node in ``graph``.
    """

    graph: Connectome
    members: dict[str, list[str]]
    membership: np.ndarray = field(repr=False)

    def __repr__(self) -> str:
        g = self.graph
        n_units = sum(len(v) for v in self.members.values())
        lines = [f"GroupGraph({g.num_nodes} groups of {n_units} units in {len(g.layers)} layers, {g.num_edges} edges)"]
        width = max((len(l.name) for l in g.layers), default=0)
        ids = g.node_ids.tolist()
        for l in g.layers:
            s = g.layer_slice(l.name)
            sizes = ", ".join(str(len(self.members[i])) for i in ids[s])
            lines.append(f"  {l.name:<{width}}  {l.size} group{'s' if l.size != 1 else ' '}  sizes {sizes}")
        return "\n".join(lines)


def _silhouette(D: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette width of a clustering from a distance matrix (Rousseeuw 1987)."""
    ks, lab = np.unique(labels, return_inverse=True)
    n = D.shape[0]
    if ks.size < 2 or ks.size >= n:
        return float("nan")
    onehot = np.zeros((n, ks.size))
    onehot[np.arange(n), lab] = 1.0
    counts = onehot.sum(axis=0)
    sums = D @ onehot  # distance of each unit to each cluster, summed
    own = counts[lab] - 1
    a = np.divide(sums[np.arange(n), lab], own, out=np.zeros(n), where=own > 0)
    other = sums / counts
    other[np.arange(n), lab] = np.inf
    b = other.min(axis=1)
    s = np.where(own > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


_MIN_SILHOUETTE = 0.25  # Kaufman & Rousseeuw: below this, "no substantial structure"


def _cluster_layer(X, n_groups: int | None, max_groups: int) -> np.ndarray:
    """Labels 0..k-1 for the rows of sparse ``X``; 0 is the largest group."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = X.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    gram = np.asarray((X @ X.T).todense(), dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    zero = norms == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / np.outer(norms, norms)
    cos[zero, :] = 0.0
    cos[:, zero] = 0.0
    cos[np.ix_(zero, zero)] = 1.0  # units with no flow at all group together
    D = np.clip(1.0 - cos, 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    D = (D + D.T) / 2
    Z = linkage(squareform(D, checks=False), method="average")
    if n_groups is not None:
        labels = fcluster(Z, t=min(n_groups, n), criterion="maxclust")
    elif n == 2:
        # Silhouette is undefined for two singletons: split only units whose profiles are
        # orthogonal or opposed.
        labels = np.array([1, 2]) if D[0, 1] >= 1.0 else np.array([1, 1])
    else:
        best, labels = -np.inf, np.ones(n, dtype=np.int64)
        for k in range(2, min(max_groups, n - 1) + 1):
            lab = fcluster(Z, t=k, criterion="maxclust")
            sil = _silhouette(D, lab)
            if np.isfinite(sil) and sil > best + 1e-12:
                best, labels = sil, lab
        if best < _MIN_SILHOUETTE:
            labels = np.ones(n, dtype=np.int64)
    # Renumber: largest group first, ties by first member.
    ks, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    remap = np.empty(ks.size, dtype=np.int64)
    remap[order] = np.arange(ks.size)
    return remap[np.searchsorted(ks, labels)]


_SUMMED = ("attribution", "bias_attribution", "circuit_flow")


def neuron_groups(
    circ: Connectome,
    n_groups: int | None = None,
    max_groups_per_layer: int = 4,
    seed: int = 0,
    attr: str = "weight",
) -> GroupGraph:
    """Group the units of each layer of a circuit by their flow profiles (NeurFlow-style).

    A unit's profile is its row of signed flow to every unit of the circuit concatenated
    with its column of flow from every unit, normalised to unit length. Within each layer
    the profiles are clustered by average-linkage hierarchical clustering on cosine
    distance; the tree is cut at ``n_groups`` groups, or else at the ``k`` in
    ``2..max_groups_per_layer`` with the largest mean silhouette width, and at one group when
    that width is below 0.25 (no substantial structure). Groups are then wired by the summed
    flow between their members.

    Parameters
    ----------
    circ : Connectome
        Usually the output of :func:`circuit` (any graph works; large layers cost
        ``O(units^2)`` memory).
    n_groups : int, optional
        Groups per layer (at most the number of units). Default: chosen per layer.
    max_groups_per_layer : int, default 4
        Upper bound for the chosen number of groups.
    seed : int, default 0
        Accepted for symmetry with other grouping functions; the clustering is
        deterministic and does not use it.
    attr : str, default "weight"
        Edge column holding the flow.

    Returns
    -------
    GroupGraph

    Examples
    --------
    >>> from connectome.analysis._toys import toy_two_groups
    >>> gg = neuron_groups(toy_two_groups())
    >>> gg.members["h1:0"], gg.members["h1:1"]
    (['h1:0', 'h1:1', 'h1:2'], ['h1:3', 'h1:4', 'h1:5'])

    References
    ----------
    Cao, T. M. et al. (2025). NeurFlow: Interpreting Neural Networks through Neuron Groups
    and Functional Interactions. ICLR.
    Rousseeuw, P. J. (1987). Silhouettes: a graphical aid to the interpretation and
    validation of cluster analysis. J. Comput. Appl. Math. 20, 53-65.
    """
    from scipy import sparse

    if n_groups is not None and (isinstance(n_groups, bool) or int(n_groups) != n_groups or n_groups < 1):
        raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
    if isinstance(max_groups_per_layer, bool) or int(max_groups_per_layer) != max_groups_per_layer or max_groups_per_layer < 1:
        raise ValueError(f"max_groups_per_layer must be a positive integer, got {max_groups_per_layer!r}")
    if circ.num_nodes == 0:
        raise EmptyGraphError("neuron_groups needs a circuit with units")
    n = circ.num_nodes
    w = np.asarray(circ.edge_attr(attr), dtype=np.float64)
    w = np.where(np.isfinite(w), w, 0.0)
    M = sparse.csr_matrix((w, (circ.src, circ.dst)), shape=(n, n))
    profile = sparse.hstack([M, M.T.tocsr()], format="csr")
    group_of = np.empty(n, dtype=np.int64)  # global group node index
    layers: list[Layer] = []
    offset = 0
    ids = circ.node_ids.tolist()
    for l in circ.layers:
        s = circ.layer_slice(l.name)
        lab = _cluster_layer(profile[s], None if n_groups is None else int(n_groups), int(max_groups_per_layer))
        k = int(lab.max()) + 1
        group_of[s] = lab + offset
        layers.append(Layer(name=l.name, kind="group", size=k))
        offset += k
    n_g = offset
    node_layer = np.repeat(np.arange(len(layers)), [l.size for l in layers])
    units = np.concatenate([np.arange(l.size) for l in layers])
    gids = [f"{layers[node_layer[i]].name}:{units[i]}" for i in range(n_g)]
    members: dict[str, list[str]] = {gid: [] for gid in gids}
    for i, gi in enumerate(group_of.tolist()):
        members[gids[gi]].append(ids[i])
    counts = np.bincount(group_of, minlength=n_g).astype(np.float64)
    node_attrs: dict[str, np.ndarray] = {"size": counts}
    for name, v in circ.node_attrs.items():
        v = np.asarray(v)
        if v.dtype.kind not in "fiu":
            continue
        if name in _SUMMED:
            node_attrs[name] = np.bincount(group_of, weights=v.astype(np.float64), minlength=n_g)
        elif name.startswith("activation_"):
            node_attrs[name] = np.bincount(group_of, weights=v.astype(np.float64), minlength=n_g) / counts
    gs, gd = group_of[circ.src], group_of[circ.dst]
    key = gd * n_g + gs
    uniq, inv = np.unique(key, return_inverse=True)
    wsum = np.bincount(inv, weights=w, minlength=uniq.size)
    asum = np.bincount(inv, weights=np.abs(w), minlength=uniq.size)
    info = {
        "n_groups": {l.name: int(l.size) for l in layers},
        "kinds": {l.name: l.kind for l in circ.layers},
        "clustering": "average linkage, cosine distance on flow profiles",
        "k": "fixed" if n_groups is not None else f"silhouette, max {int(max_groups_per_layer)}",
    }
    graph = Connectome(
        layers=tuple(layers),
        node_units=units,
        src=uniq % n_g,
        dst=uniq // n_g,
        weight=wsum,
        edge_attrs={"abs_weight": asum},
        node_attrs=node_attrs,
        meta={**circ.meta, "neuron_groups": info},
    )
    membership = group_of.copy()
    membership.setflags(write=False)
    return GroupGraph(graph=graph, members=members, membership=membership)
