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
from xml.etree import ElementTree
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from connectome.errors import BadFileError, ConnectomeError
from connectome.graph import Connectome, Layer
from connectome.io import warn_non_finite

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
    p = _existing(path)
    try:
        tables = _graphml_tables(p)
    except (ElementTree.ParseError, ValueError, KeyError) as exc:
        raise BadFileError(f"cannot read {str(p)!r} as GraphML ({type(exc).__name__}: {exc})") from None
    return _from_tables(*tables, p)


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
        # networkx merges a repeated node id and invents the nodes an edge names but the file
        # does not declare: the ids are checked on the file itself first
        _check_ids(*_gexf_ids(data), p)
        G = nx.read_gexf(io.BytesIO(data))
    except BadFileError:
        raise
    except Exception as exc:  # ElementTree, networkx and value errors all mean "not a GEXF file"
        raise BadFileError(f"cannot read {str(p)!r} as GEXF ({type(exc).__name__}: {exc})") from None
    return _from_tables(G.is_directed(), dict(G.graph), list(G.nodes(data=True)), list(G.edges(data=True)), p)


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
    return isinstance(v, (int, float, bool, np.integer, np.floating, np.bool_))


_GRAPHML_TYPES = {"int": int, "long": int, "integer": int, "float": float, "double": float,
                  "boolean": lambda t: t.strip().lower() in ("true", "1"), "string": str}


def _graphml_tables(path: Path) -> tuple[bool, dict[str, Any], list[tuple[str, dict]], list[tuple[str, str, dict]]]:
    """(directed, graph data, nodes, edges) of a GraphML file, read in one streaming pass.

    networkx's reader builds its graph element by element and costs three times the parse
    itself; a connectome needs only the tables. Typed keys with their defaults, as the
    GraphML specification defines them; nested graphs and hyperedges are refused.
    """
    keys: dict[str, tuple[str, str, Any, Any]] = {}  # id -> (for, name, convert, default)
    directed = True
    graph_data: dict[str, Any] = {}
    nodes: list[tuple[str, dict]] = []
    edges: list[tuple[str, str, dict]] = []
    graphs = 0
    for _, el in ElementTree.iterparse(path, events=("end",)):
        tag = el.tag.rpartition("}")[2]
        if tag == "data":
            continue  # read with the element that holds it
        if tag in ("node", "edge"):
            data = {}
            for c in el:
                if c.tag.rpartition("}")[2] == "data":
                    _, name, conv, _ = keys[c.get("key")]
                    data[name] = conv(c.text or "")
            for kfor, name, _, default in keys.values():
                if default is not None and kfor in (tag, "all") and name not in data:
                    data[name] = default
            if tag == "node":
                nodes.append((el.get("id"), data))
            else:
                if el.get("directed") == "false":
                    directed = False
                edges.append((el.get("source"), el.get("target"), data))
            el.clear()  # the tree is not needed: memory stays flat on large files
        elif tag == "key":
            default = next((c.text or "" for c in el if c.tag.rpartition("}")[2] == "default"), None)
            conv = _GRAPHML_TYPES.get(el.get("attr.type", "string"), str)
            keys[el.get("id")] = (el.get("for", "all"), el.get("attr.name", el.get("id")), conv,
                                  None if default is None else conv(default))
        elif tag == "graph":
            graphs += 1
            if graphs > 1:
                raise ValueError("nested or several graphs are not supported")
            directed = directed and el.get("edgedefault", "directed") == "directed"
            for c in el:
                if c.tag.rpartition("}")[2] == "data" and c.get("key") in keys:
                    kfor, name, conv, _ = keys[c.get("key")]
                    if kfor in ("graph", "all"):
                        graph_data[name] = conv(c.text or "")
            el.clear()
        elif tag in ("hyperedge", "port"):
            raise ValueError(f"GraphML {tag}s are not supported")
    if not graphs:
        raise ValueError("no graph element")
    return directed, graph_data, nodes, edges


