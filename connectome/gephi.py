"""GraphML and GEXF for Gephi: the writers, and the readers of what Gephi (or connectome) wrote.

The writers stream blocks of edges formatted from the arrays (neither the document nor a
Python list of a whole column ever exists in memory) to a temporary file renamed into place.
Gephi users filter, edit and analyse a graph there and save it again. What comes back is
the graph they saw: the nodes and edges left, Gephi's own columns (``modularity_class``,
``Degree`` ...) beside ours, positions and colours of its layout. This module keeps the
wiring and every numeric column and drops the drawing:

- node ids are ``"<layer>:<unit>"`` or carry ``layer`` and ``index`` columns (both as written
  by :func:`write_graphml` / :func:`write_gexf`);
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

import contextlib
import gc
import io
import json
import re
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from connectome.errors import BadFileError, ConnectomeError, ExportError
from connectome.graph import Connectome, Layer
from connectome._files import atomic_write
from connectome.drawing import layout, node_colors, node_sizes
from connectome.npzformat import _clip, check_examples, warn_non_finite  # _clip: an id or index may be megabytes long
from connectome.patches import top_example

__all__ = ["read_graphml", "read_gexf", "read", "write_graphml", "write_gexf", "xml_safe"]

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
        The file is missing or not GraphML; a node id declared twice, an edge to a node the
        file does not declare, two nodes with one (layer, index), an index that is not a
        whole number within int64, a value of the wrong type, meta JSON nested too deeply.
    ConnectomeError
        Node ids that are not ``"<layer>:<unit>"`` (and no ``layer``/``index`` columns), or
        edges that cannot be put in a forward layer order.

    Warns
    -----
    UserWarning
        NaN or infinite edge weights, or infinite node attributes (read as they are), with
        their count per layer pair (see :func:`connectome.io.warn_non_finite`).
    """
    p = _existing(path)
    with _no_gc():
        try:
            tables = _graphml_tables(p)
        except (ElementTree.ParseError, ValueError, KeyError, LookupError) as exc:  # LookupError: an unknown encoding
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
    with _no_gc():
        try:
            # networkx merges a repeated node id and invents the nodes an edge names but the file
            # does not declare: the ids are checked on the file itself first
            _endpoints(*_gexf_ids(data), p)
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


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused while a file's tables are built.

    The tables are millions of small dicts and tuples that hold no reference cycles; the
    collector's passes over them (each a walk of every live object) cost about a third of
    the read. Restored as it was on the way out, also when an exception flies.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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
    defaults: dict[str, list[tuple[str, Any]]] | None = None  # "node"/"edge" -> (name, default), once keys are read
    local: dict[str, str] = {}  # "{namespace}tag" -> "tag"
    directed = True
    graph_data: dict[str, Any] = {}
    nodes: list[tuple[str, dict]] = []
    edges: list[tuple[str, str, dict]] = []
    graphs = 0
    for _, el in ElementTree.iterparse(path, events=("end",)):
        tag = local.get(el.tag) or local.setdefault(el.tag, el.tag.rpartition("}")[2])
        if tag == "data":
            continue  # read with the element that holds it
        if tag in ("node", "edge"):
            data = {}
            for c in el:
                if (local.get(c.tag) or local.setdefault(c.tag, c.tag.rpartition("}")[2])) == "data":
                    _, name, conv, _ = keys[c.get("key")]
                    data[name] = conv(c.text or "")
            if defaults is None:
                defaults = {t: [(name, default) for kfor, name, _, default in keys.values()
                                if default is not None and kfor in (t, "all")] for t in ("node", "edge")}
            for name, default in defaults[tag]:
                if name not in data:
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
            defaults = None
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
        # a value of the wrong type (index "a", weight "x") or beyond float/int64 (an x or a count of 10^400)
        raise BadFileError(f"cannot read {str(path)!r}: a value of the wrong type ({exc}); "
                           "was it edited by hand? export it again from Gephi or connectome") from None
    warn_non_finite(g, str(path), stacklevel=4)
    return g


