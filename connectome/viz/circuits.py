"""Layered drawings of a connectome and of its neuron groups.

Layers are columns in topological order, units are dots, edges are lines coloured by sign
(red positive, blue negative) whose width and opacity grow with ``|weight|``. Within a column
the units are ordered by the barycenter of their neighbours (Sugiyama et al. 1981), a few
array sweeps that remove most crossings of the strong edges.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from connectome.graph import Connectome
from connectome.io import node_colors, node_sizes
from connectome.viz._mpl import axes as _axes
from connectome.viz._mpl import empty as _empty
from connectome.palette import community_legend, community_rgb

__all__ = ["plot_circuit", "plot_groups"]

POSITIVE = "tab:red"
NEGATIVE = "tab:blue"


# ---------------------------------------------------------------------------- layout
def _column_steps(sizes: Sequence[int], base: float = 0.12) -> np.ndarray:
    """Vertical spacing per column: common while columns are small, packed into [-0.5, 0.5] when big."""
    sizes = np.asarray(sizes, dtype=np.float64)
    m_max = float(sizes.max()) if sizes.size else 1.0
    common = max(1.0 / (m_max - 1.0) if m_max > 1 else 1.0, base)
    return np.minimum(np.where(sizes > 1, 1.0 / np.maximum(sizes - 1.0, 1.0), common), common)


def _ordered_y(g: Connectome, strength: np.ndarray | None = None, sweeps: int = 5) -> np.ndarray:
    """y of each node: units of a column spread evenly, ordered to reduce edge crossings.

    Starts from unit order, then alternates down and up sweeps: each unit moves to the
    ``|weight|``-weighted mean y of its inputs (down) or outputs (up); units with no such
    neighbours keep their place. Columns are centred on 0.
    """
    n = g.num_nodes
    sizes = [l.size for l in g.layers]
    steps = _column_steps(sizes)
    bounds = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    w = np.abs(g.weight.astype(np.float64)) if strength is None else strength
    w = np.where(np.isfinite(w), w, 0.0)

    def spread(li: int, rank: np.ndarray) -> np.ndarray:
        m = sizes[li]
        return (rank - (m - 1) / 2.0) * steps[li]

    y = np.zeros(n)
    for li in range(len(sizes)):
        y[bounds[li] : bounds[li + 1]] = spread(li, np.arange(sizes[li], dtype=np.float64))
    if g.num_edges == 0 or n == 0:
        return y
    # Edges are stored sorted by dst, so each dst layer is one contiguous range; sort once by src too.
    dst_cut = np.searchsorted(g.dst, bounds)
    by_src = np.argsort(g.src, kind="stable")
    src_sorted = g.src[by_src]
    src_cut = np.searchsorted(src_sorted, bounds)
    n_layers = len(sizes)

    def relax(li: int, nbr: np.ndarray, me: np.ndarray, ww: np.ndarray) -> None:
        lo, hi = bounds[li], bounds[li + 1]
        if hi - lo < 2 or me.size == 0:
            return
        num = np.bincount(me - lo, weights=ww * y[nbr], minlength=hi - lo)
        den = np.bincount(me - lo, weights=ww, minlength=hi - lo)
        key = np.where(den > 0, num / np.where(den > 0, den, 1.0), y[lo:hi])
        # Ties keep the current order, so a sweep never scrambles units it knows nothing about.
        order = np.lexsort((y[lo:hi], key))
        rank = np.empty(hi - lo)
        rank[order] = np.arange(hi - lo)
        y[lo:hi] = spread(li, rank)

    for s in range(max(int(sweeps), 0)):
        if s % 2 == 0:
            for li in range(1, n_layers):
                a, b = dst_cut[li], dst_cut[li + 1]
                relax(li, g.src[a:b], g.dst[a:b], w[a:b])
        else:
            for li in range(n_layers - 2, -1, -1):
                a, b = src_cut[li], src_cut[li + 1]
                e = by_src[a:b]
                relax(li, g.dst[e], g.src[e], w[e])
    return y


def _block_ids(g: Connectome) -> np.ndarray:
    """Index of each edge's (source layer, target layer) pair, shape (n_edges,)."""
    n_layers = max(len(g.layers), 1)
    _, inv = np.unique(g.node_layer[g.src] * n_layers + g.node_layer[g.dst], return_inverse=True)
    return inv.reshape(-1)


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Share ``total`` among blocks as evenly as their sizes allow (water filling)."""
    take = np.zeros(counts.size, dtype=np.int64)
    left = int(total)
    for j, b in enumerate(np.argsort(counts, kind="stable")):
        share = left // (counts.size - j)
        take[b] = min(int(counts[b]), share)
        left -= take[b]
    return take


def _strongest(weight: np.ndarray, max_edges: int | None, block: np.ndarray | None = None) -> np.ndarray:
    """Indices of the edges to draw, weakest first so the strongest are drawn on top.

    With ``block`` (one id per edge, e.g. its layer pair), ``max_edges`` is shared evenly
    among blocks and each keeps its own strongest edges: weights of different layers are on
    different scales, and a global cut would show one layer pair and nothing else.
    """
    a = np.abs(np.where(np.isfinite(weight), weight, 0.0))
    if max_edges is None or a.size <= max_edges:
        keep = np.arange(a.size)
    elif block is None or block.size == 0:
        keep = np.argpartition(-a, int(max_edges) - 1)[: int(max_edges)] if max_edges > 0 else np.zeros(0, np.int64)
    else:
        counts = np.bincount(block)
        take = _quotas(counts, int(max_edges))
        order = np.lexsort((-a, block))
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        rank = np.arange(a.size) - starts[block[order]]
        keep = order[rank < take[block[order]]]
    return keep[np.argsort(a[keep], kind="stable")]


def _relative(w: np.ndarray, block: np.ndarray | None) -> np.ndarray:
    """``|w|`` over the largest ``|w|`` of its block (or of all), in [0, 1]."""
    a = np.abs(w)
    if block is None or a.size == 0:
        top = a.max() if a.size else 0.0
        return a / top if top > 0 else np.zeros_like(a)
    top = np.zeros(int(block.max()) + 1)
    np.maximum.at(top, block, a)
    t = top[block]
    return np.divide(a, t, out=np.zeros_like(a), where=t > 0)


def _edge_segments(x0, y0, x1, y1, bulge: np.ndarray) -> list[np.ndarray]:
    """Straight segments, or quadratic arcs (16 points) where ``bulge`` is non-zero."""
    segs: list[np.ndarray] = []
    straight = bulge == 0
    if straight.any():
        s = np.stack([np.c_[x0[straight], y0[straight]], np.c_[x1[straight], y1[straight]]], axis=1)
        segs.extend(s)
    if (~straight).any():
        c = ~straight
        t = np.linspace(0.0, 1.0, 16)[None, :]
        cx = (x0[c] + x1[c]) / 2.0
        cy = (y0[c] + y1[c]) / 2.0 + bulge[c]
        px = (1 - t) ** 2 * x0[c, None] + 2 * t * (1 - t) * cx[:, None] + t**2 * x1[c, None]
        py = (1 - t) ** 2 * y0[c, None] + 2 * t * (1 - t) * cy[:, None] + t**2 * y1[c, None]
        segs.extend(np.stack([px, py], axis=-1))
    return segs


def _edge_style(w: np.ndarray, lw_range: tuple[float, float], alpha_range: tuple[float, float],
                block: np.ndarray | None = None):
    """RGBA colours and linewidths of edges by sign and normalised ``|w|``."""
    from matplotlib.colors import to_rgba

    t = _relative(w, block)
    rgba = np.where((w >= 0)[:, None], np.array(to_rgba(POSITIVE)), np.array(to_rgba(NEGATIVE)))
    rgba[:, 3] = alpha_range[0] + (alpha_range[1] - alpha_range[0]) * np.sqrt(t)
    lw = lw_range[0] + (lw_range[1] - lw_range[0]) * t
    return rgba, lw, t


def _node_palette(g: Connectome) -> tuple[np.ndarray, list[tuple[str, Any]]]:
    """RGBA per node and legend entries: by community when present (the colours every figure
    and the Gephi files give that community), else by layer kind."""
    if "community" in g.node_attrs:
        c = np.asarray(g.node_attrs["community"], dtype=np.float64)
        rgba = np.c_[community_rgb(c), np.ones(g.num_nodes)]
        return rgba, community_legend(c)
    rgb = node_colors(g) / 255.0
    rgba = np.c_[rgb, np.ones(g.num_nodes)]
    legend = []
    seen: set[str] = set()
    for li, l in enumerate(g.layers):
        if l.kind in seen or l.size == 0:
            continue
        seen.add(l.kind)
        i = int(np.flatnonzero(g.node_layer == li)[0])
        legend.append((f"{l.kind} layer", tuple(rgba[i])))
    return rgba, legend


def _default_title(g: Connectome, what: str) -> str:
    m = g.meta
    parts = [str(m["model"])] if m.get("model") else []
    if m.get("category") is not None:
        parts.append(f"category {m['category']}")
    if m.get("target") is not None and m.get("target") != m.get("category"):
        parts.append(f"target {m['target']}")
    return what + (": " + ", ".join(parts) if parts else "")


def _points_per_unit(ax: Any, span: float, axis: str) -> float:
    """Points per data unit along ``axis`` for a data range of ``span`` (before layout)."""
    fig = ax.get_figure()
    size = ax.bbox.height if axis == "y" else ax.bbox.width
    return size * 72.0 / fig.dpi / max(span, 1e-9)


def _layer_ticks(ax: Any, layers: Sequence[Any], xs: np.ndarray, show_size: bool = True) -> None:
    """Layer names under the columns, rotated when they would collide."""
    names = [l.name for l in layers]
    per_col = _points_per_unit(ax, float(ax.get_xlim()[1] - ax.get_xlim()[0]), "x")
    # never below 7.5 pt: reports show wide figures scaled down to the page
    fs = 9 if len(names) <= 12 else (8 if len(names) <= 30 else 7.5)
    longest = max((len(s) for s in names), default=0)
    rotate = longest * fs * 0.6 > per_col * 0.9
    # upright when even slanted neighbours would touch
    angle = 90 if rotate and per_col < 1.7 * fs else 35
    if show_size:
        labels = [f"{l.name} ({l.size})" if rotate else f"{l.name}\n({l.size})" for l in layers]
    else:
        labels = names
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=fs, rotation=angle if rotate else 0,
                       ha="right" if rotate else "center", rotation_mode="anchor" if rotate else "default")
    ax.tick_params(axis="x", length=0)


# ---------------------------------------------------------------------------- circuit
def plot_circuit(
    g: Connectome,
    *,
    ax: Any = None,
    title: str | None = None,
    max_edges: int | None = 300,
    label_units: bool = True,
    edge_scale: str = "layer",
) -> Any:
    """Draw a connectome as a layered circuit.

    Layers are columns (x = layer order, name and unit count under each column); units are
    dots whose area grows with ``|attribution|`` (node attribute; total ``|weight|`` when
    absent), coloured by the ``community`` node attribute when present (legend
    "community k"), else by layer kind. Edges are drawn under the dots, red when positive
    and blue when negative, wider and more opaque with ``|weight|`` (see ``edge_scale``);
    edges that skip layers are drawn as arcs. Units of labelled layers (the classes of the
    output layer, at the right) carry their labels; other units carry their index where it
    fits. Within a column, units are ordered by the barycenter of their drawn neighbours
    to reduce crossings.

    Parameters
    ----------
    g : Connectome
        Any layered graph; from 5 to a few hundred units reads best.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    title : str, optional
        Figure title; by default the model, category and target from ``g.meta``.
    max_edges : int or None, default 300
        Draw only the strongest ``max_edges`` edges by ``|weight|`` (the title says so;
        see ``edge_scale`` for how they are chosen); ``None`` draws all.
    label_units : bool, default True
        Write unit indices beside the dots of columns where they fit (about 9 points apart).
    edge_scale : {"layer", "global"}, default "layer"
        ``"layer"``: line width and opacity are relative to the strongest drawn edge into
        the same layer, and ``max_edges`` is shared evenly among layer pairs, so every
        connected pair of layers shows its strongest edges (weights of different layers
        are on different scales). ``"global"``: relative to the strongest edge of the
        graph, and the cut keeps the globally strongest edges.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        ``g`` is not a Connectome.
    ValueError
        ``max_edges`` is negative, or ``edge_scale`` is not ``"layer"`` or ``"global"``.

    Examples
    --------
    >>> from connectome import Connectome
    >>> g = Connectome.from_edges(
    ...     layers=[("input", "input", 2), ("logits", "output", 2, ["cat", "dog"])],
    ...     edges=[("input:0", "logits:0", 0.5), ("input:1", "logits:1", -1.0)])
    >>> fig = plot_circuit(g)
    """
    if not isinstance(g, Connectome):
        raise TypeError(f"plot_circuit expects a Connectome, got {type(g).__name__}")
    if max_edges is not None and max_edges < 0:
        raise ValueError(f"max_edges must be >= 0 or None, got {max_edges}")
    if edge_scale not in ("layer", "global"):
        raise ValueError(f"edge_scale must be 'layer' or 'global', got {edge_scale!r}")
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    n_layers = len(g.layers)
    sizes = np.array([l.size for l in g.layers])
    m_max = int(sizes.max()) if sizes.size else 0
    lab_len = max((len(s) for l in g.layers if l.labels for s in l.labels), default=0)
    # At most 14 inches wide: a report page shows it at about 1,300 px, so 8-point labels
    # stay about 10 px high.
    fig, ax = _axes(ax, (float(np.clip(3.0 + 1.5 * n_layers + 0.08 * lab_len, 7.0, 14.0)),
                         float(np.clip(3.8 + 0.012 * m_max, 4.5, 9.0))))
    title = title if title is not None else _default_title(g, "Circuit")
    if g.num_nodes == 0:
        _empty(ax, "empty graph: no units to draw")
        ax.set_title(title)
        return fig

    block = _block_ids(g) if edge_scale == "layer" else None
    keep = _strongest(g.weight, max_edges, block)
    capped = keep.size < g.num_edges
    # Widths compare an edge with the other inputs of its target layer: a lone skip edge
    # is not drawn as strong as the main path just because its layer pair has one edge.
    blk = g.node_layer[g.dst[keep]] if block is not None else None
    rel = _relative(np.nan_to_num(g.weight[keep].astype(np.float64)), blk)
    # Order by the drawn edges only: hidden edges would pull units away from what is seen
    # (on 600-unit random graphs this leaves 5-7x fewer visible crossings than using all edges).
    drawn = np.zeros(g.num_edges)
    drawn[keep] = rel
    x = g.node_layer.astype(np.float64)
    y = -_ordered_y(g, drawn)  # unit 0 at the top
    y_half = max(float(np.abs(y).max()), 0.06)
    y_lo, y_hi = -y_half - 0.09 * y_half - 0.04, y_half + 0.09 * y_half + 0.04

    # Leave room on the right for the labels of the last labelled column.
    last = g.layers[-1]
    label_pts = 0.0
    if last.labels is not None and 0 < last.size <= 40:
        label_pts = 10.0 + 0.6 * 8.5 * max(len(s) for s in last.labels)
    x_lo = -0.4
    base_span = (n_layers - 1 + 0.4) - x_lo
    ax.set_xlim(x_lo, n_layers - 1 + 0.4)
    width_pts = _points_per_unit(ax, 1.0, "x")
    frac = min(label_pts / max(width_pts, 1.0), 0.5)
    x_hi = x_lo + base_span / (1.0 - frac) if label_pts else n_layers - 1 + 0.4
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)

    # Dot diameters in points, from the tightest vertical spacing of any column.
    steps = _column_steps(sizes)
    tight = float(steps[sizes > 1].min()) if (sizes > 1).any() else 1.0
    pts_y = _points_per_unit(ax, y_hi - y_lo, "y")
    col_pts = width_pts / max(x_hi - x_lo, 1e-9)  # points between neighbouring columns
    spacing = min(tight * pts_y, 0.6 * col_pts)
    # Dense columns may overlap a little: a dot under 4 points is hard to see at all.
    d_max = float(np.clip(0.95 * spacing, 4.5, 22.0))
    d_min = max(2.0, 0.3 * d_max)
    t = node_sizes(g, lo=0.0, hi=1.0)
    diam = d_min + (d_max - d_min) * t
    size_by = "|attribution|" if "attribution" in g.node_attrs else "total |weight|"

    # Edges.
    s_, d_ = g.src[keep], g.dst[keep]
    w = g.weight[keep].astype(np.float64)
    w = np.where(np.isfinite(w), w, 0.0)
    span = g.node_layer[d_] - g.node_layer[s_]
    bulge = np.where(span > 1, 0.05 * (span - 1) * (y_hi - y_lo) / 2.0 + 0.02, 0.0)
    dense = keep.size > 120
    rgba, lw, _ = _edge_style(w, (0.2, 2.2) if dense else (0.4, 3.5), (0.08, 0.75) if dense else (0.2, 0.85), blk)
    if keep.size:
        segs = _edge_segments(x[s_], y[s_], x[d_], y[d_], bulge)
        # _edge_segments puts straight edges first; reorder the styles the same way.
        order = np.r_[np.flatnonzero(bulge == 0), np.flatnonzero(bulge != 0)]
        lc = LineCollection(segs, colors=rgba[order], linewidths=lw[order], zorder=1, capstyle="round")
        ax.add_collection(lc)

    # Nodes.
    colours, legend = _node_palette(g)
    few = g.num_nodes <= 150
    ax.scatter(x, y, s=diam**2, c=colours, zorder=3, edgecolors="0.15" if few else "none",
               linewidths=0.5 if few else 0.0)

    # Labels: class names for labelled layers, unit indices where they fit; a white halo
    # keeps them readable over the edges.
    from matplotlib.patheffects import withStroke

    halo = [withStroke(linewidth=2.2, foreground="white")]
    lab_fs = 9 if m_max <= 20 else 8
    n_text = 0
    for li, l in enumerate(g.layers):
        sl = g.layer_slice(l.name)
        if l.labels is not None and l.size <= 40:
            for j, text in zip(range(sl.start, sl.stop), l.labels):
                ax.annotate(text, (x[j], y[j]), xytext=(diam[j] / 2 + 4, 0), textcoords="offset points",
                            ha="left", va="center", fontsize=lab_fs, zorder=4,
                            fontweight="bold" if l.kind == "output" else "normal", path_effects=halo)
        elif (label_units and (l.size == 1 or steps[li] * pts_y >= 9.5) and n_text + l.size <= 400
              and col_pts >= 0.6 * 8 * len(str(int(g.node_units[sl].max()))) + d_max / 2 + 8):
            # (only where the label fits between this column and the one to its left)
            for j in range(sl.start, sl.stop):
                ax.annotate(str(g.node_units[j]), (x[j], y[j]), xytext=(-(diam[j] / 2 + 2), 0),
                            textcoords="offset points", ha="right", va="center", fontsize=8,
                            color="0.3", zorder=4, path_effects=halo)
            n_text += l.size

    _layer_ticks(ax, g.layers, np.arange(n_layers, dtype=np.float64))
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color("0.7")

    word = "flow" if str(g.meta.get("method", "")).startswith("attr") else "weight"
    handles = [Line2D([], [], ls="none", marker="o", ms=7, mfc=c, mec="0.15", mew=0.5, label=lbl) for lbl, c in legend]
    handles += [
        Line2D([], [], color=POSITIVE, lw=2, label=f"positive {word}"),
        Line2D([], [], color=NEGATIVE, lw=2, label=f"negative {word}"),
        Line2D([], [], color="0.55", lw=2, label=f"width ~ |{word}|" + (" per target layer" if block is not None else "")),
        Line2D([], [], ls="none", marker="o", ms=4, mfc="0.6", mec="none", label=f"dot area ~ {size_by}"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              ncol=1 if len(handles) <= 16 else 2, borderaxespad=0.0)
    sub = f"{g.num_nodes} units in {n_layers} layers, {g.num_edges} edges"
    if capped:
        per = " (shared among layer pairs)" if block is not None else ""
        sub = f"strongest {keep.size} of {g.num_edges} edges shown{per}; {g.num_nodes} units in {n_layers} layers"
    ax.set_title(f"{title}\n{sub}", fontsize=11)
    return fig


# ---------------------------------------------------------------------------- groups
def plot_groups(
    group_graph: Any,
    members: Mapping[str, Sequence[str]] | None = None,
    *,
    ax: Any = None,
    title: str | None = None,
    max_edges: int | None = 300,
) -> Any:
    """Draw the hierarchical circuit of neuron groups.

    One column per layer, one circle per group: area grows with the number of members
    (node attribute ``size``), fill colour is the group's summed ``attribution`` on a
    diverging scale (colourbar), and the circle is labelled with its member count. Arrows
    carry the summed flow between groups: red positive, blue negative, wider with
    ``|flow|``; arrows that skip layers bend.

    Parameters
    ----------
    group_graph : Connectome or GroupGraph
        The group graph (layers of kind ``"group"``, one unit per group), or the result of
        :func:`connectome.analysis.neuron_groups`, whose ``members`` are then used.
    members : dict of str -> list of str, optional
        Group node id -> member node ids; groups of at most three members list them.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.
    title : str, optional
        Figure title.
    max_edges : int or None, default 300
        Draw only the strongest ``max_edges`` arrows (the title says so).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        ``group_graph`` is neither a Connectome nor has a ``graph`` Connectome.

    Examples
    --------
    >>> from connectome import Connectome
    >>> gg = Connectome.from_edges(
    ...     layers=[("h1", "group", 2), ("logits", "group", 1)],
    ...     edges=[("h1:0", "logits:0", 2.0), ("h1:1", "logits:0", -0.5)],
    ...     node_attrs={"size": [5, 3, 1], "attribution": [2.0, -0.5, 1.5]})
    >>> fig = plot_groups(gg)
    """
    if not isinstance(group_graph, Connectome) and isinstance(getattr(group_graph, "graph", None), Connectome):
        if members is None:
            members = getattr(group_graph, "members", None)
        group_graph = group_graph.graph
    if not isinstance(group_graph, Connectome):
        raise TypeError(f"plot_groups expects a Connectome or a GroupGraph, got {type(group_graph).__name__}")
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    g = group_graph
    n_layers = len(g.layers)
    sizes = np.array([l.size for l in g.layers])
    m_max = int(sizes.max()) if sizes.size else 0
    fig, ax = _axes(ax, (float(np.clip(2.5 + 1.7 * n_layers, 6.0, 14.0)), float(np.clip(2.6 + 1.0 * m_max, 4.0, 9.0))))
    title = title if title is not None else _default_title(g, "Neuron groups")
    if g.num_nodes == 0:
        _empty(ax, "no groups to draw")
        ax.set_title(title)
        return fig

    ids = g.node_ids
    if "size" in g.node_attrs:
        count = np.asarray(g.node_attrs["size"], dtype=np.float64)
    elif members is not None:
        count = np.array([len(members.get(i, ())) for i in ids.tolist()], dtype=np.float64)
    else:
        count = np.ones(g.num_nodes)
    count = np.where(np.isfinite(count), count, 0.0)
    x = g.node_layer.astype(np.float64)
    # Groups sit one unit apart in every column; the barycenter order still applies.
    y_unit = _ordered_y(g) / _column_steps(sizes)[g.node_layer]
    y = -y_unit  # first groups at the top
    y_half = max(float(np.abs(y).max()), 0.5)
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(-y_half - 0.75, y_half + 0.75)

    per_y = _points_per_unit(ax, 2 * y_half + 1.5, "y")
    per_x = _points_per_unit(ax, n_layers, "x")
    d_cap = float(np.clip(min(0.8 * per_y, 0.45 * per_x), 14.0, 60.0))
    top = count.max() if count.size else 0.0
    diam = 0.35 * d_cap + 0.65 * d_cap * (np.sqrt(count / top) if top > 0 else np.zeros_like(count))

    has_attr = "attribution" in g.node_attrs
    cmap = matplotlib.colormaps["RdBu_r"]
    if has_attr:
        attr = np.asarray(g.node_attrs["attribution"], dtype=np.float64)
        attr = np.where(np.isfinite(attr), attr, 0.0)
        lim = float(np.abs(attr).max()) or 1.0
        norm = Normalize(-lim, lim)
        face = cmap(norm(attr))
    else:
        face = np.tile(np.array(matplotlib.colors.to_rgba("0.85")), (g.num_nodes, 1))

    keep = _strongest(g.weight, max_edges)
    w = g.weight[keep].astype(np.float64)
    w = np.where(np.isfinite(w), w, 0.0)
    rgba, lw, tw = _edge_style(w, (0.6, 7.0), (0.35, 0.85))
    for e, i in enumerate(keep.tolist()):
        s, d = int(g.src[i]), int(g.dst[i])
        skip = g.node_layer[d] - g.node_layer[s] > 1
        ax.add_patch(FancyArrowPatch(
            (x[s], y[s]), (x[d], y[d]), arrowstyle="-|>", mutation_scale=9 + 9 * tw[e],
            linewidth=lw[e], color=rgba[e], shrinkA=diam[s] / 2 + 1, shrinkB=diam[d] / 2 + 2,
            connectionstyle="arc3,rad=-0.25" if skip else "arc3,rad=0.0", zorder=1,
        ))

    ax.scatter(x, y, s=diam**2, c=face, edgecolors="0.2", linewidths=0.8, zorder=3)
    dark = np.array([0.299, 0.587, 0.114]) @ face[:, :3].T < 0.45
    id_list = ids.tolist()
    for i in range(g.num_nodes):
        ax.annotate(f"{count[i]:g}", (x[i], y[i]), ha="center", va="center", fontsize=8.5 if diam[i] >= 18 else 7.5,
                    color="white" if dark[i] else "black", zorder=4)
        caption = f"g{g.node_units[i]}"
        if members is not None:
            mem = list(members.get(id_list[i], ()))
            if 0 < len(mem) <= 3:
                caption += "\n" + ", ".join(m.rpartition(":")[2] for m in mem)
        ax.annotate(caption, (x[i], y[i]), xytext=(0, -(diam[i] / 2 + 2)), textcoords="offset points",
                    ha="center", va="top", fontsize=8, color="0.25", zorder=4)

    _layer_ticks(ax, g.layers, np.arange(n_layers, dtype=np.float64), show_size=False)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color("0.7")
    if has_attr:
        from matplotlib.cm import ScalarMappable

        sm = ScalarMappable(norm=norm, cmap=cmap)
        cb = fig.colorbar(sm, ax=ax, shrink=0.7, pad=0.02, fraction=0.04)
        cb.set_label("group attribution (sum)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    ax.legend(handles=[
        Line2D([], [], color=POSITIVE, lw=2.5, label="positive flow"),
        Line2D([], [], color=NEGATIVE, lw=2.5, label="negative flow"),
        Line2D([], [], ls="none", marker="o", ms=9, mfc="0.85", mec="0.2", label="circle: group (n members)"),
    ], loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8, frameon=False)
    sub = f"{g.num_nodes} groups in {n_layers} layers"
    if keep.size < g.num_edges:
        sub += f"; strongest {keep.size} of {g.num_edges} links shown"
    ax.set_title(f"{title}\n{sub}", fontsize=11)
    return fig
