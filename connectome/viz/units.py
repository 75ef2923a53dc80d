"""Unit cards: what a unit does, in pictures and numbers.

A card shows one unit's top dataset examples as a strip of patches cropped to its receptive
field (:mod:`connectome.patches`), its attribution, its flow in and out, and its community.
The report (:meth:`connectome.viz.Report.add_cards`), the interactive viewer and
``connectome export --examples`` draw from here. PIL only: no matplotlib figure per card.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np

from connectome.graph import Connectome

__all__ = ["patch_strip", "png_bytes", "compact_image_uri", "unit_flows", "unit_cards"]


def patch_strip(patches: Sequence[np.ndarray], size: int, n: int | None = None, pad: int = 2) -> np.ndarray:
    """``patches`` (each ``(size, size, 3)`` uint8) side by side on white, ``n`` slots wide."""
    n = len(patches) if n is None else n
    out = np.full((size, max(1, n) * (size + pad) - pad if n else size, 3), 255, dtype=np.uint8)
    for j, p in enumerate(list(patches)[:n]):
        out[:, j * (size + pad) : j * (size + pad) + size] = p
    return out


def png_bytes(a: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def compact_image_uri(a: np.ndarray, quality: int = 88) -> str:
    """An RGB uint8 array as a ``data:`` URI: PNG or JPEG, whichever is smaller (photographs
    compress several times better as JPEG, flat synthetic images as PNG)."""
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    jpg, png = buf.getvalue(), png_bytes(a)
    kind, data = ("jpeg", jpg) if len(jpg) < len(png) else ("png", png)
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def unit_flows(g: Connectome, attr: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Total signed flow into and out of every node, shape (n_nodes,) each."""
    w = g.weight if attr == "weight" else g.edge_attr(attr)
    into = np.bincount(g.dst, weights=w, minlength=g.num_nodes)
    out = np.bincount(g.src, weights=w, minlength=g.num_nodes)
    return into, out


def unit_cards(g: Connectome, nodes: Sequence[str], images: Callable[[int], np.ndarray] | None,
               n: int = 8, size: int = 40, by: str = "activation",
               community: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One card per node: title, a PNG strip of its top patches (None without images), and fields.

    Parameters
    ----------
    g : Connectome
        A graph with dataset examples (for the patches) and flows.
    nodes : sequence of str
        Node ids, in the order to show.
    images : callable or None
        ``index -> image`` from :func:`connectome.patches.image_source`.
    n, size : int
        Patches per card and their side in pixels.
    by : {"activation", "attribution"}
        Which list of examples to show.
    community : ndarray, optional
        A label per node of ``g`` (default: the ``community`` node attribute, when present).

    Returns
    -------
    list of dict
        ``{"title": node id, "png": bytes or None, "fields": [(name, value), ...]}``.
    """
    from connectome.patches import has_examples, unit_patches

    into, out = unit_flows(g)
    if community is None and "community" in g.node_attrs:
        community = np.asarray(g.node_attrs["community"])
    patches = unit_patches(g, images, nodes, by=by, n=n, size=size) if images is not None and has_examples(g, by) else {}
    cards = []
    for nid in nodes:
        i = g.index_of(nid)
        fields: list[tuple[str, Any]] = []
        if "attribution" in g.node_attrs:
            fields.append(("attribution", float(g.node_attrs["attribution"][i])))
        fields += [("flow in", float(into[i])), ("flow out", float(out[i]))]
        if community is not None:
            fields.append(("community", int(community[i]) if np.isfinite(community[i]) else "-"))
        items = patches.get(nid, [])
        if items:
            fields.append(("top images", ", ".join(str(p["index"]) for p in items)))
        png = png_bytes(patch_strip([p["patch"] for p in items], size, n)) if items else None
        cards.append({"title": nid, "png": png, "fields": fields})
    return cards