def _endpoints(node_ids: list[Any], edges: list[tuple[Any, ...]], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Row of each edge's source and target in ``node_ids``, shape (n_edges,) each.

    Each node must be declared once and each edge join two declared nodes; else one
    BadFileError naming the id.
    """
    row: dict[Any, int] = {}
    for i, n in enumerate(node_ids):
        if row.setdefault(n, i) != i:
            raise BadFileError(f"{str(path)!r} declares node {_clip(n)} twice; node ids must be unique "
                               "(was it edited by hand? export it again from Gephi or connectome)")
    src = np.fromiter((row.get(e[0], -1) for e in edges), dtype=np.int64, count=len(edges))
    dst = np.fromiter((row.get(e[1], -1) for e in edges), dtype=np.int64, count=len(edges))
    missing = np.flatnonzero((src < 0) | (dst < 0))
    if missing.size:
        u, v = edges[int(missing[0])][:2]
        raise BadFileError(f"{str(path)!r} has an edge {_clip(u)} -> {_clip(v)} to node "
                           f"{_clip(u if u not in row else v)}, which the file does not declare; every edge must "
                           "join two of its nodes (export it again)")
    return src, dst


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


def _columns(rows: list[dict], skip: frozenset[str] | set[str]) -> dict[str, list[Any]]:
    """The numeric columns of ``rows`` (keys not in ``skip`` with a number somewhere), one list
    per column with None where a row has no number. One pass per column: linear in rows x columns."""
    names: dict[str, None] = {}
    for d in rows:
        for k, v in d.items():
            if k not in names and k not in skip and _number(v):
                names[k] = None
    out = {}
    for k in names:
        vals = [d.get(k) for d in rows]
        out[k] = [v if _number(v) else None for v in vals]
    return out


def _node_columns(nodes: list[tuple[Any, dict]]) -> dict[str, np.ndarray]:
    """The numeric node columns; NaN where a node has no number in a column."""
    attrs: dict[str, np.ndarray] = {}
    for k, vals in _columns([d for _, d in nodes], DRAWING_KEYS | {"layer", "index", "kind"}).items():
        if all(isinstance(x, (bool, np.bool_)) for x in vals):
            attrs[k] = np.array(vals, dtype=bool)
        elif not any(x is None or isinstance(x, (bool, np.bool_, float, np.floating)) for x in vals):
            # whole-number columns (community, modularity class, written as int/long) stay integers
            attrs[k] = np.array(vals, dtype=np.int64)
        else:
            attrs[k] = np.array([np.nan if x is None else x for x in vals], dtype=np.float64)
    return attrs


def _where(n: Any, d: dict, path: Path) -> tuple[str, int]:
    """(layer, unit) of a node: its ``layer``/``index`` columns, else its id ``"<layer>:<unit>"``."""
    if "layer" in d and "index" in d:
        return str(d["layer"]), _unit(d["index"], n, path)
    lname, sep, unit = str(n).rpartition(":")
    if not sep or not unit.lstrip("-").isdigit():
        raise ConnectomeError(f"node {_clip(n)} of {str(path)!r} has no 'layer'/'index' columns and its id is not "
                              "'<layer>:<unit>'; was the file written by connectome?")
    return lname, _unit(unit, n, path)


def _x(d: dict) -> float:
    """A node's x position (GraphML ``x``, GEXF ``<viz:position x=...>``), NaN when it has none."""
    x = d.get("x")
    if x is None and isinstance(d.get("viz"), dict):
        x = d["viz"].get("position", {}).get("x")
    return float(x) if _number(x) else np.nan


def _tables_to_graph(directed: bool, graph_data: dict[str, Any], node_rows: list[tuple[Any, dict]],
                     edge_rows: list[tuple[Any, Any, dict]], path: Path) -> Connectome:
    if not directed:
        raise ConnectomeError(f"{str(path)!r} holds an undirected graph; a connectome's edges have a direction "
                              "(export it from Gephi as directed)")
    ids = [n for n, _ in node_rows]
    src_row, dst_row = _endpoints(ids, edge_rows, path)
    where = [_where(n, d, path) for n, d in node_rows]
    if len(set(where)) < len(where):
        seen: dict[tuple[str, int], Any] = {}
        for n, lu in zip(ids, where):
            if lu in seen:
                raise BadFileError(f"{str(path)!r}: nodes {_clip(seen[lu])} and {_clip(n)} are both unit {lu[1]} of "
                                   f"layer {lu[0]!r}; each (layer, index) must be one node")
            seen[lu] = n
    names = list(dict.fromkeys(lname for lname, _ in where))  # in order of first appearance
    code = {name: i for i, name in enumerate(names)}
    layer_row = np.array([code[lname] for lname, _ in where], dtype=np.int64).reshape(-1)
    unit_row = np.array([unit for _, unit in where], dtype=np.int64).reshape(-1)
    inside = np.flatnonzero(layer_row[src_row] == layer_row[dst_row])
    if inside.size:
        u, v = edge_rows[int(inside[0])][:2]
        raise ConnectomeError(f"{str(path)!r} has an edge inside layer {where[src_row[inside[0]]][0]!r} "
                              f"({_clip(u)} -> {_clip(v)}); a connectome's edges go from one layer to a later one")
    x = np.array([_x(d) for _, d in node_rows], dtype=np.float64).reshape(-1)
    order = _layer_order(names, layer_row, x, layer_row[src_row], layer_row[dst_row], path)
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(order))

    # Nodes in layer order, then unit order; numeric columns, unit labels and layer kinds.
    perm = np.lexsort((unit_row, rank[layer_row]))
    new_index = np.empty(len(perm), dtype=np.int64)
    new_index[perm] = np.arange(len(perm))
    nodes = [node_rows[i] for i in perm.tolist()]
    kinds: dict[str, str] = {}
    labels: dict[str, list[str | None]] = {names[i]: [] for i in order}
    for i in perm.tolist():
        n, d = node_rows[i]
        lname, unit = where[i]
        if "kind" in d:
            kinds.setdefault(lname, str(d["kind"]))
        label = d.get("label")
        labels[lname].append(str(label) if label is not None and str(label) != f"{lname}:{unit}" else None)
    node_attrs = _node_columns(nodes)
    layers = [Layer(name=name, kind=kinds.get(name, "other"), size=len(labels[name]),
                    labels=tuple(labels[name]) if labels[name] and all(x is not None for x in labels[name]) else None)
              for name in labels]

    # the exports write weight = |w| (Gephi wants it >= 0) and the sign as signed_weight
    weight = np.array([d.get("signed_weight", d.get("weight", 1.0)) for *_, d in edge_rows],
                      dtype=np.float64).reshape(-1)
    ecols = {k: np.array([np.nan if x is None else x for x in v], dtype=np.float64) for k, v in
             _columns([d for *_, d in edge_rows], EDGE_SKIP | {"weight", "signed_weight"}).items()}
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
    check_examples(meta.get("examples"), layers, node_attrs, str(path))
    try:
        return Connectome(layers=tuple(layers), node_units=unit_row[perm], src=new_index[src_row],
                          dst=new_index[dst_row], weight=weight, edge_attrs=ecols, node_attrs=node_attrs, meta=meta)
    except ConnectomeError as exc:
        raise ConnectomeError(f"{str(path)!r}: {exc}") from None


