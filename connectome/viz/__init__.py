"""Drawings of connectomes and an HTML report that holds them.

Every plot function returns a :class:`matplotlib.figure.Figure` and never calls ``show``;
functions that draw a single panel take ``ax=`` to draw into an existing Axes. Importing
this package does not import matplotlib: each function imports it when called, and picks
the headless ``Agg`` backend unless a backend was already chosen (see :func:`_plt`).

>>> from connectome import viz                                   # doctest: +SKIP
>>> fig = viz.plot_circuit(g)                                    # doctest: +SKIP
>>> rep = viz.Report("cat circuit"); rep.add_figure(fig, "circuit", "circuit")  # doctest: +SKIP
>>> rep.write("out/")                                            # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = [
    "plot_circuit",
    "plot_groups",
    "plot_hubs",
    "plot_similarity",
    "plot_image_comparison",
    "plot_matching",
    "plot_curves",
    "plot_bars",
    "plot_fidelity",
    "plot_comparison",
    "community_rgb",
    "Report",
]


def _plt() -> Any:
    """Import and return ``matplotlib.pyplot``, headless unless a backend was chosen.

    ``Agg`` is selected only when pyplot has not been imported yet, no backend was named
    (``MPLBACKEND``, ``matplotlib.use``, matplotlibrc) and there is no display, so a notebook's
    inline backend or a user's ``matplotlib.use("QtAgg")`` is never overridden, and a CLI run
    on a server never tries to open a window.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        chosen = matplotlib.rcParams._get_backend_or_none() if hasattr(matplotlib.rcParams, "_get_backend_or_none") else None
        headless = sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        )
        if chosen is None and headless:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _root_figure(ax: Any) -> Any:
    """The top-level Figure of ``ax`` (not a SubFigure)."""
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10 has no ``root``
        fig = ax.figure
        while getattr(fig, "figure", fig) is not fig:
            fig = fig.figure
        return fig


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``(figure, ax)``: the caller's Axes, or a new constrained-layout figure with one Axes."""
    if ax is not None:
        return _root_figure(ax), ax
    fig, ax = _plt().subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _grid(n: int, max_cols: int, panel: tuple[float, float], **kw: Any) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels in a grid of at most ``max_cols`` columns; spare panels hidden."""
    import numpy as np

    n = max(int(n), 1)
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = _plt().subplots(
        rows, cols, figsize=(panel[0] * cols, panel[1] * rows), layout="constrained", squeeze=False, **kw
    )
    flat = list(np.asarray(axes).ravel())
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _category_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, then a hue wheel."""
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["hsv"]
    return [cmap(i / n) for i in range(n)]


def _empty(ax: Any, message: str) -> None:
    """Say in the panel that there is nothing to draw."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# Defined after the helpers: the submodules import it from here.
from connectome.viz.charts import (  # noqa: E402
    plot_bars,
    plot_comparison,
    plot_curves,
    plot_fidelity,
    plot_hubs,
    plot_image_comparison,
    plot_matching,
    plot_similarity,
)
from connectome.viz.circuits import plot_circuit, plot_groups  # noqa: E402
from connectome.viz.palette import community_rgb  # noqa: E402
from connectome.viz.report import Report  # noqa: E402
