"""Read GraphML and GEXF files back into a Connectome, as Gephi (or connectome) wrote them.

Gephi users filter, edit and analyse a graph there and save it again. What comes back is
the graph they saw: the nodes and edges left, Gephi's own columns (``modularity_class``,
``Degree`` ...) beside ours, positions and colours of its layout. This module keeps the
wiring and every numeric column and drops the drawing:

- node ids are ``"<layer>:<unit>"`` or carry ``layer`` and ``index`` columns (both as written
  by :func:`connectome.io.write_graphml` / ``write_gexf``);
- the order of the layers, which Gephi does not keep, is the order the edges impose (every
  edge goes forward), ties broken by the nodes' mean ``x`` (the exported layout puts layer
  ``i`` at ``x = 200 i``) and then by the order of first appearance;
- the signed edge weight is ``signed_weight`` when present (Gephi needs ``weight >= 0``
  and the exports write ``|w|`` there), else ``weight``;
- ``label`` restores unit labels (the class names of the output layer), ``kind`` the layer
  kinds; ``x, y, z, size, r, g, b`` and the GEXF ``viz`` block are Gephi's, not data;
- ``meta`` is read back from connectome's own files (JSON in the GraphML graph data).

Gephi 0.9 and later write GEXF 1.3 under ``http://www.gexf.net/1.3``, a namespace networkx's
reader does not know (it expects ``http://gexf.net/1.3``); :func:`read_gexf` reads both.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from connectome.errors import BadFileError, ConnectomeError
from connectome.graph import Connectome

__all__ = ["read_graphml", "read_gexf", "read"]

#: Node keys that describe the drawing, not the unit.
DRAWING_KEYS = frozenset({"x", "y", "z", "size", "r", "g", "b", "viz", "label", "Label", "id", "Id"})
#: Edge keys Gephi adds that are not data.
EDGE_SKIP = frozenset({"id", "Id", "label", "Label", "Edge Label", "Edge Id", "edgelabel", "edgeid", "key"})


def read_graphml(path: Any) -> Connectome:
    """A Connectome from a GraphML file written by Gephi or by :func:`connectome.io.write_graphml`.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    Connectome
        Nodes in layer order then unit order; ``meta["read_from"]`` names the file.

    Raises
    ------
    BadFileError
        The file is missing or not GraphML.
    ConnectomeError
        Node ids that are not ``"<layer>:<unit>"`` (and no ``layer``/``index`` columns), or
        edges that cannot be put in a forward layer order.
    """
    import networkx as nx

    p = _existing(path)
    try:
        G = nx.read_graphml(p)
    except Exception as exc:  # ElementTree, networkx and key errors all mean "not our GraphML"
        raise BadFileError(f"cannot read {str(p)!r} as GraphML ({type(exc).__name__}: {exc})") from None
    return _from_gephi(G, p)


def read_gexf(path: Any) -> Connectome:
    """A Connectome from a GEXF file written by Gephi (GEXF 1.1 to 1.3) or by ``write_gexf``.

    See :func:`read_graphml` for what is kept; raises the same errors.
    """
    import networkx as nx

    p = _existing(path)
    data = p.read_bytes()
    # Gephi's GEXF 1.3 namespace, which networkx spells without "www."
    data = data.replace(b"http://www.gexf.net/1.3", b"http://gexf.net/1.3")
    try:
        G = nx.read_gexf(io.BytesIO(data))
    except Exception as exc:
        raise BadFileError(f"cannot read {str(p)!r} as GEXF ({type(exc).__name__}: {exc})") from None
    return _from_gephi(G, p)


def read(path: Any) -> Connectome:
    """:func:`read_graphml` or :func:`read_gexf`, by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".graphml":
        return read_graphml(path)
    if suffix == ".gexf":
        return read_gexf(path)
    raise ValueError(f"cannot tell the format of {str(path)!r}; name it .graphml or .gexf, or call read_graphml/read_gexf")


