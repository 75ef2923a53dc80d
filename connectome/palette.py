"""One colour per community, the same in every figure and in the Gephi files.

Community labels are renumbered so that 0 is the largest (see
:func:`connectome.analysis.communities`), so the ``len(COMMUNITY_COLOURS)`` largest
communities of a graph each get their own colour and every smaller one the same grey,
whichever figure or file shows them. Plain hex values, no matplotlib: the GraphML/GEXF
writers use this too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["COMMUNITY_COLOURS", "OTHER_COMMUNITY", "NO_COMMUNITY", "community_rgb", "community_label", "community_legend"]

#: matplotlib's tab10 and the light half of tab20, without their greys (kept for "other").
COMMUNITY_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)
#: Communities beyond the palette (the smaller ones).
OTHER_COMMUNITY = "#8c8c8c"
#: Units without a community (NaN or negative label).
NO_COMMUNITY = "#d4d4d4"


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


_TABLE = np.array([_rgb(c) for c in COMMUNITY_COLOURS] + [_rgb(OTHER_COMMUNITY), _rgb(NO_COMMUNITY)])


def community_rgb(labels: Any) -> np.ndarray:
    """RGB in [0, 1] of each community label, shape (n, 3).

    Parameters
    ----------
    labels : array-like of int or float, shape (n,)
        Community labels (``Partition.membership``, the ``community`` node attribute);
        NaN or negative means "no community".

    Returns
    -------
    ndarray of float64, shape (n, 3)
        Label ``k`` gets ``COMMUNITY_COLOURS[k]`` while ``k`` is within the palette, else
        ``OTHER_COMMUNITY``; no community gets ``NO_COMMUNITY``. For 0-255 values (GraphML
        ``r, g, b``), ``np.round(255 * community_rgb(labels)).astype(int)``.

    Examples
    --------
    >>> community_rgb([0, 1, -1]).round(3).tolist()[0]
    [0.122, 0.467, 0.706]
    """
    c = np.asarray(labels, dtype=np.float64).reshape(-1)
    k = len(COMMUNITY_COLOURS)
    idx = np.where(np.isfinite(c) & (c >= 0), np.minimum(np.nan_to_num(c, nan=0.0), k), k + 1).astype(np.int64)
    return _TABLE[idx]


def community_label(label: int) -> str:
    """Legend text of a community label: its number, or the group of the small ones."""
    k = len(COMMUNITY_COLOURS)
    return f"community {label}" if 0 <= label < k else f"communities {k}+"


def community_legend(labels: Any) -> list[tuple[str, tuple[float, float, float]]]:
    """Legend entries ``(text, rgb)`` for the communities among ``labels``.

    One entry per community with its own colour (by label), then one for the smaller
    communities drawn grey, then one for units without a community, each only when present.
    """
    c = np.asarray(labels, dtype=np.float64).reshape(-1)
    valid = np.isfinite(c) & (c >= 0)
    present = np.unique(c[valid].astype(np.int64))
    k = len(COMMUNITY_COLOURS)
    own = present[present < k]
    legend = [(community_label(int(i)), tuple(_TABLE[i])) for i in own.tolist()]
    rest = present.size - own.size
    if rest:
        legend.append((f"{rest} smaller communit{'y' if rest == 1 else 'ies'} ({community_label(k)})", tuple(_TABLE[k])))
    if (~valid).any():
        legend.append(("no community", tuple(_TABLE[k + 1])))
    return legend
