"""Charts of analysis results: hubs, category similarity, image comparison, model matching,
deletion/insertion curves and plain bars.

Each function takes plain arrays and dicts (what the analysis functions return), draws one
figure and returns it; nothing is shown and nothing is written.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from connectome.graph import Connectome
from connectome.viz._mpl import axes as _axes
from connectome.viz._mpl import category_colors as _category_colors
from connectome.viz._mpl import empty as _empty
from connectome.viz._mpl import grid as _grid
from connectome.palette import community_legend, community_rgb

__all__ = [
    "plot_hubs",
    "plot_similarity",
    "plot_image_comparison",
    "plot_matching",
    "plot_curves",
    "plot_bars",
    "plot_fidelity",
    "plot_comparison",
]

ARROW = "\u2192"


def _finite(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def _pair_label(key: Any) -> str:
    """``("conv1", "layer1")`` -> ``"conv1→layer1"``; strings pass through."""
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return f"{key[0]}{ARROW}{key[1]}"
    return str(key)


def _tick_labels(ax: Any, labels: Sequence[str], axis: str = "x") -> None:
    """Category tick labels, rotated when long or many."""
    longest = max((len(s) for s in labels), default=0)
    rotate = axis == "x" and (longest * len(labels) > 60 or longest > 14)
    fs = 9 if len(labels) <= 12 else (7.5 if len(labels) <= 30 else 6)
    if axis == "x":
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, fontsize=fs, rotation=35 if rotate else 0, ha="right" if rotate else "center",
                           rotation_mode="anchor" if rotate else "default")
    else:
        ax.set_yticks(np.arange(len(labels)))
        ax.set_yticklabels(labels, fontsize=fs)


# ---------------------------------------------------------------------------- hubs
def plot_hubs(
    g: Connectome,
    scores: Any,
    k: int = 5,
    *,
    title: str | None = None,
    xlabel: str = "score",
    max_layers: int = 12,
) -> Any:
    """Bar charts of the top-``k`` units of each layer by a score (centrality, attribution ...).

    One small panel per layer, units on the y axis (largest at the top, labelled with the
    unit index or the unit's label), the score on the x axis with its value at the bar's
    end. Bars take the unit's community colour when ``g`` has a ``community`` attribute.

    Parameters
    ----------
    g : Connectome
    scores : array-like, shape (n_nodes,), or dict of node id -> float
        One score per node, aligned with ``g.node_ids``; NaN scores are skipped.
    k : int, default 5
        Units per layer.
    title : str, optional
        Figure title.
    xlabel : str, default "score"
        What the score is (``"betweenness"``, ``"|attribution|"`` ...).
    max_layers : int, default 12
        With more layers than this, only the layers with the largest top score are drawn
        (in layer order), and the title says so.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        ``scores`` does not have one value per node, or ``k`` < 1.

    Examples
    --------
    >>> from connectome import Connectome
    >>> g = Connectome.from_edges(layers=[("input", "input", 3), ("fc", "linear", 2)],
    ...                           edges=[("input:0", "fc:0", 1.0), ("input:2", "fc:1", -2.0)])
    >>> fig = plot_hubs(g, [1.0, 0.0, 2.0, 1.0, 2.0], k=2)
    """
    if isinstance(scores, str):  # a node attribute name, as top_nodes accepts
        scores = g.node_attr(scores)
    if not isinstance(g, Connectome):
        raise TypeError(f"plot_hubs expects a Connectome, got {type(g).__name__}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if isinstance(scores, Mapping):
        s = np.full(g.num_nodes, np.nan)
        index = {nid: i for i, nid in enumerate(g.node_ids.tolist())}
        for nid, v in scores.items():
            if nid in index:
                s[index[nid]] = float(v)
    else:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != g.num_nodes:
            raise ValueError(f"scores must have one value per node ({g.num_nodes}), got {s.shape[0]}")
    layers = [(li, l) for li, l in enumerate(g.layers) if l.size and np.isfinite(s[g.layer_slice(l.name)]).any()]
    dropped = 0
    if len(layers) > max_layers:
        best = np.array([np.nanmax(s[g.layer_slice(l.name)]) for _, l in layers])
        chosen = np.sort(np.argsort(-best, kind="stable")[:max_layers])
        dropped = len(layers) - len(chosen)
        layers = [layers[i] for i in chosen]
    rows_k = min(k, max((l.size for _, l in layers), default=1))
    community = g.node_attrs.get("community")
    picks = []
    for li, l in layers:
        sl = g.layer_slice(l.name)
        idx = np.arange(sl.start, sl.stop)
        idx = idx[np.isfinite(s[idx])]
        picks.append(idx[np.lexsort((g.node_units[idx], -s[idx]))][:k])
    if community is not None and picks:
        entries = community_legend(np.asarray(community, dtype=np.float64)[np.concatenate(picks)])
        legend_title = "bar colour: Leiden community (the same in every figure and in the Gephi files)"
    else:
        entries = [("score >= 0", "tab:blue"), ("score < 0", "tab:gray")]
        legend_title = None
    ncol = min(len(entries), 6)
    legend_h = 0.3 + 0.22 * -(-len(entries) // ncol) + (0.2 if legend_title else 0.0)
    fig, axes = _grid(len(layers), 4, (3.3, 0.55 + 0.32 * rows_k))
    fig.set_figheight(fig.get_figheight() + 0.5 + legend_h)  # room for the title and the legend
    title = title if title is not None else f"Top {k} units per layer by {xlabel}"
    if dropped:
        title += f"\n({len(layers)} layers with the largest scores shown, {dropped} more not shown)"
    fig.suptitle(title, fontsize=11)
    if not layers:
        _empty(axes[0], "no finite scores")
        return fig
    labels_all = g.node_labels
    for ax, (li, l), idx in zip(axes, layers, picks):
        v = s[idx]
        names = [labels_all[i] if l.labels is not None else f"unit {g.node_units[i]}" for i in idx]
        if community is not None:
            c = np.asarray(community, dtype=np.float64)[idx]
            colours = community_rgb(c)
        else:
            colours = ["tab:blue" if vi >= 0 else "tab:gray" for vi in v]
        ypos = rows_k - 1 - np.arange(len(v))  # best at the top, short layers top-aligned
        ax.barh(ypos, v, color=colours, height=0.7)
        ax.set_yticks(ypos)
        ax.set_yticklabels(names, fontsize=8.5)
        ax.set_title(f"{l.name} ({l.kind})", fontsize=9)
        ax.axvline(0, color="0.5", lw=0.6)
        for yy, vv in zip(ypos, v):
            ax.text(vv, yy, f" {vv:.3g} ", va="center", ha="left" if vv >= 0 else "right", fontsize=7.5)
        lo = min(0.0, float(v.min())) if v.size else 0.0
        hi = max(0.0, float(v.max())) if v.size else 0.0
        span = hi - lo
        if span > 0:
            ax.set_xlim(lo - (0.3 * span if lo < 0 else 0.0), hi + (0.3 * span if hi > 0 else 0.05 * span))
        else:
            ax.set_xlim(0.0, 1.0)  # all scores 0
        ax.set_ylim(-0.6, max(rows_k, 1) - 0.4)
        ax.tick_params(axis="x", labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes[-min(4, len(axes)):]:
        ax.set_xlabel(xlabel, fontsize=8)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=t) for t, c in entries], loc="outside lower center",
               ncol=ncol, fontsize=8, frameon=False, title=legend_title, title_fontsize=8)
    return fig


# ---------------------------------------------------------------------------- similarity
def plot_similarity(
    matrices: Any,
    classes: Sequence[str] | None = None,
    *,
    title: str | None = None,
    annotate: bool | None = None,
) -> Any:
    """Heatmaps of the correlation between categories, one per layer, on one colour scale.

    Parameters
    ----------
    matrices : dict of str -> ndarray, shape (n_classes, n_classes), or CategoryCorrelation
        Correlation matrix per layer (values in [-1, 1]; NaN cells are drawn grey).
    classes : sequence of str, optional
        Category names, the row/column order; taken from a ``CategoryCorrelation`` when
        omitted, else numbered.
    title : str, optional
        Figure title.
    annotate : bool, optional
        Write the value in each cell; by default when there are at most 8 classes.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        A matrix is not square or does not match ``classes``.

    Examples
    --------
    >>> import numpy as np
    >>> fig = plot_similarity({"h1": np.eye(2), "h2": np.array([[1, .5], [.5, 1]])}, ["cat", "dog"])
    """
    import matplotlib

    if hasattr(matrices, "matrices") and hasattr(matrices, "classes"):
        classes = list(matrices.classes) if classes is None else classes
        matrices = matrices.matrices
    mats: dict[str, np.ndarray] = {}
    for name, m in dict(matrices).items():
        if isinstance(m, tuple) and len(m) == 2:  # (classes, matrix), as CategoryCorrelation yields
            classes = list(m[0]) if classes is None else classes
            m = m[1]
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrix of layer {name!r} must be square, got shape {m.shape}")
        mats[str(name)] = m
    n_cls = next(iter(mats.values())).shape[0] if mats else len(classes or ())
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(n_cls)]
    for name, m in mats.items():
        if m.shape[0] != len(classes):
            raise ValueError(f"matrix of layer {name!r} is {m.shape[0]}x{m.shape[0]} for {len(classes)} classes")
    panel = float(np.clip(1.2 + 0.28 * len(classes), 2.6, 6.0))
    fig, axes = _grid(len(mats), 4, (panel + 0.2, panel))
    fig.suptitle(title if title is not None else "Correlation between categories, per layer", fontsize=11)
    if not mats:
        _empty(axes[0], "no matrices")
        return fig
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    annotate = len(classes) <= 8 if annotate is None else annotate
    im = None
    for ax, (name, m) in zip(axes, mats.items()):
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        if len(classes) <= 40:
            _tick_labels(ax, classes, "x")
            _tick_labels(ax, classes, "y")
            ax.tick_params(axis="x", labelrotation=90 if len(classes) > 4 else 0, labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if annotate:
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 else "black")
    cb = fig.colorbar(im, ax=axes, shrink=0.8, fraction=0.05)
    cb.set_label("correlation", fontsize=9)
    return fig


# ---------------------------------------------------------------------------- images
def _display_image(img: Any) -> np.ndarray:
    """(3,H,W), (1,H,W), (H,W,3) or (H,W) -> (H,W,3) or (H,W) floats in [0, 1] for imshow."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] in (1, 3) and a.shape[0] < a.shape[-1]:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"an image must be (3,H,W), (H,W,3) or (H,W), got shape {np.shape(img)}")
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return a
    if lo >= 0.0 and hi <= 255.0 and hi > 1.0:
        return a / 255.0
    # Normalised tensors (mean/std) have no fixed range: stretch to [0, 1].
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _upsample(m: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bilinear resize of a (h, w) map to (H, W), pixel centres aligned (as in ``F.interpolate``)."""
    h, w = m.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, pos - i0

    y0, y1, wy = axis(H, h)
    x0, x1, wx = axis(W, w)
    top = m[y0][:, x0] * (1 - wx) + m[y0][:, x1] * wx
    bottom = m[y1][:, x0] * (1 - wx) + m[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def _heat_rgba(m: np.ndarray, lo: float, hi: float, cmap: Any) -> np.ndarray:
    """Colour a map, opacity growing with the value: quiet regions leave the image visible."""
    t = np.clip((np.where(np.isfinite(m), m, lo) - lo) / (hi - lo), 0.0, 1.0)
    rgba = cmap(t)
    rgba[..., 3] = 0.75 * np.sqrt(t)
    return rgba


def plot_image_comparison(
    image_a: Any,
    image_b: Any,
    diffs: Mapping[str, Sequence[tuple[Any, float, float]]],
    maps: Mapping[str, Any] | None = None,
    *,
    names: tuple[str, str] = ("image A", "image B"),
    title: str | None = None,
) -> Any:
    """Compare how two images drive a network: the units that differ most, per layer.

    The top of the figure shows the two images; when ``maps`` is given, one row per layer
    shows each image with the chosen unit's spatial activation laid over it (upsampled to
    the image size with bilinear interpolation, one colour scale for both images, more
    opaque where the activation is higher, Grad-CAM style). Below, one grouped bar chart per layer compares the activation of each top
    unit on image A and on image B.

    Parameters
    ----------
    image_a, image_b : array-like, shape (3, H, W), (H, W, 3) or (H, W)
        The images; any value range (they are rescaled for display only).
    diffs : dict of str -> list of (unit_id, float, float)
        Per layer, the top units as ``(unit, activation on A, activation on B)``.
    maps : dict of str -> ndarray of shape (2, h, w), or (unit_id, ndarray), optional
        Per layer, the spatial activation of one unit on A (``[0]``) and on B (``[1]``).
    names : (str, str), default ("image A", "image B")
        Names of the two images in titles and legends.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        An image or a map has an unusable shape.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.zeros((3, 8, 8)), np.ones((3, 8, 8))
    >>> fig = plot_image_comparison(a, b, {"conv1": [(3, 1.0, 0.2), (5, 0.1, 0.9)]},
    ...                             {"conv1": np.random.rand(2, 4, 4)})
    """
    import matplotlib

    img = [_display_image(image_a), _display_image(image_b)]
    names = (str(names[0]), str(names[1]))
    overlay: list[tuple[str, Any, np.ndarray]] = []
    for layer, m in dict(maps or {}).items():
        unit = None
        if isinstance(m, tuple) and len(m) == 2 and np.ndim(m[1]) == 3:
            unit, m = m
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 3 or m.shape[0] != 2:
            raise ValueError(f"maps[{layer!r}] must have shape (2, h, w), got {m.shape}")
        overlay.append((str(layer), unit, m))
    diffs = {str(k): list(v) for k, v in dict(diffs).items()}

    n_bar = len(diffs)
    bar_cols = min(max(n_bar, 1), 3)
    bar_rows = -(-n_bar // bar_cols) if n_bar else 0
    width = max(7.0, 3.4 * bar_cols)
    img_h = 2.6 * (1 + len(overlay))
    bar_h = 2.7 * bar_rows
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from connectome.viz._mpl import pyplot as _plt

    fig = _plt().figure(figsize=(width, img_h + bar_h + 0.6), layout="constrained")
    fig.suptitle(title if title is not None else f"{names[0]} vs {names[1]}", fontsize=11)
    if bar_rows:
        top, bottom = fig.subfigures(2, 1, height_ratios=[img_h, bar_h])
    else:
        top, bottom = fig, None

    # Row 0: the images as they are; one row per map: the image in grey under the unit's
    # activation, so the heat colours are not confused with the image's own colours. A
    # narrow third column holds each row's colour bar and keeps the columns aligned.
    grid = top.subplots(1 + len(overlay), 3, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 0.05]})
    grey = [im if im.ndim == 2 else im @ np.array([0.299, 0.587, 0.114]) for im in img]
    for j in range(2):
        ax = grid[0, j]
        ax.imshow(img[j], cmap="gray" if img[j].ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(names[j], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    grid[0, 2].set_visible(False)
    cmap = matplotlib.colormaps["turbo"]
    for row, (layer, unit, m) in zip(grid[1:], overlay):
        finite = m[np.isfinite(m)]
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        hi = hi if hi > lo else lo + 1.0
        what = f"{layer} unit {unit}" if unit is not None else layer
        for j in range(2):
            ax = row[j]
            H, W = img[j].shape[:2]
            ax.imshow(grey[j], cmap="gray", vmin=0, vmax=1)
            ax.imshow(_heat_rgba(_upsample(m[j], H, W), lo, hi, cmap), interpolation="nearest")
            ax.set_title(f"{names[j]}: {what}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        cb = top.colorbar(ScalarMappable(Normalize(lo, hi), cmap), cax=row[2])
        cb.set_label("activation", fontsize=8)
        cb.ax.tick_params(labelsize=7)

    if bottom is not None:
        bax = bottom.subplots(bar_rows, bar_cols, squeeze=False).ravel()
        for ax in bax[n_bar:]:
            ax.set_visible(False)
        for ax, (layer, rows) in zip(bax, diffs.items()):
            if not rows:
                _empty(ax, f"{layer}: no units")
                continue
            units = [str(r[0]).rpartition(":")[2] if isinstance(r[0], str) else str(r[0]) for r in rows]
            va = np.array([float(r[1]) for r in rows])
            vb = np.array([float(r[2]) for r in rows])
            xs = np.arange(len(rows))
            ax.bar(xs - 0.2, va, width=0.4, color="tab:orange", label=names[0])
            ax.bar(xs + 0.2, vb, width=0.4, color="tab:purple", label=names[1])
            ax.axhline(0, color="0.5", lw=0.6)
            _tick_labels(ax, units, "x")
            ax.tick_params(axis="x", labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlabel("unit", fontsize=8)
            ax.set_ylabel("activation", fontsize=8)
            ax.set_title(layer, fontsize=9)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        bax[0].legend(fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------- matching
def _overlap_value(v: Any) -> tuple[float, float | None, float | None]:
    """``x`` or ``(observed, chance_mean[, chance_std])`` -> (observed, chance, chance_std)."""
    if isinstance(v, Mapping):
        return float(v.get("observed", np.nan)), v.get("chance_mean", v.get("chance")), v.get("chance_std")
    if isinstance(v, (tuple, list, np.ndarray)) and len(v) >= 2:
        std = float(v[2]) if len(v) >= 3 and v[2] is not None else None
        return float(v[0]), float(v[1]) if v[1] is not None else None, std
    return float(v), None, None


def plot_matching(
    correlations: Mapping[Any, Any],
    overlaps: Mapping[Any, Any] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """How well the units of two models match, layer pair by layer pair.

    Left (or only) panel: per layer pair (``"a_layer→b_layer"``), a box plot of the
    correlations of the matched units, each unit pair a dot, the mean a black bar. Right
    panel, when ``overlaps`` is given: per layer, the observed overlap of the two circuits
    as a bar and, when given, the overlap expected by chance as a black tick (with its
    standard deviation as an error bar).

    Parameters
    ----------
    correlations : dict of (str or (str, str)) -> array-like
        Per layer pair, the correlation of each matched unit pair.
    overlaps : dict of str -> float or (observed, chance_mean[, chance_std]), optional
        Circuit overlap per layer pair or layer.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> fig = plot_matching({("conv1", "conv1"): np.random.rand(16)}, {"conv1": (0.4, 0.1)})
    """
    from matplotlib.lines import Line2D

    from connectome.viz._mpl import pyplot as _plt

    labels = [_pair_label(k) for k in correlations]
    data = [_finite(v) for v in correlations.values()]
    n_panels = 2 if overlaps else 1
    n_pairs = max(len(labels), len(overlaps or {}))
    width = float(np.clip(2.5 + 0.75 * n_pairs, 5.0, 12.0)) * (1.0 if n_panels == 1 else 1.7)
    fig, axes = _plt().subplots(1, n_panels, figsize=(width, 4.3), layout="constrained", squeeze=False)
    axes = axes[0]
    fig.suptitle(title if title is not None else "Matched units of two models", fontsize=11)

    ax = axes[0]
    if labels:
        xs = np.arange(len(labels))
        nonempty = [i for i, d in enumerate(data) if d.size]
        if nonempty:
            ax.boxplot([data[i] for i in nonempty], positions=xs[nonempty], widths=0.55, showfliers=False,
                       patch_artist=True, boxprops=dict(facecolor="tab:blue", alpha=0.25, edgecolor="tab:blue"),
                       medianprops=dict(color="tab:blue", lw=1.5), whiskerprops=dict(color="tab:blue"),
                       capprops=dict(color="tab:blue"))
        rng = np.random.default_rng(0)  # jitter only; fixed so figures are reproducible
        for i, d in enumerate(data):
            if d.size:
                ax.scatter(i + rng.uniform(-0.18, 0.18, d.size), d, s=9, color="tab:blue", alpha=0.55,
                           linewidths=0, zorder=3)
                # the mean as a black bar across the box: no dot-like marker to mistake for a unit
                ax.plot([i - 0.3, i + 0.3], [d.mean()] * 2, color="black", lw=2.2, zorder=4, solid_capstyle="butt")
        _tick_labels(ax, [f"{l}\n(n={d.size})" for l, d in zip(labels, data)], "x")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        allv = np.concatenate([d for d in data if d.size]) if any(d.size for d in data) else np.zeros(1)
        ax.set_ylim(min(-0.05, float(allv.min()) - 0.05), 1.05)
        ax.axhline(0, color="0.6", lw=0.7, ls="--")
        ax.legend(handles=[
            Line2D([], [], ls="none", marker="o", ms=4, mfc="tab:blue", mec="none", alpha=0.55, label="one matched unit pair"),
            Line2D([], [], color="black", lw=2.2, label="mean"),
            Line2D([], [], color="tab:blue", lw=1.5, label="median (box: quartiles)"),
        ], fontsize=8, frameon=False, loc="lower right")
    else:
        _empty(ax, "no matched units")
    ax.set_ylabel("correlation of matched units", fontsize=9)
    ax.set_title("unit matching", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    if overlaps:
        ax = axes[1]
        keys = [_pair_label(k) for k in overlaps]
        vals = [_overlap_value(v) for v in overlaps.values()]
        obs = np.array([v[0] for v in vals])
        xs = np.arange(len(keys))
        ax.bar(xs, obs, width=0.6, color="tab:green", alpha=0.8, label="observed")
        has_chance = [i for i, v in enumerate(vals) if v[1] is not None]
        if has_chance:
            ch = np.array([float(vals[i][1]) for i in has_chance])
            err = np.array([vals[i][2] if vals[i][2] is not None else 0.0 for i in has_chance])
            ax.errorbar(np.array(has_chance), ch, yerr=err if err.any() else None, fmt="_", color="black",
                        markersize=22, mew=2, capsize=4, elinewidth=1, label="chance", zorder=3)
        for x_, v in zip(xs, obs):
            if np.isfinite(v):
                ax.text(x_, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        _tick_labels(ax, keys, "x")
        top_v = np.nanmax(np.r_[obs, [float(v[1]) for v in vals if v[1] is not None], 0.0])
        ax.set_ylim(0, max(1.0, float(top_v) * 1.15) if top_v > 0.5 else max(float(top_v) * 1.3, 0.1))
        ax.set_ylabel("circuit overlap", fontsize=9)
        ax.set_title("circuit overlap vs chance", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig


# ---------------------------------------------------------------------------- curves
def _auc(x: np.ndarray, y: np.ndarray) -> float:
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    ok = np.isfinite(x) & np.isfinite(y)
    return float(trapezoid(y[ok], x[ok])) if ok.sum() >= 2 else float("nan")


def plot_curves(
    curves: Mapping[str, Any],
    *,
    title: str | None = None,
    xlabel: str = "fraction of units removed / inserted",
    ylabel: str = "target score",
    ax: Any = None,
) -> Any:
    """Deletion / insertion curves with their area under the curve in the legend.

    Parameters
    ----------
    curves : dict of str -> (x, y) or (x, y, y_std)
        Per curve, x values (e.g. fraction of units deleted) and scores; a third array
        draws a ±std band.
    title : str, optional
        Figure title.
    xlabel, ylabel : str
        Axis labels.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        x and y of a curve differ in length.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.linspace(0, 1, 11)
    >>> fig = plot_curves({"deletion": (x, 1 - x), "insertion": (x, x ** 0.5)})
    """
    fig, ax = _axes(ax, (6.4, 4.2))
    colours = _category_colors(max(len(curves), 1))
    for (name, c), col in zip(curves.items(), colours):
        x = np.asarray(c[0], dtype=np.float64).reshape(-1)
        y = np.asarray(c[1], dtype=np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"curve {name!r}: x has {x.size} values, y has {y.size}")
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        ax.plot(x, y, color=col, lw=1.8, marker="o" if x.size <= 25 else None, ms=3.5,
                label=f"{name} (AUC={_auc(x, y):.3f})")
        if len(c) >= 3 and c[2] is not None:
            sd = np.asarray(c[2], dtype=np.float64).reshape(-1)[order]
            ax.fill_between(x, y - sd, y + sd, color=col, alpha=0.18, linewidth=0)
    if not curves:
        _empty(ax, "no curves")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if curves:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title if title is not None else "Deletion / insertion curves", fontsize=11)
    return fig


# ---------------------------------------------------------------------------- bars
def plot_bars(
    values: Mapping[Any, Any],
    *,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    ax: Any = None,
) -> Any:
    """A labelled bar chart of a dict: one bar per key, ``(mean, std)`` values get error bars.

    Parameters
    ----------
    values : dict of str -> float or (mean, std)
        E.g. circuit size per category, or fidelity per category as (mean, std).
    title : str, optional
        Figure title.
    xlabel, ylabel : str, optional
        Axis labels.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is made when omitted.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_bars({"cat": 12, "dog": 9}, title="circuit size", xlabel="category")
    """
    keys = [str(k) for k in values]
    mean = np.zeros(len(keys))
    err = np.zeros(len(keys))
    for i, v in enumerate(values.values()):
        if isinstance(v, (tuple, list, np.ndarray)) and np.size(v) >= 2:
            mean[i], err[i] = float(v[0]), float(v[1]) if v[1] is not None else 0.0
        else:
            mean[i] = float(v)
    fig, ax = _axes(ax, (float(np.clip(2.5 + 0.55 * len(keys), 4.5, 12.0)), 4.0))
    if keys:
        xs = np.arange(len(keys))
        has_err = bool(np.any(np.nan_to_num(err) > 0))
        bars = ax.bar(xs, mean, width=0.65, color="tab:blue", alpha=0.85,
                      yerr=np.nan_to_num(err) if has_err else None, capsize=3 if has_err else 0,
                      error_kw=dict(lw=1, ecolor="0.2"))
        if len(keys) <= 25:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax.bar_label(bars, labels=[f"{m:.3g}" for m in mean], fontsize=7,
                             padding=2 if not has_err else 4)
        _tick_labels(ax, keys, "x")
        ax.axhline(0, color="0.5", lw=0.6)
        ax.margins(y=0.12)
    else:
        _empty(ax, "no values")
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title if title is not None else "", fontsize=11)
    return fig


# ---------------------------------------------------------------------------- fidelity
def _fidelity_value(v: Any) -> tuple[float, float, float, np.ndarray]:
    """A FidelityResult, a dict or ``(circuit, random_mean[, random_std])`` -> the four."""
    if hasattr(v, "circuit_drop"):
        drops = np.asarray(getattr(v, "random_drops", ()), dtype=np.float64).reshape(-1)
        return float(v.circuit_drop), float(v.random_mean), float(v.random_std), drops
    if isinstance(v, Mapping):
        return (float(v["circuit_drop"]), float(v.get("random_mean", np.nan)), float(v.get("random_std", np.nan)),
                np.asarray(v.get("random_drops", ()), dtype=np.float64).reshape(-1))
    v = list(v)
    return float(v[0]), float(v[1]), float(v[2]) if len(v) > 2 and v[2] is not None else float("nan"), np.zeros(0)


def plot_fidelity(results: Mapping[str, Any], *, title: str | None = None, ylabel: str = "drop in class probability",
                  ax: Any = None) -> Any:
    """Circuit ablation against its baseline: random unit sets of the same size, per category.

    Two bars per category: the drop when the circuit's units are silenced, and the mean
    drop over random sets of as many units per layer (error bar: one standard deviation;
    dots: each random set, when known). A circuit that matters stands well above its
    random bar.

    Parameters
    ----------
    results : dict of str -> FidelityResult, dict or (circuit_drop, random_mean[, random_std])
        Per category, what :func:`connectome.analysis.fidelity` returned (or its numbers).
    title : str, optional
    ylabel : str, default "drop in class probability"
    ax : matplotlib.axes.Axes, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_fidelity({"cat": (0.9, 0.3, 0.1), "dog": (0.8, 0.4, 0.05)})
    """
    keys = [str(k) for k in results]
    vals = [_fidelity_value(v) for v in results.values()]
    fig, ax = _axes(ax, (float(np.clip(2.5 + 0.9 * len(keys), 5.0, 13.0)), 4.2))
    if not keys:
        _empty(ax, "no results")
        return fig
    xs = np.arange(len(keys))
    circ = np.array([v[0] for v in vals])
    rmean = np.array([v[1] for v in vals])
    rstd = np.nan_to_num(np.array([v[2] for v in vals]))
    ax.bar(xs - 0.2, circ, width=0.4, color="tab:red", alpha=0.85, label="circuit ablated")
    ax.bar(xs + 0.2, rmean, width=0.4, color="0.6", yerr=rstd if rstd.any() else None, capsize=3,
           error_kw=dict(lw=1, ecolor="0.2"), label="random units, as many per layer: mean ± std (dots: each draw)")
    rng = np.random.default_rng(0)  # jitter only
    for x_, v in zip(xs, vals):
        d = v[3][np.isfinite(v[3])]
        if d.size:
            ax.scatter(x_ + 0.2 + rng.uniform(-0.12, 0.12, d.size), d, s=7, color="0.25", alpha=0.5, zorder=3,
                       linewidths=0)
    for x_, c in zip(xs, circ):
        ax.text(x_ - 0.2, c, f"{c:.2f}", ha="center", va="bottom" if c >= 0 else "top", fontsize=7.5)
    _tick_labels(ax, keys, "x")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.margins(y=0.12)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16 if len(keys) <= 8 else -0.3),
              ncol=1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title if title is not None else "Ablating the circuit vs random units of the same size", fontsize=11)
    return fig


# ---------------------------------------------------------------------------- comparison
_SIMILARITIES = (("jaccard", "top-unit Jaccard"), ("weighted_overlap", "weighted overlap"),
                 ("spearman", "rank correlation"), ("circuit_jaccard", "circuit Jaccard"), ("nmi", "community NMI"))


def _layer_axis(ax: Any, names: Sequence[str]) -> None:
    """Layer names under a per-layer axis; every n-th one when there are many."""
    step = max(1, -(-len(names) // 36))
    xs = np.arange(len(names))
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([names[i] for i in xs[::step]], fontsize=8 if len(names) <= 24 else 7.5, rotation=90)
    ax.set_xlim(-0.6, len(names) - 0.4)


def plot_comparison(cmp: Any, analogous: Any = None, *, title: str | None = None) -> Any:
    """Two graphs of one model compared layer by layer: how similar, which units are shared.

    Top: per layer, the similarities of :func:`connectome.analysis.compare` (top-unit
    Jaccard, weighted overlap and rank correlation of unit importance, circuit Jaccard,
    community NMI). Middle: per layer, the important units both graphs share (the *same*
    units) and those only one has. Bottom, when ``analogous`` holds a placement: per layer
    of the placed circuit, how many of its units map onto the same unit in the other graph
    and how many onto another one (an *analogous* unit).

    Parameters
    ----------
    cmp : Comparison
        What :func:`connectome.analysis.compare` returned.
    analogous : MatchList or Match, optional
        :func:`connectome.analysis.find_analogous` results; the best placement is drawn.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    rows = list(cmp.per_layer)
    names = [r.layer for r in rows]
    best = analogous[0] if isinstance(analogous, list) and len(analogous) else (
        analogous if hasattr(analogous, "mapping") else None)
    n_panels = 3 if best is not None else 2
    width = float(np.clip(4.0 + 0.17 * len(names), 8.0, 14.0))
    from connectome.viz._mpl import pyplot as _plt

    fig, axes = _plt().subplots(n_panels, 1, figsize=(width, 3.1 * n_panels + 0.8), layout="constrained", squeeze=False)
    axes = axes[:, 0]
    fig.suptitle(title if title is not None else f"{cmp.a} vs {cmp.b}", fontsize=11)
    xs = np.arange(len(names))
    ax = axes[0]
    colours = _category_colors(len(_SIMILARITIES))
    for (key, label), col in zip(_SIMILARITIES, colours):
        v = np.array([np.nan if getattr(r, key) is None else float(getattr(r, key)) for r in rows])
        if np.isfinite(v).any():
            mean = np.nanmean(v)
            ax.plot(xs, v, color=col, lw=1.5, marker="o" if len(xs) <= 30 else None, ms=3.5,
                    label=f"{label} (mean {mean:.2f})")
    ax.set_ylim(-1.05 if any((r.spearman or 0) < 0 for r in rows) else -0.02, 1.05)
    ax.set_ylabel("similarity", fontsize=9)
    ax.set_title(f"How alike the two graphs are, per layer (importance: {cmp.importance})", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _layer_axis(ax, names)

    ax = axes[1]
    shared = np.array([len(r.shared) for r in rows])
    only_a = np.array([len(r.only_a) for r in rows])
    only_b = np.array([len(r.only_b) for r in rows])
    ax.bar(xs, shared, color="tab:purple", label="in both (the same units)")
    ax.bar(xs, only_a, bottom=shared, color="tab:orange", label=f"only {cmp.a}")
    ax.bar(xs, only_b, bottom=shared + only_a, color="tab:cyan", label=f"only {cmp.b}")
    top_n = rows[0].top if rows else 0
    ax.set_ylabel("units", fontsize=9)
    ax.set_title(f"The {top_n} most important units of each layer: shared or not", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _layer_axis(ax, names)

    if best is not None:
        ax = axes[2]
        same = {n: 0 for n in names}
        other = {n: 0 for n in names}
        for k, v in best.mapping.items():
            layer = k.rpartition(":")[0]
            if layer in same:
                (same if k == v else other)[layer] += 1
        s_ = np.array([same[n] for n in names])
        o_ = np.array([other[n] for n in names])
        ax.bar(xs, s_, color="tab:purple", label="placed on the same unit")
        ax.bar(xs, o_, bottom=s_, color="tab:green", label="placed on another unit (analogous)")
        ax.set_ylabel("circuit units", fontsize=9)
        score = getattr(best, "score", float("nan"))
        ax.set_title(f"Best placement of {cmp.a}'s circuit skeleton in {cmp.b}'s graph (weight agreement "
                     f"{score:.2f})", fontsize=10)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _layer_axis(ax, names)
    for a in axes:
        a.tick_params(axis="y", labelsize=8)
        for side in ("top", "right"):
            a.spines[side].set_visible(False)
    return fig
