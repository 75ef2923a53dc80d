"""Dataset examples stored with a graph, and the image patches they point at.

:func:`connectome.extract.examples` and ``attribution(..., examples=k)`` store, for every
unit, the top-k images as plain node attribute columns, so that they survive ``save`` /
``load``, ``prune``, ``subgraph``, ``contract`` and the networkx/igraph converters:

- ``example_index_j``: dataset index of the unit's j-th image by maximum activation
  (-1: none), ``example_value_j`` its maximum activation, ``example_pos_j`` the position
  of that maximum (row-major over the unit's ``height x width`` map);
- ``example_attr_index_j`` ... the same for the j-th image by attribution to the target
  (``A * dT/dA`` summed over positions), with the position of the unit's maximum
  activation in that image (where its crop is cut).

``meta["examples"]`` holds ``k``, the receptive field of every layer (``fields``, see
:func:`connectome.extract.receptive.receptive_fields`), the input size, what an index means
(``index``: ``"dataset"`` order, or ``"read order"``) and, for an ImageFolder, the path of
every image used (``paths``: index -> path). This module reads them back, crops a patch
to a unit's receptive field, and needs neither torch nor matplotlib (PIL only, to read
image files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from connectome.errors import ConnectomeError, DataError
from connectome.example_slots import COLUMN as _COLUMN
from connectome.example_slots import LISTS

if TYPE_CHECKING:
    from connectome.graph import Connectome

__all__ = ["LISTS", "example_columns", "has_examples", "example_arrays", "crop_box", "with_examples",
           "image_source", "unit_patches", "top_example", "examples_key"]



def example_columns(prefix: str, index: np.ndarray, value: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Node attribute columns ``{prefix}_index_j``, ``_value_j``, ``_pos_j`` from (n_nodes, k) arrays."""
    out: dict[str, np.ndarray] = {}
    for j in range(index.shape[1]):
        out[f"{prefix}_index_{j}"] = np.ascontiguousarray(index[:, j], dtype=np.int64)
        out[f"{prefix}_value_{j}"] = np.ascontiguousarray(value[:, j], dtype=np.float64)
        out[f"{prefix}_pos_{j}"] = np.ascontiguousarray(pos[:, j], dtype=np.int64)
    return out


def _check_by(by: str) -> str:
    if by not in LISTS:
        raise ValueError(f"by must be one of {sorted(LISTS)}, got {by!r}")
    return LISTS[by]


def has_examples(g: Connectome, by: str = "activation") -> bool:
    """Whether ``g`` carries the dataset examples of list ``by`` ("activation" or "attribution")."""
    return f"{_check_by(by)}_index_0" in g.node_attrs


def example_arrays(g: Connectome, by: str = "activation") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(index, value, pos)``, each of shape (n_nodes, k): the stored top-k of list ``by``.

    Raises
    ------
    ConnectomeError
        The graph carries no examples (extract with ``examples=k`` or :func:`connectome.extract.examples`).
    """
    prefix = _check_by(by)
    k = 0
    while f"{prefix}_index_{k}" in g.node_attrs:
        k += 1
    if k == 0:
        raise ConnectomeError(
            f"the graph has no dataset examples by {by}; extract it with attribution(..., examples=k) or "
            "connectome.extract.examples and attach them with connectome.patches.with_examples"
        )
    cols = lambda f, dt: np.stack([np.asarray(g.node_attrs[f"{prefix}_{f}_{j}"], dt) for j in range(k)], 1)  # noqa: E731
    return cols("index", np.int64), cols("value", np.float64), cols("pos", np.int64)


def top_example(g: Connectome, by: str = "activation") -> tuple[np.ndarray, list[str]]:
    """Each node's best image: its dataset index (-1: none) and its path ('' when unknown)."""
    index = example_arrays(g, by)[0][:, 0]
    paths = (g.meta.get("examples") or {}).get("paths") or {}
    return index, [paths.get(str(int(i)), "") if i >= 0 else "" for i in index]


