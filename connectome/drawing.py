"""How a graph is drawn: a layered layout, colours by community or layer kind, sizes by weight."""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np

from connectome.kinds import info
from connectome.palette import community_rgb

if TYPE_CHECKING:
    from connectome.graph import Connectome

def layout(g: Connectome, x_spacing: float = 200.0, y_spacing: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions that draw the graph as a layered diagram: x by layer order, y spread within a layer.

    Returns
    -------
    x, y : ndarray, shape (n_nodes,)
    """
    x = g.node_layer.astype(np.float64) * x_spacing
    y = np.zeros(g.num_nodes)
    for l in g.layers:
        sl = g.layer_slice(l.name)
        y[sl] = (np.arange(l.size) - (l.size - 1) / 2.0) * y_spacing
    return x, y


def node_colors(g: Connectome) -> np.ndarray:
    """RGB colours (0-255), shape (n_nodes, 3): by community if present, else by layer kind."""
    if "community" in g.node_attrs:
        # the palette of every figure, so that a community has one colour in Gephi and in the report
        rgb = np.asarray(community_rgb(g.node_attrs["community"]), dtype=np.float64).reshape(-1, 3)
    else:
        # one colour per layer from the one table of kinds (connectome/kinds.py), repeated per unit
        per_layer = [colorsys.hsv_to_rgb(info(l.kind).hue, info(l.kind).saturation, 0.85) for l in g.layers]
        rgb = np.asarray(per_layer, dtype=np.float64).reshape(-1, 3)[g.node_layer]
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.int64).reshape(-1, 3)


def node_sizes(g: Connectome, lo: float = 4.0, hi: float = 30.0) -> np.ndarray:
    """Node sizes for drawing: by |attribution| if present, else by total |edge weight|."""
    if "attribution" in g.node_attrs:
        v = np.abs(np.asarray(g.node_attrs["attribution"], dtype=np.float64))
    else:
        a = np.abs(g.weight.astype(np.float64))
        v = np.bincount(g.src, weights=a, minlength=g.num_nodes) + np.bincount(g.dst, weights=a, minlength=g.num_nodes)
    v = np.where(np.isfinite(v), v, 0.0)
    top = v.max() if v.size else 0.0
    return lo + (hi - lo) * (np.sqrt(v / top) if top > 0 else np.zeros_like(v))
