"""Figures of the connectomics toolbox: lesion attacks, functional vs effective
connectivity, connectomes over training.

Each function returns a :class:`matplotlib.figure.Figure` and never calls ``show``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from connectome.viz._mpl import axes, category_colors, empty, grid, pyplot

__all__ = ["plot_attack", "plot_functional", "plot_trajectory"]


def plot_attack(curves: Mapping[str, Any] | Sequence[Any], *, what: str = "accuracy", title: str | None = None,
                ax: Any = None) -> Any:
    """The classic targeted-vs-random attack plot: accuracy (or target probability) against
    the fraction of units removed, one line per order, random orders as a min-max band
    around their mean.

    Parameters
    ----------
    curves : mapping of label -> LesionCurve, or a sequence of LesionCurve
        From :func:`connectome.analysis.lesion_curve` / :func:`~connectome.analysis.lesion_edges`;
        a sequence is labelled by each curve's order.
    what : {"accuracy", "prob"}, default "accuracy"
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if what not in ("accuracy", "prob"):
        raise ValueError(f"what must be 'accuracy' or 'prob', got {what!r}")
    items = list(curves.items()) if isinstance(curves, Mapping) else [(c.order, c) for c in curves]
    fig, ax = axes(ax, (5.5, 3.8))
    if not items:
        empty(ax, "no lesion curves")
        return fig
    colors = category_colors(len(items))
    for (label, c), col in zip(items, colors):
        v = c.accuracy if what == "accuracy" else c.prob
        mean = v.mean(0)
        auc = c.auc_accuracy if what == "accuracy" else c.auc_prob
        style = "--" if c.seeds else "-"
        ax.plot(c.x, mean, style, color=col, marker="o", ms=3, label=f"{label} (AUC {auc:.2f})")
        if v.shape[0] > 1:
            ax.fill_between(c.x, v.min(0), v.max(0), color=col, alpha=0.2, lw=0)
    unit = items[0][1].what
    ax.set_xlabel(f"fraction of {unit} removed")
    ax.set_ylabel("accuracy" if what == "accuracy" else "target class probability")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or f"targeted vs random attack ({unit})", fontsize=10)
    return fig


def _block(g: Any, a: str, b: str) -> np.ndarray:
    """Dense ``|layer a| x |layer b|`` matrix of a graph's edge weights (0 where no edge)."""
    la, lb = g.layer(a), g.layer(b)
    M = np.zeros((la.size, lb.size))
    s, d, w = g.edge_block(a, b)
    M[s, d] = w
    return M


def plot_functional(functional: Any, effective: Any = None, src_layer: str | None = None,
                    dst_layer: str | None = None, *, title: str | None = None) -> Any:
    """Functional connectivity of a layer pair next to its effective (attribution) or
    structural (weight) connectivity: two heatmaps over the same units.

    Parameters
    ----------
    functional : FunctionalConnectivity
        From :func:`connectome.analysis.functional_connectivity`; its full correlation matrix
        of the pair is drawn (before thresholding).
    effective : Connectome, optional
        A graph of the same model; its edge weights of the pair are drawn beside.
    src_layer, dst_layer : str, optional
        The layer pair; default the first tested pair of different layers.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    pairs = [k for k in functional.blocks if k[0] != k[1]]
    if src_layer is None or dst_layer is None:
        if not pairs:
            raise ValueError("the functional graph tested no pair of different layers; pass src_layer and dst_layer")
        from connectome.kinds import is_hidden

        kind = {l.name: l.kind for l in functional.graph.layers}
        hidden = [p for p in pairs if all(is_hidden(kind[n]) for n in p)]
        src_layer, dst_layer = (hidden or pairs)[0]  # a pair of hidden layers when there is one
    R = functional.matrix(src_layer, dst_layer)
    n = 2 if effective is not None else 1
    fig, axs = grid(n, 2, (4.2, 3.6))
    im = axs[0].imshow(R, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    axs[0].set_title(f"functional ({functional.method} r)", fontsize=9)
    fig.colorbar(im, ax=axs[0], shrink=0.8)
    if effective is not None:
        E = _block(effective, src_layer, dst_layer)
        lim = float(np.abs(E).max()) or 1.0
        im2 = axs[1].imshow(E, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        kind = effective.meta.get("kind") or effective.meta.get("method") or "effective"
        axs[1].set_title(f"{kind} (edge weight)", fontsize=9)
        fig.colorbar(im2, ax=axs[1], shrink=0.8)
    for a in axs:
        a.set_xlabel(f"{dst_layer} unit")
        a.set_ylabel(f"{src_layer} unit")
    fig.suptitle(title or f"{src_layer} -> {dst_layer}", fontsize=10)
    return fig


def plot_trajectory(traj: Any, *, what: str = "change", title: str | None = None) -> Any:
    """Layer x step heatmap of a connectome trajectory (:func:`connectome.analysis.trajectory`),
    with community stability (NMI) and circuit stability (Jaccard to the final circuit)
    below.

    Parameters
    ----------
    traj : Trajectory
    what : {"change"}, default "change"
        The heatmap: relative change of edge weights per layer between consecutive steps.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.0, 5.2), layout="constrained", height_ratios=[3, 2])
    M = np.asarray(traj.change, dtype=np.float64)  # (layers, steps)
    if M.size == 0:
        empty(a1, "one checkpoint: nothing changes")
    else:
        im = a1.imshow(M, aspect="auto", cmap="magma", interpolation="nearest")
        a1.set_yticks(range(len(traj.layers)))
        a1.set_yticklabels(traj.layers, fontsize=7)
        a1.set_xticks(range(M.shape[1]))
        a1.set_xticklabels([str(s) for s in traj.steps[1:]], fontsize=7)
        a1.set_xlabel("checkpoint")
        fig.colorbar(im, ax=a1, label="relative edge change")
    a1.set_title(title or "connectome over training", fontsize=10)
    steps = list(traj.steps)
    if len(steps) > 1:
        a2.plot(steps[1:], traj.nmi, marker="o", ms=3, label="community NMI (consecutive)")
    for (cat, jac), col in zip(traj.jaccard.items(), category_colors(max(len(traj.jaccard), 1))):
        a2.plot(steps, jac, marker=".", ms=3, color=col, alpha=0.8, label=f"circuit Jaccard to final: {cat}")
    a2.axhline(0.5, color="0.6", lw=0.8, ls=":")
    a2.set_ylim(-0.02, 1.02)
    a2.set_xlabel("checkpoint")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=6, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return fig