def _from_tables(directed: bool, graph_data: dict[str, Any], node_rows: list[tuple[Any, dict]],
                 edge_rows: list[tuple[Any, Any, dict]], path: Path) -> Connectome:
    try:
        g = _tables_to_graph(directed, graph_data, node_rows, edge_rows, path)
    except (ValueError, TypeError, OverflowError) as exc:
        # a column value of the wrong type (index "a", weight "x") or out of any range (index 1e400)
        raise BadFileError(f"cannot read {str(path)!r}: a value of the wrong type ({exc}); "
                           "was it edited by hand? export it again from Gephi or connectome") from None
    warn_non_finite(g, str(path), stacklevel=4)
    return g


def _check_ids(node_ids: Iterable[Any], edges: Iterable[tuple[Any, Any]], path: Path) -> None:
    """Each node declared once, each edge between declared nodes; else one BadFileError naming the id."""
    declared: set[Any] = set()
    for n in node_ids:
        if n in declared:
            raise BadFileError(f"{str(path)!r} declares node {_clip(n)} twice; node ids must be unique "
                               "(was it edited by hand? export it again from Gephi or connectome)")
        declared.add(n)
    for u, v in edges:
        for end in (u, v):
            if end not in declared:
                raise BadFileError(f"{str(path)!r} has an edge {_clip(u)} -> {_clip(v)} to node {_clip(end)}, "
                                   "which the file does not declare; every edge must join two of its nodes "
                                   "(export it again)")


def _gexf_ids(data: bytes) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """The node ids (in file order, repeats kept) and edge endpoints of a GEXF document."""
    nodes: list[Any] = []
    edges: list[tuple[Any, Any]] = []
    for _, el in ElementTree.iterparse(io.BytesIO(data), events=("end",)):
        tag = el.tag.rpartition("}")[2]
        if tag == "node":
            nodes.append(el.get("id"))
        elif tag == "edge":
            edges.append((el.get("source"), el.get("target")))
        else:
            continue
        el.clear()
    return nodes, edges


#: Units are int64 in a Connectome.
_UNIT_RANGE = (-(1 << 63), 1 << 63)


def _unit(value: Any, node: Any, path: Path) -> int:
    """A node's unit index from its ``index`` column or id: a whole number within int64."""
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and inf
            raise BadFileError(f"{str(path)!r}: node {_clip(node)} has the index {value!r}, not a whole number; "
                               "export it again from Gephi or connectome")
        value = int(value)
    unit = int(value)
    if not _UNIT_RANGE[0] <= unit < _UNIT_RANGE[1]:
        raise BadFileError(f"{str(path)!r}: node {_clip(node)} has the index {_clip(unit)}, beyond a 64-bit integer; "
                           "export it again from Gephi or connectome")
    return unit


def _clip(v: Any, n: int = 60) -> str:
    """``repr(v)`` for a message, cut to ``n`` characters (an id or index may be megabytes long)."""
    s = repr(v)
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} characters)"


def _node_columns(nodes: list[tuple[Any, dict]]) -> dict[str, np.ndarray]:
    """The numeric node columns; NaN where a node has no number in a column.

    One pass over the rows per column: linear in nodes x columns.
    """
    skip = DRAWING_KEYS | {"layer", "index", "kind"}
    names: dict[str, None] = {}
    for _, d in nodes:
        for k, v in d.items():
            if k not in names and k not in skip and _number(v):
                names[k] = None
    attrs: dict[str, np.ndarray] = {}
    for k in names:
        vals = [d.get(k) for _, d in nodes]
        vals = [x if _number(x) else None for x in vals]
        if all(isinstance(x, (bool, np.bool_)) for x in vals):
            attrs[k] = np.array(vals, dtype=bool)
        elif not any(x is None or isinstance(x, (bool, np.bool_, float, np.floating)) for x in vals):
            # whole-number columns (community, modularity class, written as int/long) stay integers
            attrs[k] = np.array(vals, dtype=np.int64)
        else:
            attrs[k] = np.array([np.nan if x is None else x for x in vals], dtype=np.float64)
    return attrs


