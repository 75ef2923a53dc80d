"""The Connectome: a layered, weighted, directed graph of units.

Units (channels of a conv, neurons of a linear layer) are grouped in ordered layers. Node ids
are ``"<layer>:<unit>"`` where ``unit`` is the unit's index in its layer of the *model*, so
ids stay stable across graphs of one model and across subgraphs. Edges only go forward in
layer order; they are held as flat COO arrays over global node indices, sorted by
``(dst, src)``, never as a dense units x units matrix.

The object is immutable in spirit: every operation returns a new Connectome.
"""

from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from connectome import npzformat
from connectome.errors import BadFileError, ConnectomeError, EmptyGraphError
from connectome.layer import Layer

if TYPE_CHECKING:  # pragma: no cover
    import igraph
    import networkx

    from connectome._typing import PathLike

__all__ = ["Layer", "Connectome"]

#: Above this many edges, to_networkx warns with the memory it will take first.
NX_WARN_EDGES = 2_000_000

def _as_layer(spec: Layer | Sequence[Any] | Mapping[str, Any]) -> Layer:
    if isinstance(spec, Layer):
        return spec
    if isinstance(spec, Mapping):
        return Layer.from_dict(spec)
    spec = tuple(spec)
    if len(spec) == 2:
        return Layer(name=spec[0], size=int(spec[1]))
    if len(spec) in (3, 4):
        labels = spec[3] if len(spec) == 4 else None
        return Layer(name=spec[0], kind=spec[1], size=int(spec[2]), labels=labels)
    raise ValueError(f"a layer is (name, kind, size[, labels]) or a Layer, got {spec!r}")


