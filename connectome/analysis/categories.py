"""All the categories of a store at once: flow and attribution similarity, circuit overlap,
a clustering of categories, and the units many categories share.

Everything is computed from the store's arrays as matrix products streamed over windows of
edges (:func:`compare_store`): memory holds one window of every category's flows (at most
``memory`` bytes) and a few category x category matrices per layer, never the graphs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from connectome.analysis._util import finish_correlation
from connectome.analysis._util import nan_to_none as _nan_to_none
from connectome.errors import BadFileError, ConnectomeError

__all__ = ["StoreComparison", "compare_store"]


def _pearson(gram: np.ndarray, sums: np.ndarray, n: int) -> np.ndarray:
    """Pearson correlation of the rows of a matrix X from ``X @ X.T``, ``X.sum(1)`` and its width ``n``.

    NaN where a row is constant (no spread), 1 on the other diagonal entries.
    """
    k = gram.shape[0]
    if n < 2:
        return np.full((k, k), np.nan)
    cov = gram - np.outer(sums, sums) / n
    var = np.diag(cov).copy()
    scale = np.maximum(np.diag(gram), 0.0)
    bad = var <= 1e-9 * np.maximum(scale, 1e-300)  # constant up to rounding
    sd = np.sqrt(np.where(bad, 1.0, var))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = cov / np.outer(sd, sd)
    return finish_correlation(c, bad)


@dataclass(frozen=True)
class StoreComparison:
    """Every category of a store against every other.

    Attributes
    ----------
    classes : tuple of str
        Category names: the row/column order of every matrix.
    flow : dict of str -> ndarray, shape (n_classes, n_classes)
        Per layer, the Pearson correlation of the categories' flows on the edges into it.
    node : dict of str -> ndarray, shape (n_classes, n_classes)
        Per layer, the Pearson correlation of the categories' node column ``attr`` in it.
    attr : str
        The node column of ``node`` (``attribution`` by default).
    jaccard : ndarray, shape (n_classes, n_classes)
        Overlap of the categories' circuits (mass ``circuit_mass``), |A & B| / |A | B|; NaN
        for a category without a circuit.
    linkage : ndarray, shape (n_classes - 1, 4)
        Average-linkage hierarchical clustering (scipy) of the categories on 1 - jaccard.
    sharing : ndarray of int, shape (n_nodes,)
        For each unit, the number of categories whose circuit holds it.
    layers : tuple of (str, int, int)
        Layer name, first node index, node count: how ``sharing`` splits into layers.
    node_ids : ndarray of str
        Node id of each unit of ``sharing``.
    generalist : float
        Fraction of the categories a unit's circuits must reach to be a generalist.
    circuit_mass : float
    """

    classes: tuple[str, ...]
    flow: dict[str, np.ndarray]
    node: dict[str, np.ndarray]
    attr: str
    jaccard: np.ndarray
    linkage: np.ndarray | None
    sharing: np.ndarray
    layers: tuple[tuple[str, int, int], ...]
    node_ids: np.ndarray
    generalist: float = 0.5
    circuit_mass: float = 0.8
    extra: dict[str, Any] = field(default_factory=dict)

    def generalists(self) -> dict[str, list[str]]:
        """Per layer, the units in the circuits of at least ``generalist`` of the categories."""
        need = max(2, int(np.ceil(self.generalist * len(self.classes))))
        return {name: self.node_ids[start:start + n][self.sharing[start:start + n] >= need].tolist()
                for name, start, n in self.layers}

    def specialists(self) -> dict[str, list[str]]:
        """Per layer, the units in the circuit of exactly one category."""
        return {name: self.node_ids[start:start + n][self.sharing[start:start + n] == 1].tolist()
                for name, start, n in self.layers}

    def clusters(self, n: int) -> dict[str, int]:
        """Category -> cluster (0 .. n-1) from cutting the dendrogram into ``n`` clusters."""
        from scipy.cluster.hierarchy import fcluster

        if self.linkage is None:
            return {c: 0 for c in self.classes}
        labels = fcluster(self.linkage, t=n, criterion="maxclust")
        return {c: int(l) - 1 for c, l in zip(self.classes, labels)}

    def plot_dendrogram(self, ax: Any = None) -> Any:
        """The clustering of the categories by circuit overlap, as a dendrogram (matplotlib)."""
        from scipy.cluster.hierarchy import dendrogram

        from connectome.viz._mpl import axes

        _, ax = axes(ax, (max(6.0, 0.18 * len(self.classes)), 4.0))
        if self.linkage is not None:
            dendrogram(self.linkage, labels=list(self.classes), ax=ax, leaf_rotation=90,
                       no_labels=len(self.classes) > 150)
        ax.set_ylabel("1 - circuit overlap (Jaccard), average linkage")
        ax.set_title(f"{len(self.classes)} categories clustered by their circuits")
        return ax

    def plot_sharing(self, ax: Any = None) -> Any:
        """Histogram: how many categories' circuits hold each unit (specialists at 1, generalists right)."""
        from connectome.viz._mpl import axes

        _, ax = axes(ax, (6.0, 3.5))
        used = self.sharing[self.sharing > 0]
        ax.hist(used, bins=np.arange(1, len(self.classes) + 2) - 0.5 if len(self.classes) <= 60 else 60)
        ax.set_xlabel("categories whose circuit holds the unit")
        ax.set_ylabel("units")
        ax.set_yscale("log")
        return ax

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None)."""
        return {
            "classes": list(self.classes),
            "flow": {k: _nan_to_none(m.tolist()) for k, m in self.flow.items()},
            "attr": self.attr,
            "node": {k: _nan_to_none(m.tolist()) for k, m in self.node.items()},
            "jaccard": _nan_to_none(self.jaccard.tolist()),
            "generalists": self.generalists(),
            "specialists": {k: len(v) for k, v in self.specialists().items()},
            "circuit_mass": self.circuit_mass,
        }

    def __repr__(self) -> str:
        off = ~np.eye(len(self.classes), dtype=bool)
        j = self.jaccard[off]
        j = j[np.isfinite(j)]
        lines = [f"StoreComparison({len(self.classes)} categories, {len(self.flow)} layers)"]
        if j.size:
            lines.append(f"  circuit overlap (Jaccard): {j.min():.0%} .. {j.max():.0%}, mean {j.mean():.0%}")
        g = sum(len(v) for v in self.generalists().values())
        s = sum(len(v) for v in self.specialists().values())
        lines.append(f"  generalist units (>= {self.generalist:.0%} of categories): {g}; specialist units: {s}")
        return "\n".join(lines)


def _window(n_cat: int, memory: float, chunk: int) -> int:
    """Edges per window: ``memory`` bytes of float32 for every category, in whole chunks, at least one
    (a chunk cut between two windows would be decompressed twice)."""
    w = int(memory // (4 * max(1, n_cat)))
    return max(1, w // chunk) * chunk


def compare_store(store: Any, attr: str = "attribution", *, generalist: float = 0.5, memory: float = 256e6,
                  names: list[str] | None = None, window: int | None = None, use_dask: bool = False) -> StoreComparison:
    """Compare every category of a store with every other, streamed over windows of edges.

    Per layer, the Pearson correlation across categories of the flows on the edges into the
    layer (``X @ X.T`` summed window by window, in float64) and of the node attributions; the
    Jaccard overlap of the circuits stored per category; an average-linkage clustering on
    ``1 - jaccard``; and per unit the number of categories whose circuit holds it.

    Parameters
    ----------
    store : CategoryStore
    attr : str, default "attribution"
        The node column correlated per layer (``activation_mean`` ...).
    generalist : float, default 0.5
        A unit in the circuits of at least this fraction of the categories is a generalist.
    memory : float, default 256e6
        Bytes of flows held at once (one window of edges for every category); at least one
        chunk of the store per category (512 KiB of float32).
    names : list of str, optional
        Only these categories (default: all, in store order).
    window : int, optional
        Edges per window (default: from ``memory``, in whole chunks of the store when they fit).
    use_dask : bool, default False
        Compute the flow correlations with dask (an optional extra: ``pip install
        connectome[dask]``) on the store's chunks as they lie (``dask.array.from_zarr``): on the
        scheduler in use, a ``dask.distributed`` cluster when a ``Client`` is open (the store
        then on storage every worker reads), else dask's threads. Products in float64.

    Returns
    -------
    StoreComparison

    Raises
    ------
    BadFileError
        A damaged column (named with its category).
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    names = list(store) if names is None else list(names)
    if not names:
        raise ConnectomeError("the store holds no complete category to compare")
    if not 0 < generalist <= 1:
        raise ValueError(f"generalist must be in (0, 1], got {generalist!r}")
    layers, units, src, dst = store.topology()
    rows = store.rows(names)
    metas = [store.category_meta(n) for n in names]
    k = len(names)
    offsets = np.zeros(len(layers) + 1, dtype=np.int64)
    np.cumsum([l.size for l in layers], out=offsets[1:])
    bounds = np.searchsorted(dst, offsets)  # edges into layer L: bounds[L] .. bounds[L+1] (dst is sorted)
    weight = store.array("edge", "weight")
    grams = {li: np.zeros((k, k)) for li in range(len(layers)) if bounds[li + 1] > bounds[li]}
    sums = {li: np.zeros(k) for li in grams}
    crc = [0] * k
    if use_dask:
        _dask_grams(store, names, bounds, grams, sums)
        # a chunk that does not decode failed its zstd frame checksum; a missing one read as NaN:
        # the CRC-32 of the rows with a non-finite sum is checked below, the others are taken as read
        bad = ~np.isfinite(sum(np.diag(g) for g in grams.values())) if grams else np.zeros(k, bool)
        crc = [m["crc32"].get("edge/weight") for m in metas]
        for i in np.flatnonzero(bad):
            one = [0]
            _read(store, weight, rows[i:i + 1], slice(None), names[i:i + 1], "edge/weight", one)
            crc[i] = one[0]
    else:
        w = int(window) if window else _window(k, memory, weight.chunks[1])
        _streamed_grams(store, weight, rows, names, bounds, grams, sums, crc, w)
    for i, n in enumerate(names):
        if crc[i] != metas[i]["crc32"].get("edge/weight"):
            raise BadFileError(f"store {str(store.path)!r}, category {n!r}, column edge/weight is damaged (its "
                               "checksum does not match); extract this category again")
    flow = {layers[li].name: _pearson(grams[li], sums[li], int(bounds[li + 1] - bounds[li])) for li in grams}
    # node columns: categories x units, small (one float per unit)
    A = np.nan_to_num(_node_matrix(store, attr, rows, names, metas).astype(np.float64))
    node = {}
    for li, l in enumerate(layers):
        P = A[:, offsets[li]:offsets[li + 1]]
        node[l.name] = _pearson(P @ P.T, P.sum(axis=1), P.shape[1])
    M = _node_matrix(store, None, rows, names, metas)  # circuits: 1 in, 0 out, <0 none stored
    has = (M >= 0).all(axis=1)
    M = np.where(M > 0, 1.0, 0.0)
    inter = M @ M.T
    size = M.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        jac = inter / (size[:, None] + size[None, :] - inter)
    jac[~has, :] = np.nan
    jac[:, ~has] = np.nan
    jac.setflags(write=False)
    link = None
    if k >= 2 and has.all():
        dist = 1.0 - np.nan_to_num(jac, nan=0.0)
        np.fill_diagonal(dist, 0.0)
        link = linkage(squareform(np.clip((dist + dist.T) / 2, 0, 1), checks=False), method="average")
    sharing = M[has].sum(axis=0).astype(np.int64)
    from connectome.graph import Connectome

    ids = Connectome(layers, units, src[:0], dst[:0], np.zeros(0)).node_ids
    return StoreComparison(
        classes=tuple(names), flow=flow, node=node, attr=attr, jaccard=jac, linkage=link, sharing=sharing,
        layers=tuple((l.name, int(offsets[i]), l.size) for i, l in enumerate(layers)), node_ids=ids,
        generalist=generalist, circuit_mass=float(store.info.get("circuit_mass", 0.8)),
    )