def _tables_to_graph(directed: bool, graph_data: dict[str, Any], node_rows: list[tuple[Any, dict]],
                     edge_rows: list[tuple[Any, Any, dict]], path: Path) -> Connectome:
    if not directed:
        raise ConnectomeError(f"{str(path)!r} holds an undirected graph; a connectome's edges have a direction "
                              "(export it from Gephi as directed)")
    _check_ids((n for n, _ in node_rows), ((u, v) for u, v, _ in edge_rows), path)
    where: dict[Any, tuple[str, int]] = {}
    for n, d in node_rows:
        if "layer" in d and "index" in d:
            where[n] = (str(d["layer"]), _unit(d["index"], n, path))
            continue
        lname, sep, unit = str(n).rpartition(":")
        if not sep or not unit.lstrip("-").isdigit():
            raise ConnectomeError(f"node {n!r} of {str(path)!r} has no 'layer'/'index' columns and its id is not "
                                  "'<layer>:<unit>'; was the file written by connectome?")
        where[n] = (lname, _unit(unit, n, path))
    if len(set(where.values())) < len(where):
        seen: dict[tuple[str, int], Any] = {}
        for n, lu in where.items():
            if lu in seen:
                raise BadFileError(f"{str(path)!r}: nodes {seen[lu]!r} and {n!r} are both unit {lu[1]} of layer "
                                   f"{lu[0]!r}; each (layer, index) must be one node")
            seen[lu] = n
    order = _layer_order(node_rows, edge_rows, where, path)
    pos = {name: i for i, name in enumerate(order)}

    # Nodes in layer order, then unit order; numeric columns, unit labels and layer kinds.
    nodes = sorted(node_rows, key=lambda nd: (pos[where[nd[0]][0]], where[nd[0]][1]))
    index = {n: i for i, (n, _) in enumerate(nodes)}
    kinds: dict[str, str] = {}
    labels: dict[str, list[str | None]] = {name: [] for name in order}
    for n, d in nodes:
        lname, unit = where[n]
        if "kind" in d:
            kinds.setdefault(lname, str(d["kind"]))
        label = d.get("label")
        labels[lname].append(str(label) if label is not None and str(label) != f"{lname}:{unit}" else None)
    node_attrs = _node_columns(nodes)
    counts = {name: len(labels[name]) for name in order}
    layers = [Layer(name=name, kind=kinds.get(name, "other"), size=counts[name],
                    labels=tuple(labels[name]) if labels[name] and all(x is not None for x in labels[name]) else None)
              for name in order]
    units = np.array([where[n][1] for n, _ in nodes], dtype=np.int64)

    m = len(edge_rows)
    src = np.empty(m, dtype=np.int64)
    dst = np.empty(m, dtype=np.int64)
    weight = np.empty(m, dtype=np.float64)
    ecols: dict[str, np.ndarray] = {}
    for e, (u, v, d) in enumerate(edge_rows):
        src[e], dst[e] = index[u], index[v]
        # the exports write weight = |w| (Gephi wants it >= 0) and the sign as signed_weight
        weight[e] = d.get("signed_weight", d.get("weight", 1.0))
        for k, val in d.items():
            if k in EDGE_SKIP or k in ("weight", "signed_weight") or not _number(val):
                continue
            if k not in ecols:
                ecols[k] = np.full(m, np.nan)
            ecols[k][e] = val
    meta = graph_data.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:  # not connectome's JSON: Gephi's own description, kept out of meta
            meta = None
        except RecursionError:
            raise BadFileError(f"{str(path)!r}: its meta JSON is nested too deeply to read; "
                               "export it again from connectome") from None
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["read_from"] = str(path)
    try:
        return Connectome(layers=tuple(layers), node_units=units, src=src, dst=dst, weight=weight,
                          edge_attrs=ecols, node_attrs=node_attrs, meta=meta)
    except ConnectomeError as exc:
        raise ConnectomeError(f"{str(path)!r}: {exc}") from None


def _layer_order(node_rows: list[tuple[Any, dict]], edge_rows: list[tuple[Any, Any, dict]],
                 where: dict[Any, tuple[str, int]], path: Path) -> list[str]:
    """Layers in an order every edge goes forward in; ties by mean x, then first appearance."""
    import heapq

    first: dict[str, int] = {}
    xs: dict[str, list[float]] = {}
    for i, (n, d) in enumerate(node_rows):
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
    for u, v, _ in edge_rows:
        a, b = where[u][0], where[v][0]
        if a != b and b not in succ[a]:
            succ[a].add(b)
            indeg[b] += 1
    same = [(u, v) for u, v, _ in edge_rows if where[u][0] == where[v][0]]
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