@dataclass(frozen=True, eq=False)
class Connectome:
    """A layered, weighted, directed graph of units.

    Build one with :func:`connectome.extract.weights`, :func:`connectome.extract.attribution`,
    :meth:`Connectome.from_edges` or :meth:`Connectome.from_networkx`.

    Parameters
    ----------
    layers : tuple of Layer
        Layers in topological order.
    node_units : ndarray of int, shape (n_nodes,)
        Unit index (in the model's layer) of each node; nodes are ordered by layer, then unit.
    src, dst : ndarray of int64, shape (n_edges,)
        Global node indices of each edge, ``src`` in an earlier layer than ``dst``.
    weight : ndarray of float, shape (n_edges,)
        Signed edge weight (a kernel sum, or an attribution flow).
    edge_attrs : dict of str -> ndarray, shape (n_edges,)
        Further edge columns (``abs_weight`` ...).
    node_attrs : dict of str -> ndarray, shape (n_nodes,)
        Node attribute columns (``attribution``, ``activation_mean``, ``community`` ...).
    meta : dict
        JSON-serialisable metadata (model, method, target, category, ...).

    Examples
    --------
    >>> g = Connectome.from_edges(
    ...     layers=[("input", "input", 2), ("fc", "linear", 1)],
    ...     edges=[("input:0", "fc:0", 0.5), ("input:1", "fc:0", -1.0)])
    >>> g.num_nodes, g.num_edges
    (3, 2)
    """

    layers: tuple[Layer, ...]
    node_units: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    edge_attrs: dict[str, np.ndarray] = field(default_factory=dict)
    node_attrs: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        layers = tuple(_as_layer(l) for l in self.layers)
        names = [l.name for l in layers]
        if len(set(names)) != len(names):
            counts: dict[str, int] = {}
            for n in names:  # one pass: names.count in a loop is quadratic in the number of layers
                counts[n] = counts.get(n, 0) + 1
            dup = sorted(n for n, c in counts.items() if c > 1)
            raise ConnectomeError(f"layer names must be unique; repeated: {dup}")
        object.__setattr__(self, "layers", layers)
        n = sum(l.size for l in layers)
        units = _owned(self.node_units, np.int64)
        if units.shape[0] != n:
            raise ConnectomeError(f"node_units has {units.shape[0]} entries for {n} nodes")
        src = _owned(self.src, np.int64)
        dst = _owned(self.dst, np.int64)
        weight = _owned(self.weight)
        if weight.dtype.kind not in "fiu":
            raise ConnectomeError(f"edge weights must be numeric, got dtype {weight.dtype}")
        if weight.dtype.kind != "f":
            weight = weight.astype(np.float64)
        weight = weight.reshape(-1)
        if not (src.shape == dst.shape == weight.shape):
            raise ConnectomeError(
                f"src, dst and weight must have one length, got {src.shape}, {dst.shape}, {weight.shape}"
            )
        offsets = np.zeros(len(layers) + 1, dtype=np.int64)
        np.cumsum([l.size for l in layers], out=offsets[1:])
        node_layer = np.repeat(np.arange(len(layers), dtype=np.int64), [l.size for l in layers])
        # Graphs built by extraction (and read from files) come in canonical order: checking
        # that in chunks costs a fraction of the full checks and sort below, with no temporaries
        # the size of the edge arrays. Anything else takes the full path (and its messages).
        canonical = is_canonical(src, dst, offsets)
        if not canonical and src.size and (src.min() < 0 or dst.min() < 0 or max(src.max(), dst.max()) >= n):
            raise ConnectomeError(f"edge endpoints must be node indices in [0, {n})")
        if not canonical and src.size and np.any(node_layer[src] >= node_layer[dst]):
            bad = int(np.flatnonzero(node_layer[src] >= node_layer[dst])[0])
            raise ConnectomeError(
                f"edges must go forward in layer order; edge {bad} goes from layer "
                f"{layers[node_layer[src[bad]]].name!r} to {layers[node_layer[dst[bad]]].name!r}"
            )
        edge_attrs = {k: _owned(v) for k, v in dict(self.edge_attrs).items()}
        for k, v in edge_attrs.items():
            if v.shape != weight.shape:
                raise ConnectomeError(f"edge attribute {k!r} has {v.shape[0]} values for {weight.shape[0]} edges")
        node_attrs = {k: _owned(v) for k, v in dict(self.node_attrs).items()}
        for k, v in node_attrs.items():
            if v.shape[0] != n:
                raise ConnectomeError(f"node attribute {k!r} has {v.shape[0]} values for {n} nodes")
        # Canonical edge order (dst, src) makes equality, blocks and files deterministic.
        key = None if canonical else dst * max(n, 1) + src
        if key is not None and key.size > 1 and not np.all(key[1:] > key[:-1]):
            order = np.argsort(key, kind="stable")
            src, dst, weight, key = src[order], dst[order], weight[order], key[order]
            edge_attrs = {k: v[order] for k, v in edge_attrs.items()}
            same = key[1:] == key[:-1]
            if same.any():
                i = int(np.flatnonzero(same)[0])
                raise ConnectomeError(
                    f"duplicate edge {self._id_from(layers, offsets, units, int(src[i]))} -> "
                    f"{self._id_from(layers, offsets, units, int(dst[i]))}; sum duplicates before building"
                )
        meta = dict(self.meta)
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise ConnectomeError(f"meta must be JSON-serialisable: {exc}") from None
        for name, arr in (("node_units", units), ("src", src), ("dst", dst), ("weight", weight)):
            arr.setflags(write=False)
        for arr in list(edge_attrs.values()) + list(node_attrs.values()):
            arr.setflags(write=False)
        if src is not self.src and dst is not self.dst:
            # copies or sorted arrays made here (no caller holds them): later graphs sharing them
            # skip the check. Arrays the caller handed over are checked again each time: their
            # owner could turn writing back on.
            _remember_canonical(src, dst, offsets)
        object.__setattr__(self, "node_units", units)
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "edge_attrs", edge_attrs)
        object.__setattr__(self, "node_attrs", node_attrs)
        object.__setattr__(self, "meta", meta)
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_node_layer", node_layer)
        object.__setattr__(self, "_layer_pos", {l.name: i for i, l in enumerate(layers)})
        object.__setattr__(self, "_ids", None)
        object.__setattr__(self, "_id_index", None)

    @staticmethod
    def _id_from(layers, offsets, units, i: int) -> str:
        li = int(np.searchsorted(offsets, i, side="right") - 1)
        return f"{layers[li].name}:{units[i]}"

    @classmethod
    def from_edges(
        cls,
        layers: Iterable[Layer | Sequence[Any]],
        edges: Iterable[tuple[str, str, float]] = (),
        meta: Mapping[str, Any] | None = None,
        node_attrs: Mapping[str, Any] | None = None,
    ) -> Connectome:
        """Build a graph by hand: layers as ``(name, kind, size)`` and edges as ``(src_id, dst_id, w)``.

        Parameters
        ----------
        layers : iterable of Layer or (name, kind, size[, labels])
            Layers in topological order; units are numbered ``0..size-1``.
        edges : iterable of (str, str, float)
            Edges by node id, e.g. ``("input:0", "fc:1", 0.5)``; each pair at most once.
        meta : dict, optional
            JSON-serialisable metadata.
        node_attrs : dict of str -> array-like, optional
            Node attribute columns over all nodes in layer order.

        Returns
        -------
        Connectome

        Raises
        ------
        ConnectomeError
            Unknown node ids, edges going backwards, duplicate edges.
        """
        layer_objs = [_as_layer(l) for l in layers]
        units = np.concatenate([np.arange(l.size, dtype=np.int64) for l in layer_objs]) if layer_objs else np.zeros(0, np.int64)
        edges = list(edges)
        skeleton = cls(layers=tuple(layer_objs), node_units=units, src=[], dst=[], weight=np.zeros(0))
        if edges:
            s_ids, d_ids, w = zip(*edges)
            src = skeleton.index_of(list(s_ids))
            dst = skeleton.index_of(list(d_ids))
            weight = np.asarray(w, dtype=np.float64)
        else:
            src = dst = np.zeros(0, np.int64)
            weight = np.zeros(0)
        return cls(
            layers=tuple(layer_objs),
            node_units=units,
            src=src,
            dst=dst,
            weight=weight,
            node_attrs=dict(node_attrs or {}),
            meta=dict(meta or {}),
        )

    @classmethod
    def from_networkx(cls, G: networkx.DiGraph) -> Connectome:
        """Inverse of :meth:`to_networkx`.

        Layer order, kinds and labels come from ``G.graph["layers"]`` when present (as written
        by :meth:`to_networkx`); otherwise from the nodes' ``layer`` attribute in the order
        layers are first met. Node ids must be ``"<layer>:<unit>"`` or carry ``layer`` and
        ``index`` attributes. Numeric node attributes other than layer/index/label become
        node attribute columns. The signed edge weight is ``signed_weight`` when edges carry
        it (as :meth:`to_networkx` and the Gephi files write them, with ``weight`` = ``|w|``),
        else ``weight``; other numeric edge attributes become edge columns.
        """
        nodes = list(G.nodes(data=True))
        layer_of: dict[Any, str] = {}
        unit_of: dict[Any, int] = {}
        for n, d in nodes:
            if "layer" in d and "index" in d:
                layer_of[n], unit_of[n] = str(d["layer"]), int(d["index"])
            else:
                s = str(n)
                if ":" not in s:
                    raise ConnectomeError(
                        f"node {n!r} has no 'layer'/'index' attributes and its id is not '<layer>:<unit>'"
                    )
                lname, _, u = s.rpartition(":")
                layer_of[n], unit_of[n] = lname, int(u)
        spec = G.graph.get("layers")
        if spec:
            if isinstance(spec, str):
                spec = json.loads(spec)
            order = [Layer.from_dict(d) for d in spec]
        else:
            seen: dict[str, None] = {}
            for n, _ in nodes:
                seen.setdefault(layer_of[n], None)
            order = [Layer(name=name) for name in seen]
        by_layer: dict[str, list[Any]] = {l.name: [] for l in order}
        for n, _ in nodes:
            if layer_of[n] not in by_layer:
                raise ConnectomeError(f"node {n!r} is in layer {layer_of[n]!r}, not listed in G.graph['layers']")
            by_layer[layer_of[n]].append(n)
        ordered_nodes: list[Any] = []
        layers = []
        for l in order:
            ns = sorted(by_layer[l.name], key=lambda x: unit_of[x])
            ordered_nodes.extend(ns)
            labels = l.labels
            if labels is not None and len(labels) != len(ns):
                labels = None
            layers.append(replace(l, size=len(ns), labels=labels))
        pos = {n: i for i, n in enumerate(ordered_nodes)}
        units = np.array([unit_of[n] for n in ordered_nodes], dtype=np.int64)
        reserved = {"layer", "index", "label", "kind", "name"}
        attr_names = sorted({k for _, d in nodes for k, v in d.items() if k not in reserved and _is_number(v)})
        node_attrs = {
            k: np.array([float(G.nodes[n].get(k, np.nan)) for n in ordered_nodes]) for k in attr_names
        }
        edges = list(G.edges(data=True))
        src = np.array([pos[u] for u, _, _ in edges], dtype=np.int64)
        dst = np.array([pos[v] for _, v, _ in edges], dtype=np.int64)
        # to_networkx (and the Gephi export) write weight = |w| and the sign under
        # signed_weight; graphs from elsewhere carry their signed weight as weight.
        weight = np.array([float(d.get("signed_weight", d.get("weight", 1.0))) for _, _, d in edges], dtype=np.float64)
        e_names = sorted({k for _, _, d in edges for k, v in d.items()
                          if k not in ("weight", "signed_weight") and _is_number(v)})
        edge_attrs = {k: np.array([float(d.get(k, np.nan)) for _, _, d in edges]) for k in e_names}
        meta = G.graph.get("meta", {})
        if isinstance(meta, str):
            meta = json.loads(meta)
        dtypes = G.graph.get("dtypes") or {}
        if isinstance(dtypes, str):
            dtypes = json.loads(dtypes)
        if "weight" in dtypes:
            weight = weight.astype(np.dtype(dtypes["weight"]))
        node_attrs = {k: v.astype(np.dtype(dtypes[f"node:{k}"])) if f"node:{k}" in dtypes else v for k, v in node_attrs.items()}
        edge_attrs = {k: v.astype(np.dtype(dtypes[f"edge:{k}"])) if f"edge:{k}" in dtypes else v for k, v in edge_attrs.items()}
        return cls(
            layers=tuple(layers),
            node_units=units,
            src=src,
            dst=dst,
            weight=weight,
            edge_attrs=edge_attrs,
            node_attrs=node_attrs,
            meta=dict(meta),
        )

    # ------------------------------------------------------------------ basic views
    @property
    def num_nodes(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def node_ids(self) -> np.ndarray:
        """Node ids ``"<layer>:<unit>"``, shape (n_nodes,), in layer order then unit order."""
        if self._ids is None:
            ids = np.array(
                [f"{l.name}:{u}" for l, s in zip(self.layers, self._offsets[:-1]) for u in self.node_units[s : s + l.size]],
                dtype=str,
            )
            ids.setflags(write=False)
            object.__setattr__(self, "_ids", ids)
        return self._ids

    @property
    def node_layer(self) -> np.ndarray:
        """Layer position (index into ``layers``) of each node, shape (n_nodes,)."""
        return self._node_layer

    @property
    def node_labels(self) -> np.ndarray:
        """A readable label per node: the unit label if the layer has labels, else the node id."""
        out = self.node_ids.astype(object)
        for l, s in zip(self.layers, self._offsets[:-1]):
            if l.labels is not None:
                out[s : s + l.size] = l.labels
        return out.astype(str)

    def layer(self, name: str) -> Layer:
        """The layer called ``name``."""
        return self.layers[self.layer_position(name)]

    def layer_position(self, name: str) -> int:
        """Position of layer ``name`` in ``layers``."""
        try:
            return self._layer_pos[name]
        except KeyError:
            raise ConnectomeError(
                f"no layer {name!r} in this graph; layers are {_short_list(self.layer_names)}"
            ) from None

    def layer_slice(self, name: str) -> slice:
        """Global node indices of layer ``name`` as a slice."""
        i = self.layer_position(name)
        return slice(int(self._offsets[i]), int(self._offsets[i + 1]))

    def layer_of(self, node_id: str) -> Layer:
        """The Layer a node belongs to."""
        return self.layers[self._node_layer[self.index_of(node_id)]]

    def index_of(self, node_ids: str | Sequence[str] | np.ndarray) -> Any:
        """Global index of one node id (int) or of many (int array)."""
        if self._id_index is None:
            object.__setattr__(self, "_id_index", {s: i for i, s in enumerate(self.node_ids.tolist())})
        table = self._id_index
        if isinstance(node_ids, str):
            try:
                return table[node_ids]
            except KeyError:
                raise ConnectomeError(_unknown_node_message(self, node_ids)) from None
        out = np.empty(len(node_ids), dtype=np.int64)
        for k, s in enumerate(node_ids):
            try:
                out[k] = table[str(s)]
            except KeyError:
                raise ConnectomeError(_unknown_node_message(self, str(s))) from None
        return out

    def has_node(self, node_id: str) -> bool:
        """True when ``node_id`` is a node of this graph."""
        try:
            self.index_of(node_id)
        except ConnectomeError:
            return False
        return True

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst, weight)`` over global node indices, each shape (n_edges,), read-only."""
        return self.src, self.dst, self.weight

    def edge_attr(self, name: str) -> np.ndarray:
        """Edge column ``name`` (``"weight"`` or one of ``edge_attrs``), shape (n_edges,)."""
        if name == "weight":
            return self.weight
        try:
            return self.edge_attrs[name]
        except KeyError:
            raise ConnectomeError(
                f"no edge attribute {name!r}; this graph has {['weight', *self.edge_attrs]}"
            ) from None

    def node_attr(self, name: str, layer: str | None = None) -> np.ndarray:
        """Node column ``name`` over all nodes (or over the nodes of ``layer``)."""
        try:
            arr = self.node_attrs[name]
        except KeyError:
            raise ConnectomeError(
                f"no node attribute {name!r}; this graph has {sorted(self.node_attrs) or 'none'}"
            ) from None
        return arr if layer is None else arr[self.layer_slice(layer)]

    def edge_block(self, src_layer: str, dst_layer: str, attr: str = "weight") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges from ``src_layer`` to ``dst_layer`` as local positions ``(i, j, value)``."""
        a, b = self.layer_slice(src_layer), self.layer_slice(dst_layer)
        m = (self.src >= a.start) & (self.src < a.stop) & (self.dst >= b.start) & (self.dst < b.stop)
        return self.src[m] - a.start, self.dst[m] - b.start, self.edge_attr(attr)[m]

    def layer_pairs(self) -> list[tuple[str, str]]:
        """Connected ``(src_layer, dst_layer)`` pairs in order."""
        if not self.num_edges:
            return []
        key = np.unique(self._node_layer[self.src] * len(self.layers) + self._node_layer[self.dst])
        return [(self.layers[k // len(self.layers)].name, self.layers[k % len(self.layers)].name) for k in key]

    # ------------------------------------------------------------------ new graphs
    def _replace(self, **changes: Any) -> Connectome:
        fields = dict(
            layers=self.layers,
            node_units=self.node_units,
            src=self.src,
            dst=self.dst,
            weight=self.weight,
            edge_attrs=self.edge_attrs,
            node_attrs=self.node_attrs,
            meta=self.meta,
        )
        fields.update(changes)
        return Connectome(**fields)

    def with_node_attrs(self, **attrs: Any) -> Connectome:
        """A new graph with node attribute columns added or replaced (arrays over all nodes)."""
        new = dict(self.node_attrs)
        for k, v in attrs.items():
            new[k] = np.asarray(v).copy()
        return self._replace(node_attrs=new)

    def with_edge_attrs(self, **attrs: Any) -> Connectome:
        """A new graph with edge attribute columns added or replaced (arrays over all edges)."""
        new = dict(self.edge_attrs)
        for k, v in attrs.items():
            new[k] = np.asarray(v).copy()
        return self._replace(edge_attrs=new)

    def with_weight(self, weight: Any) -> Connectome:
        """A new graph with the same edges and new signed weights."""
        return self._replace(weight=np.asarray(weight).copy())

    def with_meta(self, **meta: Any) -> Connectome:
        """A new graph with ``meta`` updated."""
        return self._replace(meta={**self.meta, **meta})

    def with_labels(self, layer: str, labels: Sequence[str]) -> Connectome:
        """A new graph whose ``layer`` carries unit ``labels`` (e.g. class names)."""
        i = self.layer_position(layer)
        layers = list(self.layers)
        layers[i] = replace(layers[i], labels=tuple(labels))
        return self._replace(layers=tuple(layers))

    def _keep_edges(self, keep: np.ndarray) -> Connectome:
        return self._replace(
            src=self.src[keep],
            dst=self.dst[keep],
            weight=self.weight[keep],
            edge_attrs={k: v[keep] for k, v in self.edge_attrs.items()},
        )

    def prune(
        self,
        top_k: int | None = None,
        threshold: float | None = None,
        mass: float | None = None,
        by: str = "weight",
    ) -> Connectome:
        """Keep the strongest edges into each unit.

        Criteria given together must all hold.

        Parameters
        ----------
        top_k : int, optional
            Keep per target unit its ``top_k`` strongest inputs by ``|by|``.
        threshold : float, optional
            Keep edges with ``|by| >= threshold``.
        mass : float in (0, 1], optional
            Keep per target unit the smallest set of inputs holding ``mass`` of its total
            ``|incoming|`` (strongest first).
        by : str, default "weight"
            Edge column to rank by (e.g. ``"abs_weight"``).

        Returns
        -------
        Connectome
            Same nodes, fewer edges; ``meta["pruned"]`` records the criteria.
        """
        if top_k is None and threshold is None and mass is None:
            raise ValueError("prune needs top_k, threshold or mass")
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        top_k = int(top_k) if top_k is not None else None
        if mass is not None and not (0 < mass <= 1):
            raise ValueError(f"mass must be in (0, 1], got {mass!r}")
        a = np.abs(np.asarray(self.edge_attr(by), dtype=np.float64))
        keep = np.ones(self.num_edges, dtype=bool)
        if threshold is not None:
            keep &= a >= threshold
        if (top_k is not None or mass is not None) and self.num_edges:
            keep &= self._per_target_selection(a, top_k, mass)
        out = self._keep_edges(keep)
        crit = {k: v for k, v in (("top_k", top_k), ("threshold", threshold), ("mass", mass)) if v is not None}
        return out.with_meta(pruned={**crit, "by": by, "kept_edges": int(keep.sum()), "of_edges": self.num_edges})

    def _per_target_selection(self, a: np.ndarray, top_k: int | None, mass: float | None) -> np.ndarray:
        """Edges kept by ``top_k`` / ``mass`` among each target unit's inputs, ranked by ``a``.

        Edges are stored sorted by target, so each unit's inputs are a contiguous run. Runs
        of equal length (every unit of a conv layer has the same fan-in) are ranked together
        as rows of one matrix: sorting many short rows is several times faster than one
        global two-key sort. Ties keep source order.
        """
        n = self.num_edges
        starts = np.r_[0, np.flatnonzero(self.dst[1:] != self.dst[:-1]) + 1]
        sizes = np.diff(np.r_[starts, n])
        keep = np.zeros(n, dtype=bool)
        for d in np.unique(sizes):
            idx = starts[sizes == d][:, None] + np.arange(d)[None, :]
            vals = a[idx]
            order = np.argsort(-vals, axis=1, kind="stable")
            sel = np.ones(order.shape, dtype=bool)
            if top_k is not None:
                sel[:, top_k:] = False
            if mass is not None:
                s = np.take_along_axis(vals, order, axis=1)
                csum = np.cumsum(s, axis=1)
                total = csum[:, -1:]
                # an edge is kept while the mass before it is still short of the goal
                sel &= ((csum - s) < mass * total * (1 - 1e-12)) & (total > 0)
            keep[np.take_along_axis(idx, order, axis=1)[sel]] = True
        return keep

    def subgraph(self, node_ids: Iterable[str] | np.ndarray) -> Connectome:
        """The graph induced on ``node_ids`` (node ids stay as they are).

        Layers left with no node are dropped; node order stays layer order, then unit.
        """
        idx = np.unique(self.index_of(list(node_ids)))
        return self._induced(idx)

    def _induced(self, idx: np.ndarray) -> Connectome:
        mask = np.zeros(self.num_nodes, dtype=bool)
        mask[idx] = True
        new_index = np.cumsum(mask) - 1
        layers = []
        for l, s in zip(self.layers, self._offsets[:-1]):
            m = mask[s : s + l.size]
            if not m.any():
                continue
            labels = tuple(np.asarray(l.labels)[m]) if l.labels is not None else None
            layers.append(replace(l, size=int(m.sum()), labels=labels))
        if not layers:
            raise EmptyGraphError("the subgraph has no nodes; pass node ids that are in the graph")
        ekeep = mask[self.src] & mask[self.dst]
        return Connectome(
            layers=tuple(layers),
            node_units=self.node_units[mask],
            src=new_index[self.src[ekeep]],
            dst=new_index[self.dst[ekeep]],
            weight=self.weight[ekeep],
            edge_attrs={k: v[ekeep] for k, v in self.edge_attrs.items()},
            node_attrs={k: v[mask] for k, v in self.node_attrs.items()},
            meta=dict(self.meta),
        )

    def layer_subgraph(self, layer_names: Iterable[str]) -> Connectome:
        """The graph induced on all units of the named layers."""
        names = list(layer_names)
        idx = np.concatenate([np.arange(self.layer_slice(n).start, self.layer_slice(n).stop) for n in names]) if names else np.zeros(0, np.int64)
        if idx.size == 0:
            raise EmptyGraphError("layer_subgraph needs at least one non-empty layer")
        return self._induced(np.unique(idx))

    def contract(self, layer_names: Iterable[str]) -> Connectome:
        """A coarser graph whose layers are the named ones, with flow conserved.

        Each unit of a dropped layer passes its inflow on to its outputs in proportion to
        its outgoing edges (``E_out / sum E_out``), so what reaches the kept units from
        each kept source sums, over all paths, the flow that went through dropped units.
        Edges between kept layers stay as they are. The first and last layers of the graph
        are always kept. Node attributes of kept units stay; ``bias_attribution`` of
        dropped units is passed on in the same proportions so that conservation still
        holds on the coarse graph. Flows are signed: where a dropped unit's outgoing flows
        nearly cancel, the proportions are large and single coarse edges can exceed every
        fine edge, although sums stay exact. Edge columns other than ``weight`` (such as
        ``abs_weight``) do not split this way and are dropped.

        Parameters
        ----------
        layer_names : iterable of str
            Layers to keep (any order; graph order is used).

        Returns
        -------
        Connectome
        """
        from scipy import sparse

        keep_names = set(layer_names)
        for name in keep_names:
            self.layer_position(name)
        keep_names |= {self.layers[0].name, self.layers[-1].name}
        n = self.num_nodes
        kept_mask = np.isin(self._node_layer, [self._layer_pos[k] for k in keep_names])
        kept_idx = np.flatnonzero(kept_mask)
        col_of = np.full(n, -1, dtype=np.int64)
        col_of[kept_idx] = np.arange(kept_idx.size)
        bias = self.node_attrs.get("bias_attribution")
        bias = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
        w = self.weight.astype(np.float64)
        outflow = np.zeros(n)
        np.add.at(outflow, self.src, w)
        share = np.divide(1.0, outflow, out=np.zeros(n), where=outflow != 0)
        inc = sparse.csr_matrix((w, (self.dst, self.src)), shape=(n, n))
        ncols = kept_idx.size + 1  # kept sources, then one column of passed-on bias terms
        # Per dropped layer: rows = its units, columns = where their flow came from.
        comp: dict[int, sparse.csr_matrix] = {}
        rows, cols, vals = [], [], []
        extra_bias = np.zeros(n)
        for li, l in enumerate(self.layers):
            s, e = int(self._offsets[li]), int(self._offsets[li + 1])
            block = inc[s:e].tocoo()
            direct = kept_mask[block.col]
            contrib = sparse.csr_matrix(
                (block.data[direct], (block.row[direct], col_of[block.col[direct]])), shape=(e - s, ncols)
            )
            for lj, cm in comp.items():
                ls, le = int(self._offsets[lj]), int(self._offsets[lj + 1])
                sub = inc[s:e, ls:le]
                if sub.nnz:
                    contrib = contrib + sub @ sparse.diags(share[ls:le]) @ cm
            if l.name in keep_names:
                c = contrib.tocoo()
                edge = c.col < kept_idx.size
                rows.append(c.row[edge] + s)
                cols.append(kept_idx[c.col[edge]])
                vals.append(c.data[edge])
                np.add.at(extra_bias, c.row[~edge] + s, c.data[~edge])
            else:
                own = sparse.csr_matrix((bias[s:e], (np.arange(e - s), np.full(e - s, ncols - 1))), shape=(e - s, ncols))
                comp[li] = (contrib + own).tocsr()
        src = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        dst = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        wv = np.concatenate(vals) if vals else np.zeros(0)
        key = dst * n + src
        uniq, inv = np.unique(key, return_inverse=True)
        wsum = np.zeros(uniq.size)
        np.add.at(wsum, inv, wv)
        new_index = np.cumsum(kept_mask) - 1
        node_attrs = {k: v[kept_mask] for k, v in self.node_attrs.items()}
        if "bias_attribution" in self.node_attrs:
            # Bias terms of dropped units reach kept units with the flow that carries them.
            node_attrs["bias_attribution"] = (bias + extra_bias)[kept_mask]
        return Connectome(
            layers=tuple(l for l in self.layers if l.name in keep_names),
            node_units=self.node_units[kept_mask],
            src=new_index[uniq % n],
            dst=new_index[uniq // n],
            weight=wsum.astype(self.weight.dtype),
            node_attrs=node_attrs,
            meta={**self.meta, "contracted_to": [l.name for l in self.layers if l.name in keep_names]},
        )

    # ------------------------------------------------------------------ converters
    def to_networkx(self) -> networkx.DiGraph:
        """A ``networkx.DiGraph`` with every node and edge attribute, ready for networkx.

        Nodes are node ids with attributes ``layer``, ``index`` (unit), ``kind``, ``label``
        and every node attribute column. Edge ``weight`` is ``|w|``, so networkx algorithms
        that read ``weight`` (PageRank, shortest paths, Louvain) work as they are; the signed
        value is ``signed_weight`` (the Gephi export's convention), and every edge column
        travels too. ``G.graph`` holds ``layers``, ``meta`` and ``dtypes`` as JSON strings,
        which ``nx.write_graphml`` and ``nx.write_gexf`` accept, and from which
        :meth:`from_networkx` restores the graph exactly.

        networkx holds a Python dict per edge (about 350 bytes): a graph of more than
        ``NX_WARN_EDGES`` edges warns first with the memory it will take. Prune first
        (``g.prune(top_k=8).to_networkx()``), or use :meth:`to_igraph`.

        Raises
        ------
        ConnectomeError
            An edge column named ``signed_weight`` (it would collide with the signed weight).
        """
        import networkx as nx

        if "signed_weight" in self.edge_attrs:
            raise ConnectomeError("edge column 'signed_weight' collides with the signed weight to_networkx writes; "
                                  "rename it with with_edge_attrs")
        m = self.num_edges
        if m > NX_WARN_EDGES:
            warnings.warn(
                f"to_networkx: {m:,} edges become about {m * 350 / 1e9:.1f} GB of Python objects and take "
                f"a minute or more; prune first (g.prune(top_k=8).to_networkx()) or use g.to_igraph()",
                ResourceWarning, stacklevel=2)
        G = nx.DiGraph()
        G.graph["layers"] = json.dumps([l.to_dict() for l in self.layers])
        G.graph["meta"] = json.dumps(self.meta)
        # dtypes travel so that from_networkx restores float32 weights, int communities, bools
        G.graph["dtypes"] = json.dumps({
            "weight": self.weight.dtype.str,
            **{f"node:{k}": v.dtype.str for k, v in self.node_attrs.items()},
            **{f"edge:{k}": v.dtype.str for k, v in self.edge_attrs.items()},
        })
        ids = self.node_ids.tolist()
        names = np.array(self.layer_names, dtype=object)
        kinds = np.array([l.kind for l in self.layers], dtype=object)
        ncols = {"layer": names[self._node_layer].tolist(), "index": self.node_units.tolist(),
                 "kind": kinds[self._node_layer].tolist(), "label": self.node_labels.tolist(),
                 **{k: v.tolist() for k, v in self.node_attrs.items()}}
        G.add_nodes_from(zip(ids, _dict_rows(list(ncols), list(ncols.values()))))
        if not m:
            return G
        w = self.weight
        ecols = {"weight": np.abs(w).tolist(), "signed_weight": w.tolist(),
                 **{k: v.tolist() for k, v in self.edge_attrs.items()}}
        data = _dict_rows(list(ecols), list(ecols.values()))
        del ecols
        # networkx's own add_edges_from copies every attribute dict and checks both ends of
        # every edge; filling its adjacency dicts (succ[u][v] is pred[v][u], one dict) run by
        # run is about 3x faster. A fresh DiGraph has no cached views to invalidate.
        id_arr = np.array(ids, dtype=object)
        n = self.num_nodes
        src_ids = id_arr[self.src].tolist()
        cut = np.searchsorted(self.dst, np.arange(n + 1)).tolist()  # edges are sorted by dst
        pred = G._pred
        for v in np.flatnonzero(np.diff(cut)).tolist():
            a, b = cut[v], cut[v + 1]
            pred[ids[v]].update(zip(src_ids[a:b], data[a:b]))
        del src_ids
        order = np.argsort(self.src, kind="stable")
        cut = np.searchsorted(self.src[order], np.arange(n + 1)).tolist()
        dst_ids = id_arr[self.dst[order]].tolist()
        data = [data[i] for i in order.tolist()]
        succ = G._succ
        for u in np.flatnonzero(np.diff(cut)).tolist():
            a, b = cut[u], cut[u + 1]
            succ[ids[u]].update(zip(dst_ids[a:b], data[a:b]))
        return G

    def to_igraph(self) -> igraph.Graph:
        """An ``igraph.Graph`` (directed) with vertex ``name`` = node id and every attribute.

        Vertex ``i`` is node ``i`` and edge ``e`` is edge ``e`` of this graph, so arrays
        aligned with ``node_ids`` or the edge arrays index igraph's directly. Vertices carry
        ``name``, ``layer``, ``index``, ``label`` and every node attribute. Edge ``weight`` is
        ``|w|`` (what igraph's weighted algorithms expect), ``signed_weight`` the signed
        value, and every edge column travels; graph attributes ``layers`` and ``meta`` are
        JSON strings. The topology is built once per edge structure and copied (in C), so
        converting several graphs of one model costs one build.

        Raises
        ------
        ConnectomeError
            An edge column named ``signed_weight``.
        """
        from connectome._igraph import topology

        if "signed_weight" in self.edge_attrs:
            raise ConnectomeError("edge column 'signed_weight' collides with the signed weight to_igraph writes; "
                                  "rename it with with_edge_attrs")
        G = topology(self).copy()
        G.vs["name"] = self.node_ids.tolist()
        names = np.array(self.layer_names, dtype=object)
        G.vs["layer"] = names[self._node_layer].tolist()
        G.vs["index"] = self.node_units.tolist()
        G.vs["label"] = self.node_labels.tolist()
        for k, v in self.node_attrs.items():
            G.vs[k] = v.tolist()
        G.es["weight"] = np.abs(self.weight).tolist()
        G.es["signed_weight"] = self.weight.tolist()
        for k, v in self.edge_attrs.items():
            G.es[k] = v.tolist()
        G["layers"] = json.dumps([l.to_dict() for l in self.layers])
        G["meta"] = json.dumps(self.meta)
        return G

    def to_scipy(self, attr: str = "weight", absolute: bool = False):
        """The edges as a ``scipy.sparse.csr_matrix`` of shape (n_nodes, n_nodes), ``[src, dst]``."""
        from scipy import sparse

        v = np.asarray(self.edge_attr(attr), dtype=np.float64)
        if absolute:
            v = np.abs(v)
        return sparse.csr_matrix((v, (self.src, self.dst)), shape=(self.num_nodes, self.num_nodes))

    # ------------------------------------------------------------------ files
    def save(self, path: PathLike) -> None:
        """Write the graph to one ``.npz`` file, atomically (see :func:`connectome.io.save`)."""
        npzformat.save(self, path)

    @classmethod
    def from_npz(cls, path: PathLike, *, stacklevel: int = 1) -> Connectome:
        """The graph in one ``.npz`` file written by :meth:`save` (see :func:`connectome.io.load`).

        ``stacklevel`` names the frame a warning about non-finite values points at: 1 is the
        caller of this method, 2 its caller, and so on.

        Raises
        ------
        BadFileError
            The file is missing, not an ``.npz``, truncated, damaged, or not a connectome.
        """
        ps = str(path)
        parts = npzformat.read_parts(path)
        try:
            g = cls(**parts)
        except (ConnectomeError, TypeError, ValueError) as exc:
            raise BadFileError(f"{ps!r} holds inconsistent arrays ({npzformat.one_line(exc)}); the file is damaged") from None
        npzformat.warn_non_finite(g, ps, stacklevel=stacklevel + 2)
        return g

    # ------------------------------------------------------------------ comparisons, repr
    def equals(self, other: Connectome, exact: bool = True) -> bool:
        """True when both graphs hold the same layers, nodes, edges, attributes and meta."""
        if not isinstance(other, Connectome):
            return False
        if self.layers != other.layers or json.dumps(self.meta, sort_keys=True) != json.dumps(other.meta, sort_keys=True):
            return False
        if set(self.node_attrs) != set(other.node_attrs) or set(self.edge_attrs) != set(other.edge_attrs):
            return False
        pairs = [(self.node_units, other.node_units), (self.src, other.src), (self.dst, other.dst), (self.weight, other.weight)]
        pairs += [(v, other.node_attrs[k]) for k, v in self.node_attrs.items()]
        pairs += [(v, other.edge_attrs[k]) for k, v in self.edge_attrs.items()]
        for a, b in pairs:
            if a.shape != b.shape:
                return False
            if exact and (a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f")):
                return False
            if not exact and not np.allclose(a, b, equal_nan=True):
                return False
        return True

    def __repr__(self) -> str:
        lines = [f"Connectome({self.num_nodes} units in {len(self.layers)} layers, {self.num_edges} edges)"]
        shown = self.layers if len(self.layers) <= 12 else self.layers[:6] + self.layers[-5:]
        width = max((len(l.name) for l in shown), default=0)
        for i, l in enumerate(shown):
            if len(self.layers) > 12 and i == 6:
                lines.append(f"  ... {len(self.layers) - 11} more layers ...")
            lines.append(f"  {l.name:<{width}}  {l.kind:<8} {l.size:>6} units")
        if self.node_attrs:
            lines.append(f"  node attributes: {', '.join(_numbered_runs(sorted(self.node_attrs)))}")
        if self.edge_attrs:
            lines.append(f"  edge attributes: {', '.join(sorted(self.edge_attrs))}")
        keys = [k for k in ("model", "method", "target", "category", "n_images") if k in self.meta]
        if keys:
            lines.append("  meta: " + ", ".join(f"{k}={self.meta[k]}" for k in keys))
        return "\n".join(lines)

    def __len__(self) -> int:
        return self.num_nodes


def _numbered_runs(names: list[str]) -> list[str]:
    """``x_0, x_1, ..., x_15`` shown as ``x_0..15`` (the k columns of the dataset examples)."""
    runs: dict[str, list[int]] = {}
    for n in names:
        stem, _, j = n.rpartition("_")
        if stem and j.isdigit():
            runs.setdefault(stem, []).append(int(j))
    out = []
    for n in names:
        stem, _, j = n.rpartition("_")
        if stem and j.isdigit() and len(runs[stem]) > 2:
            if int(j) == min(runs[stem]):
                out.append(f"{stem}_{min(runs[stem])}..{max(runs[stem])}")
            continue
        out.append(n)
    return out


_CHUNK = 1 << 16  # edges per step of the order check: its temporaries stay in cache
# Read-only edge arrays already found canonical, by identity (with the layer sizes they were
# checked against): graphs that share them (with_meta, subgraphs of one extraction, every
# graph of one traced model) skip the check. An entry goes when its arrays are collected.
_CANONICAL: dict[tuple[int, int], tuple[Any, Any, bytes]] = {}


def is_canonical(src: np.ndarray, dst: np.ndarray, offsets: np.ndarray, remember: bool = False) -> bool:
    """Edges strictly increasing in ``(dst, src)``, every ``src`` in an earlier layer than its ``dst``.

    True means the graph's edge arrays need no sort and pass every endpoint check. With
    ``remember``, read-only arrays that pass are recorded, and later calls on the same
    arrays and layer sizes answer at once.
    """
    key = (id(src), id(dst))
    hit = _CANONICAL.get(key)
    if hit is not None and hit[0]() is src and hit[1]() is dst and hit[2] == offsets.tobytes():
        return True
    ok = _check_canonical(src, dst, offsets)
    if ok and remember:
        _remember_canonical(src, dst, offsets)
    return ok


def _frozen_memory(a: np.ndarray) -> bool:
    """No array reaching ``a``'s memory can write it (its owner and every view between are read-only)."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None


def _remember_canonical(src: np.ndarray, dst: np.ndarray, offsets: np.ndarray) -> None:
    if not (_frozen_memory(src) and _frozen_memory(dst)):
        return
    key = (id(src), id(dst))
    hit = _CANONICAL.get(key)
    if hit is not None and hit[0]() is src and hit[1]() is dst:
        _CANONICAL[key] = (hit[0], hit[1], offsets.tobytes())  # one finalizer per entry, not per graph
        return
    _CANONICAL[key] = (weakref.ref(src), weakref.ref(dst), offsets.tobytes())
    weakref.finalize(src, _CANONICAL.pop, key, None)


def _check_canonical(src: np.ndarray, dst: np.ndarray, offsets: np.ndarray) -> bool:
    m, n = src.shape[0], int(offsets[-1])
    if m == 0:
        return True
    if dst.shape != src.shape or int(dst[0]) < 0 or int(dst[-1]) >= n:
        return False
    for a in range(0, m, _CHUNK):
        d = dst[a : a + _CHUNK + 1]
        if d.size > 1 and not (d[1:] >= d[:-1]).all():
            return False
    # dst is sorted: the edges into layer L are one run; their sources must lie in [0, start of L)
    bounds = np.searchsorted(dst, offsets)
    for li in range(len(offsets) - 1):
        e0, e1 = int(bounds[li]), int(bounds[li + 1])
        if e1 > e0 and (int(src[e0:e1].min()) < 0 or int(src[e0:e1].max()) >= int(offsets[li])):
            return False
    for a in range(0, m, _CHUNK):
        key = dst[a : a + _CHUNK + 1] * n
        key += src[a : a + _CHUNK + 1]
        if key.size > 1 and not (key[1:] > key[:-1]).all():
            return False
    return True


def _owned(a: Any, dtype: Any = None) -> np.ndarray:
    """A flat array the graph owns: read-only arrays (another graph's) are shared, anything
    the caller could still write to is copied, so the graph cannot change behind its back."""
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.flags.writeable or (isinstance(a, np.ndarray) and a.flags.writeable):
        arr = arr.copy()
    return arr


def _dict_rows(keys: list[str], cols: list[list[Any]]) -> list[dict[str, Any]]:
    """One dict per row of the columns ``cols`` under ``keys``.

    A comprehension with a dict display (``{"weight": c0, ...}``) builds the dicts about
    twice as fast as ``dict(zip(keys, row))``, which matters at millions of edges; it is
    compiled for the given keys, each written as a literal with ``repr``.
    """
    names = [f"c{i}" for i in range(len(keys))]
    body = ", ".join(f"{k!r}: {n}" for k, n in zip(keys, names))
    code = f"lambda cols: [{{{body}}} for {', '.join(names)}, in zip(*cols)]"
    return eval(code, {"zip": zip})(cols)  # noqa: S307 - keys are repr'd string literals


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, bool, np.integer, np.floating, np.bool_))


def _short_list(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    if len(items) <= n:
        return repr(items)
    return repr(items[: n // 2])[:-1] + ", ..., " + repr(items[-n // 2 :])[1:]


def _unknown_node_message(g: Connectome, node_id: str) -> str:
    lname, _, unit = node_id.rpartition(":")
    if lname in g._layer_pos:
        l = g.layer(lname)
        return f"no node {node_id!r}: layer {lname!r} has units {g.node_units[g.layer_slice(lname)][:1].tolist()}..{g.node_units[g.layer_slice(lname)][-1:].tolist()} ({l.size} present)"
    return f"no node {node_id!r}: node ids are '<layer>:<unit>' and the layers are {_short_list(g.layer_names)}"