def examples_key(g: Connectome, data: Any = None) -> str:
    """A short hash of everything a graph's patches are cut from: the units, their stored
    examples (both lists), ``meta["examples"]`` and the data named for the images.

    Two graphs get one key only if every unit's patches are the same, so files named by it
    (``export --examples DIR``) are never written over by another graph's patches.

    Parameters
    ----------
    g : Connectome
    data : str, PathLike or None
        The data spec the images are read from (``--data``); None: as recorded.

    Returns
    -------
    str
        12 hexadecimal digits.
    """
    h = hashlib.sha256()
    h.update(json.dumps(g.meta.get("examples") or {}, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
    h.update(json.dumps(None if data is None else str(data)).encode("utf-8", "surrogatepass"))
    h.update("\0".join(g.node_ids.tolist()).encode("utf-8", "surrogatepass"))
    # the index and pos columns place every patch; the values only rank them
    for c in sorted(c for c in g.node_attrs if (m := _COLUMN.match(c)) and m.group(2) != "value"):
        h.update(c.encode())
        h.update(np.ascontiguousarray(g.node_attrs[c], dtype=np.int64).tobytes())
    return h.hexdigest()[:12]


def crop_box(g: Connectome, node: str | int, pos: int) -> tuple[int, int, int, int]:
    """The input pixels that node ``node``'s value at position ``pos`` can depend on.

    Parameters
    ----------
    g : Connectome
        A graph with ``meta["examples"]`` (fields and input size).
    node : str or int
        A node id (``"layer2.conv1:5"``), a node index, or a layer name.
    pos : int
        A position as stored in ``example_pos_j`` (row-major over the unit's map).

    Returns
    -------
    (y0, y1, x0, x1) : tuple of int
        Rows ``y0:y1`` and columns ``x0:x1`` of the input image, clipped to it; the whole
        image where the unit depends on all of it (after a global pool or a flatten).
    """
    ex = g.meta.get("examples") or {}
    size = ex.get("input_size")
    if not size:
        raise ConnectomeError("the graph's meta has no input size for its examples; extract it with examples=k")
    h, w = int(size[0]), int(size[1])
    if isinstance(node, str) and ":" not in node:
        layer = node
    else:
        i = g.index_of(node) if isinstance(node, str) else int(node)
        layer = g.layers[int(g.node_layer[i])].name
    f = (ex.get("fields") or {}).get(layer)
    if f is None or pos < 0:
        return (0, h, 0, w)
    jy, ay, ry, jx, ax, rx, _, fw = (int(v) for v in f)
    r, c = divmod(int(pos), max(fw, 1))
    y0, x0 = ay + r * jy, ax + c * jx
    return (max(0, y0), min(h, y0 + ry), max(0, x0), min(w, x0 + rx))


def with_examples(g: Connectome, ex: Connectome) -> Connectome:
    """``g`` with the dataset examples of ``ex`` (a graph of the same model), matched by node id.

    Nodes of ``g`` that ``ex`` lacks get index -1 and value NaN; ``meta["examples"]`` is
    taken from ``ex``; example columns ``g`` had before are dropped.
    """
    names = [c for c in ex.node_attrs if _COLUMN.match(c)]
    if not names:
        raise ConnectomeError("the second graph carries no dataset examples (example_index_0 ...)")
    idx = {nid: i for i, nid in enumerate(ex.node_ids.tolist())}
    where = np.asarray([idx.get(n, -1) for n in g.node_ids.tolist()], dtype=np.int64)
    found = where >= 0
    cols = {}
    for c in names:
        src = np.asarray(ex.node_attrs[c])
        fill = np.nan if c.split("_")[-2] == "value" else -1
        out = np.full(g.num_nodes, fill, dtype=src.dtype)
        out[found] = src[where[found]]
        cols[c] = out
    # the examples of ex replace any that g had (of another k or run)
    kept = {c: v for c, v in g.node_attrs.items() if not _COLUMN.match(c)}
    return dataclasses.replace(g, node_attrs={**kept, **cols}, meta={**g.meta, "examples": ex.meta.get("examples") or {}})


# ----------------------------------------------------------------------------- images
def _display(img: np.ndarray) -> np.ndarray:
    """An image (C, H, W) or (H, W, C) of any range as (H, W, 3) floats in [0, 1] (min-max per image)."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):  # channels first (a torch image)
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    a = a[..., :3]
    lo, hi = np.nanmin(a), np.nanmax(a)
    return np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)


def _file_loader(size: Sequence[int]) -> Callable[[str], np.ndarray]:
    """Read an image file as the default transform sees it: resize the short side to
    ``size * 8/7``, center-crop to ``size`` (torchvision's recipe, without normalisation)."""
    from PIL import Image

    from connectome._image import read_rgb

    h, w = int(size[0]), int(size[1])

    def load(path: str) -> np.ndarray:
        try:
            opened = read_rgb(path)
        except Exception as exc:  # PIL raises many kinds for a bad file (DecompressionBombError, SyntaxError ...)
            raise DataError(f"cannot read the example image {path!r} ({type(exc).__name__}: {exc})") from None
        with opened as im:  # 16-bit grey scaled as the extraction's loader does
            short = int(round(min(h, w) * 256 / 224))
            scale = short / min(im.size)
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
            left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
            return np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.float64) / 255.0

    return load


def _warn_if_changed(path: str, stamp: Any) -> None:
    """Warn when the file at ``path`` is not the one extracted: its ``[size, mtime_ns]`` differ
    from ``stamp`` (``meta["examples"]["stamps"]``; graphs written before it have none)."""
    import os
    import warnings

    if not (isinstance(stamp, (list, tuple)) and len(stamp) == 2):
        return
    st = os.stat(path)
    if [st.st_size, st.st_mtime_ns] != [stamp[0], stamp[1]]:
        warnings.warn(f"example image {path!r} changed since the graph was extracted (size or modification "
                      "time differ): its patches may not show what the units saw; extract again", stacklevel=3)


def image_source(g: Connectome, data: Any = None) -> Callable[[int], np.ndarray] | None:
    """A function ``index -> (H, W, 3) image in [0, 1]`` for the graph's stored image indices.

    Parameters
    ----------
    g : Connectome
        A graph with dataset examples.
    data : optional
        The data the examples were taken from: a torch Dataset (items ``(image, label)`` or
        images), an image tensor ``(N, C, H, W)``, an ``(images, labels)`` pair, or a data
        spec string (``zoo:shapes:N[:seed]`` or an ImageFolder path). Default: the image
        paths stored in ``meta["examples"]["paths"]``, else ``meta["examples"]["data"]``.

    Returns
    -------
    callable or None
        None when no images can be found (the graph came from tensors that are not given).
    """
    ex = g.meta.get("examples") or {}
    if data is None:
        paths = ex.get("paths")
        if paths:
            load = _file_loader(ex.get("input_size") or (224, 224))

            def from_paths(i: int) -> np.ndarray:
                p = paths.get(str(int(i)))
                if p is None or not Path(p).is_file():
                    raise DataError(f"image {int(i)} ({p!r}) of the graph's examples is not on this machine; "
                                    "pass the data the graph was extracted from")
                _warn_if_changed(p, (ex.get("stamps") or {}).get(str(int(i))))
                return load(p)

            return from_paths
        data = ex.get("data")
        if data is None:
            return None
    if isinstance(data, (str, Path)):
        from connectome.modelspec import load_data_spec

        size = ex.get("input_size")
        data = load_data_spec(str(data), image_size=int(size[-1]) if size else None)
        if isinstance(data, str):  # an ImageFolder path: read its files as the default transform does
            from connectome.extract.data import make_loader

            ds = make_loader(data, batch_size=1).dataset
            load = _file_loader(ex.get("input_size") or (224, 224))
            return lambda i: load(ds.samples[_within(i, len(ds.samples), data)][0])
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        data = data[0]
    if hasattr(data, "shape") and len(data.shape) == 4:
        arr = data

        def from_array(i: int) -> np.ndarray:
            x = arr[_within(i, len(arr), "the images")]
            return _display(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x))

        return from_array
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        def from_dataset(i: int) -> np.ndarray:
            item = data[_within(i, len(data), f"the {type(data).__name__}")]
            x = item[0] if isinstance(item, (tuple, list)) else item
            x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            return _display(x)

        return from_dataset
    raise TypeError(f"cannot read images from a {type(data).__name__}; pass a Dataset, an image tensor or a path")


def _within(i: int, n: int, data: Any) -> int:
    """Image index ``i`` of the graph's examples, if ``data`` (``n`` images) holds it; else a
    DataError (other data than the graph was extracted from: an IndexError deep inside)."""
    i = int(i)
    if not 0 <= i < n:
        raise DataError(f"image {i} of the graph's examples is not in {str(data)!r}, which holds {n} images; "
                        "pass the data the graph was extracted from")
    return i


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    h, w = a.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(new, Image.NEAREST if scale >= 1 else Image.BILINEAR)
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    y, x = (size - new[1]) // 2, (size - new[0]) // 2
    out[y : y + new[1], x : x + new[0]] = np.asarray(im)
    return out


def unit_patches(g: Connectome, images: Callable[[int], np.ndarray], nodes: Sequence[str] | None = None,
                 by: str = "activation", n: int = 8, size: int = 48) -> dict[str, list[dict[str, Any]]]:
    """The top patches of each unit, cropped to its receptive field and scaled to ``size`` pixels.

    Parameters
    ----------
    g : Connectome
        A graph with dataset examples.
    images : callable
        ``index -> (H, W, 3)`` image in [0, 1], from :func:`image_source`.
    nodes : sequence of str, optional
        Node ids (default: every node with an example).
    by : {"activation", "attribution"}
    n : int, default 8
        Patches per unit (at most the stored k).
    size : int, default 48
        Side of each square thumbnail, pixels.

    Returns
    -------
    dict of node id -> list of dict
        ``{"patch": uint8 array (size, size, 3), "index": int, "value": float, "box": (y0, y1, x0, x1)}``
        per example, best first.
    """
    index, value, pos = example_arrays(g, by)
    rows = range(g.num_nodes) if nodes is None else g.index_of(list(nodes))
    ids = g.node_ids
    cache: dict[int, np.ndarray] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    for i in np.atleast_1d(rows):
        items = []
        for j in range(min(n, index.shape[1])):
            im_i = int(index[i, j])
            if im_i < 0:
                continue
            if im_i not in cache:
                if len(cache) > 4096:  # bounded memory on large graphs
                    cache.clear()
                cache[im_i] = images(im_i)
            box = crop_box(g, int(i), int(pos[i, j]))
            crop = cache[im_i][box[0] : box[1], box[2] : box[3]]
            items.append({"patch": _resize(crop, size), "index": im_i, "value": float(value[i, j]), "box": box})
        if items:
            out[str(ids[i])] = items
    return out