def _layer_order(names: list[str], layer_row: np.ndarray, x: np.ndarray, src_layer: np.ndarray,
                 dst_layer: np.ndarray, path: Path) -> list[int]:
    """Layers (indices into ``names``, numbered by first appearance) in an order every edge goes
    forward in; ties by the mean x of their nodes, then by first appearance."""
    import heapq

    k = len(names)
    has_x = ~np.isnan(x)
    count = np.bincount(layer_row[has_x], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_x = np.where(count > 0, np.bincount(layer_row[has_x], weights=x[has_x], minlength=k) / count, np.inf)
    pairs = np.unique(src_layer * k + dst_layer)
    succ: list[list[int]] = [[] for _ in range(k)]
    indeg = np.zeros(k, dtype=np.int64)
    for a, b in zip((pairs // k).tolist(), (pairs % k).tolist()):
        succ[a].append(b)
        indeg[b] += 1
    heap = [(float(mean_x[i]), i) for i in range(k) if indeg[i] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        i = heapq.heappop(heap)[1]
        order.append(i)
        for b in succ[i]:
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(heap, (float(mean_x[b]), b))
    if len(order) < k:
        stuck = sorted(names[i] for i in set(range(k)) - set(order))[:4]
        raise ConnectomeError(f"{str(path)!r}: the edges between layers {stuck} form a cycle, so no layer order "
                              "makes every edge go forward")
    return order


# ---------------------------------------------------------------------------- XML text
# XML 1.0 cannot carry these characters, not even as character references: the C0 controls
# other than tab, LF and CR; lone surrogates (Python's stand-ins for file-name bytes that are
# not UTF-8); U+FFFE and U+FFFF. Writers put U+FFFD (the replacement character) in their place.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(s: str) -> str:
    """``s`` with each character that XML 1.0 forbids replaced by U+FFFD."""
    return _XML_ILLEGAL.sub("\ufffd", s)


def _text(v: Any) -> str:
    """Element content; a CR as a reference, since parsers turn a literal one into LF."""
    return escape(xml_safe(str(v)), {"\r": "&#13;"})


def _attr(v: Any) -> str:
    """A quoted attribute value (``quoteattr`` writes tab, LF and CR as references)."""
    return quoteattr(xml_safe(str(v)))


def _fmt(v: Any) -> str:
    """A number as XML text (the spellings Gephi and networkx read for non-finite values)."""
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if np.isfinite(v) else ("NaN" if np.isnan(v) else ("INF" if v > 0 else "-INF"))
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    return str(v)


_BOOL_TEXT = np.array(["false", "true"], dtype=object)
_NUMERIC = "biuf"


def _number_texts(a: np.ndarray) -> list[str]:
    """Text of each value of a numeric array, formatted in C in one call per block.

    Floats take 17 significant digits, which read back as exactly the same double; that is
    half the time of the shortest representation (``repr``).
    """
    if a.dtype.kind == "b":
        return _BOOL_TEXT[a.astype(np.intp)].tolist()
    if a.dtype.kind in "iu":
        return (("%d\n" * a.size) % tuple(a.tolist())).split("\n")[:-1]
    f = a.astype(np.float64, copy=False)
    out = (("%.17g\n" * f.size) % tuple(f.tolist())).split("\n")[:-1]
    bad = ~np.isfinite(f)
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            out[i] = _fmt(f[i])
    return out


def _xml_type(arr: np.ndarray) -> str:
    kind = arr.dtype.kind
    if kind == "b":
        return "boolean"
    if kind in "iu":
        return "long"
    if kind == "f":
        return "double"
    return "string"


class _Column:
    """One attribute column of the export: how to spell a block of it, and its XML type."""

    def __init__(self, values: np.ndarray, in_attribute: bool):
        self.values = values
        self.type = _xml_type(values)
        self.numeric = values.dtype.kind in _NUMERIC
        quote = _attr if in_attribute else _text
        self._quote = quote
        # numbers need no escaping; in an attribute they still need their quotes
        self.slot = '"%s"' if (self.numeric and in_attribute) else "%s"

    def texts(self, start: int, stop: int) -> list[str]:
        block = self.values[start:stop]
        if self.numeric:
            return _number_texts(block)
        return [self._quote(v) for v in block.tolist()]


def _rows(fh: IO[str], n: int, row: str, cols: list[Callable[[int, int], list[str]]], block: int = 8192) -> None:
    """Write ``n`` rows: ``row`` is a template with one ``%s`` per entry of ``cols``, each a
    function giving the texts of rows ``start..stop``. A block of rows is one ``"".join`` of
    the template's constant pieces interleaved with the columns: the per-row work stays in C."""
    pieces: list[str | Callable[[int, int], list[str]]] = []
    consts = row.split("%s")
    if len(consts) != len(cols) + 1:
        raise ValueError(f"row template has {len(consts) - 1} slots for {len(cols)} columns")
    for j, const in enumerate(consts):
        if const:
            pieces.append(const)
        if j < len(cols):
            pieces.append(cols[j])
    width = len(pieces)
    for start in range(0, n, block):
        stop = min(start + block, n)
        k = stop - start
        parts: list[str] = [""] * (k * width)
        for j, piece in enumerate(pieces):
            parts[j::width] = [piece] * k if isinstance(piece, str) else piece(start, stop)
        fh.write("".join(parts))


def _distinct(names: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        safe = xml_safe(name)
        if safe in seen and seen[safe] != name:
            raise ExportError(
                f"{what} {seen[safe]!r} and {name!r} differ only in characters XML 1.0 cannot carry; rename one"
            )
        seen[safe] = name


def _export_columns(g: Connectome, in_attribute: bool) -> tuple[dict[str, _Column], dict[str, _Column]]:
    """Node columns (Gephi's keys first, then every node attribute) and further edge columns."""
    if not isinstance(g, Connectome):
        raise ExportError(f"expected a Connectome, got {type(g).__name__}")
    _distinct([l.name for l in g.layers], "layers")
    _distinct(list(g.node_attrs), "node attributes")
    _distinct(list(g.edge_attrs), "edge attributes")
    x, y = layout(g)
    rgb = node_colors(g)
    sizes = np.array([l.size for l in g.layers], dtype=np.int64)  # int also when there are no layers
    node_cols: dict[str, np.ndarray] = {
        "label": g.node_labels,
        "layer": np.repeat(np.array([l.name for l in g.layers], dtype=object), sizes),
        "kind": np.repeat(np.array([l.kind for l in g.layers], dtype=object), sizes),
        "index": g.node_units,
        "x": x,
        "y": y,
        "size": node_sizes(g),
        "r": rgb[:, 0],
        "g": rgb[:, 1],
        "b": rgb[:, 2],
    }
    for k, v in g.node_attrs.items():
        if k in node_cols:
            raise ExportError(f"node attribute {k!r} collides with a Gephi key; rename it with with_node_attrs")
        node_cols[k] = v
    if "example_index_0" in g.node_attrs and (g.meta.get("examples") or {}).get("paths") \
            and "example_path" not in node_cols:  # each unit's top image, for a Gephi user to open
        node_cols["example_path"] = np.asarray(top_example(g)[1], dtype=object)
    for k in g.edge_attrs:
        if k in ("weight", "signed_weight"):
            raise ExportError(f"edge attribute {k!r} collides with a reserved key")
    return ({k: _Column(v, in_attribute) for k, v in node_cols.items()},
            {k: _Column(v, in_attribute) for k, v in g.edge_attrs.items()})


class _Weights:
    """``|w|`` and ``w`` of a block of edges from one formatting pass: ``w`` is a sign and ``|w|``."""

    _SIGN = np.array(["", "-"], dtype=object)

    def __init__(self, g: Connectome):
        self.w = g.weight
        self._cache: tuple[int, list[str], list[str]] | None = None

    def _block(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        if self._cache is None or self._cache[0] != start:
            w = self.w[start:stop].astype(np.float64)
            neg = np.signbit(w) & ~np.isnan(w)
            self._cache = (start, _number_texts(np.abs(w)), self._SIGN[neg.astype(np.intp)].tolist())
        return self._cache[1], self._cache[2]

    def magnitude(self, start: int, stop: int) -> list[str]:
        return self._block(start, stop)[0]

    def sign(self, start: int, stop: int) -> list[str]:
        return self._block(start, stop)[1]


def _ids(g: Connectome) -> np.ndarray:
    """Each node id as a quoted attribute value, ready to be picked by edge endpoints."""
    return np.array([_attr(i) for i in g.node_ids.tolist()], dtype=object)


def write_graphml(g: Connectome, path: Any) -> None:
    """Write GraphML that Gephi opens as a layered diagram.

    Node keys ``label, x, y, size, r, g, b`` are read by Gephi as label, position, size and
    colour; ``layer``, ``kind``, ``index`` and every node attribute travel too. Edge ``weight``
    is ``|w|`` (Gephi wants positive weights); the signed value is ``signed_weight``.

    The file is always well-formed XML 1.0: characters XML cannot carry (C0 controls other
    than tab, LF and CR, lone surrogates, U+FFFE, U+FFFF) are written as U+FFFD, and CR is
    written as a character reference so that it survives reading. Floats are written with
    17 significant digits and read back exactly.

    Parameters
    ----------
    g : Connectome
    path : str or PathLike

    Raises
    ------
    ExportError
        The folder does not exist, an attribute name collides with a Gephi key, or two layer
        or attribute names differ only in characters XML cannot carry.
    """
    node_cols, edge_cols = _export_columns(g, in_attribute=False)
    ids = _ids(g)
    weights = _Weights(g)
    src, dst = g.src, g.dst
    with atomic_write(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        fh.write(
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
            'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n'
        )
        for i, (k, c) in enumerate(node_cols.items()):
            fh.write(f'  <key id="n{i}" for="node" attr.name={_attr(k)} attr.type="{c.type}"/>\n')
        fh.write('  <key id="e0" for="edge" attr.name="weight" attr.type="double"/>\n')
        fh.write('  <key id="e1" for="edge" attr.name="signed_weight" attr.type="double"/>\n')
        for i, (k, c) in enumerate(edge_cols.items(), start=2):
            fh.write(f'  <key id="e{i}" for="edge" attr.name={_attr(k)} attr.type="{c.type}"/>\n')
        fh.write('  <key id="g0" for="graph" attr.name="meta" attr.type="string"/>\n')
        fh.write('  <graph id="G" edgedefault="directed">\n')
        fh.write(f'    <data key="g0">{_text(json.dumps(g.meta))}</data>\n')
        row = "    <node id=%s>" + "".join(f'<data key="n{i}">%s</data>' for i in range(len(node_cols))) + "</node>\n"
        _rows(fh, g.num_nodes, row, [lambda a, b: ids[a:b].tolist()] + [c.texts for c in node_cols.values()])
        row = ('    <edge source=%s target=%s><data key="e0">%s</data><data key="e1">%s%s</data>'
               + "".join(f'<data key="e{i}">%s</data>' for i in range(2, 2 + len(edge_cols))) + "</edge>\n")
        _rows(fh, g.num_edges, row, [lambda a, b: ids[src[a:b]].tolist(), lambda a, b: ids[dst[a:b]].tolist(),
                                     weights.magnitude, weights.sign, weights.magnitude]
              + [c.texts for c in edge_cols.values()])
        fh.write("  </graph>\n</graphml>\n")


def write_gexf(g: Connectome, path: Any) -> None:
    """Write GEXF 1.2 with ``viz:position``, ``viz:color`` and ``viz:size`` for Gephi.

    Carries the same attributes as :func:`write_graphml`; edge ``weight`` is ``|w|`` and the
    signed value is the ``signed_weight`` attribute. Text is made XML-safe as there.
    """
    node_cols, edge_cols = _export_columns(g, in_attribute=True)
    viz = ("label", "x", "y", "size", "r", "g", "b")
    n_attrs = {k: c for k, c in node_cols.items() if k not in viz}
    ids = _ids(g)
    weights = _Weights(g)
    src, dst = g.src, g.dst
    with atomic_write(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        fh.write(
            '<gexf xmlns="http://www.gexf.net/1.2draft" xmlns:viz="http://www.gexf.net/1.2draft/viz" '
            'version="1.2">\n'
        )
        fh.write(f"  <meta><description>{_text(json.dumps(g.meta))}</description></meta>\n")
        fh.write('  <graph defaultedgetype="directed" mode="static">\n')
        fh.write('    <attributes class="node" mode="static">\n')
        for i, (k, c) in enumerate(n_attrs.items()):
            fh.write(f'      <attribute id="{i}" title={_attr(k)} type="{c.type}"/>\n')
        fh.write("    </attributes>\n")
        fh.write('    <attributes class="edge" mode="static">\n')
        fh.write('      <attribute id="0" title="signed_weight" type="double"/>\n')
        for i, (k, c) in enumerate(edge_cols.items(), start=1):
            fh.write(f'      <attribute id="{i}" title={_attr(k)} type="{c.type}"/>\n')
        fh.write("    </attributes>\n")
        fh.write("    <nodes>\n")
        v = node_cols
        row = ("      <node id=%s label=%s><attvalues>"
               + "".join(f'<attvalue for="{i}" value={c.slot}/>' for i, c in enumerate(n_attrs.values()))
               + f'</attvalues><viz:size value={v["size"].slot}/><viz:position x={v["x"].slot} y={v["y"].slot} '
               f'z="0.0"/><viz:color r={v["r"].slot} g={v["g"].slot} b={v["b"].slot}/></node>\n')
        _rows(fh, g.num_nodes, row, [lambda a, b: ids[a:b].tolist(), v["label"].texts]
              + [c.texts for c in n_attrs.values()] + [v[k].texts for k in ("size", "x", "y", "r", "g", "b")])
        fh.write("    </nodes>\n    <edges>\n")
        row = ('      <edge id="%s" source=%s target=%s weight="%s"><attvalues><attvalue for="0" value="%s%s"/>'
               + "".join(f'<attvalue for="{i}" value={c.slot}/>' for i, c in enumerate(edge_cols.values(), start=1))
               + "</attvalues></edge>\n")
        _rows(fh, g.num_edges, row, [lambda a, b: _number_texts(np.arange(a, b)), lambda a, b: ids[src[a:b]].tolist(),
                                     lambda a, b: ids[dst[a:b]].tolist(), weights.magnitude, weights.sign,
                                     weights.magnitude] + [c.texts for c in edge_cols.values()])
        fh.write("    </edges>\n  </graph>\n</gexf>\n")