def _existing(path: Any) -> Path:
    p = Path(path)
    if not p.is_file():
        raise BadFileError(f"{str(p)!r} does not exist or is not a file")
    return p


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _from_gephi(G: Any, path: Path) -> Connectome:
    import networkx as nx

    if G.is_multigraph():  # networkx reads GEXF as a multigraph; a connectome has one edge per pair
        G = nx.DiGraph(G)
    if not G.is_directed():
        raise ConnectomeError(f"{str(path)!r} holds an undirected graph; a connectome's edges have a direction "
                              "(export it from Gephi as directed)")
    where: dict[Any, tuple[str, int]] = {}
    for n, d in G.nodes(data=True):
        if "layer" in d and "index" in d:
            where[n] = (str(d["layer"]), int(d["index"]))
            continue
        lname, sep, unit = str(n).rpartition(":")
        if not sep or not unit.lstrip("-").isdigit():
            raise ConnectomeError(f"node {n!r} of {str(path)!r} has no 'layer'/'index' columns and its id is not "
                                  "'<layer>:<unit>'; was the file written by connectome?")
        where[n] = (lname, int(unit))
    order = _layer_order(G, where, path)

    # A clean graph for from_networkx: data columns only, the inferred layers as its spec.
    H = nx.DiGraph()
    kinds: dict[str, str] = {}
    labels: dict[str, dict[int, str]] = {}
    int_cols: dict[str, bool] = {}
    for n, d in G.nodes(data=True):
        lname, unit = where[n]
        if "kind" in d:
            kinds.setdefault(lname, str(d["kind"]))
        label = d.get("label")
        if label is not None and str(label) != f"{lname}:{unit}":
            labels.setdefault(lname, {})[unit] = str(label)
        attrs = {"layer": lname, "index": unit}
        for k, v in d.items():
            if k in DRAWING_KEYS or k in ("layer", "index", "kind") or not _number(v):
                continue
            attrs[k] = v
            int_cols[k] = int_cols.get(k, True) and isinstance(v, (int, np.integer))
        H.add_node(f"{lname}:{unit}", **attrs)
    counts = {name: 0 for name in order}
    for lname, _ in where.values():
        counts[lname] += 1
    spec = []
    for name in order:
        lab = labels.get(name)
        units = sorted(u for (ln, u) in where.values() if ln == name)
        full = lab is not None and len(lab) == len(units) and counts[name] == len(units)
        spec.append({"name": name, "kind": kinds.get(name, "other"), "size": counts[name],
                     "labels": [lab[u] for u in units] if full else None})
    for u, v, d in G.edges(data=True):
        attrs = {k: val for k, val in d.items() if k not in EDGE_SKIP and _number(val)}
        H.add_edge(f"{where[u][0]}:{where[u][1]}", f"{where[v][0]}:{where[v][1]}", **attrs)
    meta = G.graph.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["read_from"] = str(path)
    H.graph["layers"] = json.dumps(spec)
    H.graph["meta"] = json.dumps(meta)
    # whole-number columns (community, modularity_class, in_circuit written as long) stay integers
    H.graph["dtypes"] = json.dumps({f"node:{k}": "<i8" for k, is_int in int_cols.items() if is_int})
    try:
        return Connectome.from_networkx(H)
    except ConnectomeError as exc:
        raise ConnectomeError(f"{str(path)!r}: {exc}") from None


def _layer_order(G: Any, where: dict[Any, tuple[str, int]], path: Path) -> list[str]:
    """Layers in an order every edge goes forward in; ties by mean x, then first appearance."""
    import heapq

    first: dict[str, int] = {}
    xs: dict[str, list[float]] = {}
    for i, (n, d) in enumerate(G.nodes(data=True)):
        lname = where[n][0]
        first.setdefault(lname, i)
        x = d.get("x")
        if x is None and isinstance(d.get("viz"), dict):  # GEXF: <viz:position x=...>
            x = d["viz"].get("position", {}).get("x")
        if _number(x):
            xs.setdefault(lname, []).append(float(x))
    mean_x = {k: float(np.mean(v)) for k, v in xs.items()}
    succ: dict[str, set[str]] = {k: set() for k in first}
    indeg = {k: 0 for k in first}
    for u, v in G.edges():
        a, b = where[u][0], where[v][0]
        if a != b and b not in succ[a]:
            succ[a].add(b)
            indeg[b] += 1
    same = [(u, v) for u, v in G.edges() if where[u][0] == where[v][0]]
    if same:
        u, v = same[0]
        raise ConnectomeError(f"{str(path)!r} has an edge inside layer {where[u][0]!r} ({u} -> {v}); a connectome's "
                              "edges go from one layer to a later one")

    def key(name: str) -> tuple[float, int, str]:
        return (mean_x.get(name, np.inf), first[name], name)

    heap = [key(k) for k, deg in indeg.items() if deg == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        name = heapq.heappop(heap)[2]
        order.append(name)
        for b in succ[name]:
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(heap, key(b))
    if len(order) < len(first):
        stuck = sorted(set(first) - set(order))[:4]
        raise ConnectomeError(f"{str(path)!r}: the edges between layers {stuck} form a cycle, so no layer order "
                              "makes every edge go forward")
    return order
