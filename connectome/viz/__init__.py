"""Drawings of connectomes and an HTML report that holds them.

Every plot function returns a :class:`matplotlib.figure.Figure` and never calls ``show``;
functions that draw a single panel take ``ax=`` to draw into an existing Axes. Importing
this package does not import matplotlib: each function imports it when called, and picks
the headless ``Agg`` backend unless a backend was already chosen (see
:func:`connectome.viz._mpl.pyplot`).

>>> from connectome import viz                                   # doctest: +SKIP
>>> fig = viz.plot_circuit(g)                                    # doctest: +SKIP
>>> rep = viz.Report("cat circuit"); rep.add_figure(fig, "circuit", "circuit")  # doctest: +SKIP
>>> rep.write("out/")                                            # doctest: +SKIP
"""

from __future__ import annotations

from connectome.viz.charts import (
    plot_bars,
    plot_comparison,
    plot_curves,
    plot_fidelity,
    plot_hubs,
    plot_image_comparison,
    plot_matching,
    plot_similarity,
)
from connectome.viz.circuits import plot_circuit, plot_groups
from connectome.palette import community_rgb
from connectome.viz.report import Report
from connectome.viz.units import unit_cards
from connectome.viz.viewer import write_viewer

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
    "unit_cards",
    "write_viewer",
]