def _streamed_grams(store: Any, weight: Any, rows: np.ndarray, names: list[str], bounds: np.ndarray,
                    grams: dict[int, np.ndarray], sums: dict[int, np.ndarray], crc: list[int], w: int) -> None:
    """Fill ``grams`` and ``sums`` per layer from windows of ``w`` edges read in turn (``crc``:
    each row's running CRC-32)."""
    n_edges = int(bounds[-1])
    for a in range(0, n_edges, w):
        b = min(n_edges, a + w)
        X = _read(store, weight, rows, slice(a, b), names, "edge/weight", crc)
        for li in grams:
            s, e = max(a, int(bounds[li])), min(b, int(bounds[li + 1]))
            if e > s:
                part = X[:, s - a:e - a]
                used = part.any(axis=0)  # edges with no flow in any category add nothing: leave them out
                if not used.all():
                    part = part[:, used]
                # float32 stores: float32 products of a window (BLAS syrk: X @ X.T is symmetric), float64 sums
                grams[li] += part @ part.T
                sums[li] += part.sum(axis=1, dtype=np.float64)
        del X


def _dask_grams(store: Any, names: list[str], bounds: np.ndarray, grams: dict[int, np.ndarray],
                sums: dict[int, np.ndarray]) -> None:
    """Fill ``grams`` and ``sums`` per layer from the store's flows as a dask array."""
    try:
        import dask
    except ImportError:
        raise ConnectomeError("use_dask needs dask: pip install 'connectome[dask]'") from None
    X = store.dask("weight", names=names)
    # the store's chunks hold one category each: blocks of rows (64 MB of float64 per block of a
    # chunk's columns) keep the products' task graph from growing with categories squared
    rows = max(1, min(len(names), int(64e6 // (8 * max(1, X.chunksize[1])))))
    X = X.rechunk({0: rows}).astype(np.float64)
    parts = {li: X[:, int(bounds[li]):int(bounds[li + 1])] for li in grams}
    try:
        done = dask.compute({li: (p @ p.T, p.sum(axis=1)) for li, p in parts.items()})[0]
    except Exception as exc:  # noqa: BLE001 - a chunk that does not decode: find whose
        _read(store, store.array("edge", "weight"), store.rows(names), slice(None), names, "edge/weight")
        raise BadFileError(f"store {str(store.path)!r}: column edge/weight cannot be read ({exc})") from None
    for li, (g, t) in done.items():
        grams[li] += g
        sums[li] += t


def _read(store: Any, arr: Any, rows: np.ndarray, cols: slice, names: list[str], column: str,
          crc: list[int] | None = None) -> np.ndarray:
    """``arr[rows, cols]`` (``crc``: running CRC-32 of the rows, updated); a chunk that does not decode
    is a BadFileError naming its category."""
    try:  # whole chunks, each decompressed once
        return store.block(*column.split("/"), rows, cols.start, cols.stop, crc=crc)
    except Exception as exc:  # noqa: BLE001 - a chunk that does not decode: find whose
        for i, r in enumerate(rows):
            try:
                arr[int(r), cols]
            except Exception:  # noqa: BLE001
                raise BadFileError(f"store {str(store.path)!r}, category {names[i]!r}, column {column} is damaged "
                                   f"({type(exc).__name__}); extract this category again") from None
        raise BadFileError(f"store {str(store.path)!r}: column {column} cannot be read ({exc})") from None


def _node_matrix(store: Any, column: str | None, rows: np.ndarray, names: list[str],
                 metas: list[Mapping[str, Any]]) -> np.ndarray:
    """Categories x units of node column ``column`` (None: the stored circuits; -1 rows where none)."""
    kind, col = ("circuit", "units") if column is None else ("node", column)
    key = f"{kind}/{col}"
    if column is not None and any(column not in m["columns"]["node"] for m in metas):
        missing = [n for n, m in zip(names, metas) if column not in m["columns"]["node"]]
        raise ConnectomeError(f"categories {missing[:5]} have no node column {column!r}")
    if column is None and key not in store.group():
        return np.full((len(names), sum(l.size for l in store.layers())), -1, dtype=np.int64)
    arr = store.array(kind, col)
    M = _read(store, arr, rows, slice(None), names, key)
    for i, n in enumerate(names):
        want = metas[i]["crc32"].get(key)
        if want is None:
            M[i] = -1  # no circuit stored for this category (no target, or no flow)
        elif zlib.crc32(np.ascontiguousarray(M[i])) != want:
            raise BadFileError(f"store {str(store.path)!r}, category {n!r}, column {key} is damaged (its checksum "
                               "does not match); extract this category again")
    return M
