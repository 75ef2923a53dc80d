"""Files: save/load ``.npz`` (no pickle), GraphML and GEXF for Gephi.

Every writer goes to a temporary file beside the target and renames it into place, so a
failure never leaves a half-written file. GraphML and GEXF are streamed element by element:
a 1M-edge graph never exists as one string in memory.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Iterator
from xml.sax.saxutils import escape, quoteattr

import numpy as np


from connectome.errors import BadFileError, ConnectomeError, ExportError
from connectome.graph import Connectome, Layer
from connectome.kinds import KINDS

__all__ = ["save", "load", "write_graphml", "write_gexf", "layout", "node_colors", "atomic_write"]

FORMAT = "connectome-npz"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_write(path: Any, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: it is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ExportError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    # mkstemp makes the file 0600; give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- npz
def save(g: Connectome, path: Any) -> None:
    """Write ``g`` to one ``.npz`` file, atomically; :func:`load` restores it exactly.

    Parameters
    ----------
    g : Connectome
    path : str or PathLike
        Target file (the name is used as given; ``.npz`` is the convention).

    Raises
    ------
    ExportError
        The folder does not exist.
    """
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layers": [l.to_dict() for l in g.layers],
        "meta": g.meta,
        "node_attrs": sorted(g.node_attrs),
        "edge_attrs": sorted(g.edge_attrs),
    }
    arrays: dict[str, np.ndarray] = {
        "header": np.array(json.dumps(header)),
        "node_units": g.node_units,
        "src": g.src,
        "dst": g.dst,
        "weight": g.weight,
    }
    for k, v in g.node_attrs.items():
        arrays[f"node.{k}"] = v
    for k, v in g.edge_attrs.items():
        arrays[f"edge.{k}"] = v
    with atomic_write(path) as fh:
        np.savez_compressed(fh, **arrays)


def load(path: Any) -> Connectome:
    """Read a graph written by :meth:`Connectome.save` (no pickle is ever loaded).

    Raises
    ------
    BadFileError
        The file is missing, not an ``.npz``, truncated, or not a connectome.
    """
    p = Path(path)
    if not p.is_file():
        raise BadFileError(f"no such file: {str(p)!r}; pass the path of a .npz written by Connectome.save")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "header" not in z.files:
                raise BadFileError(f"{str(p)!r} is an .npz but not a connectome (no header); write graphs with Connectome.save")
            header = json.loads(str(z["header"]))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                found = header.get("format") if isinstance(header, dict) else type(header).__name__
                raise BadFileError(f"{str(p)!r} is not a connectome file (format {found!r}); write graphs with Connectome.save")
            if header.get("version", 0) > FORMAT_VERSION:
                raise BadFileError(
                    f"{str(p)!r} was written by a newer connectome (format v{header['version']}); upgrade torch-connectome"
                )
            data = {k: z[k] for k in z.files}
    except BadFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError, json.JSONDecodeError) as exc:
        raise BadFileError(
            f"{str(p)!r} is not a readable connectome file ({type(exc).__name__}: {exc}); it may be truncated "
            "or another kind of file - write it again with Connectome.save"
        ) from None
    try:
        return Connectome(
            layers=tuple(Layer.from_dict(d) for d in header["layers"]),
            node_units=data["node_units"],
            src=data["src"],
            dst=data["dst"],
            weight=data["weight"],
            node_attrs={k: data[f"node.{k}"] for k in header["node_attrs"]},
            edge_attrs={k: data[f"edge.{k}"] for k in header["edge_attrs"]},
            meta=header["meta"],
        )
    except KeyError as exc:
        raise BadFileError(f"{str(p)!r} is missing the array {exc}; the file is damaged") from None
    except (ConnectomeError, TypeError, ValueError) as exc:
        raise BadFileError(f"{str(p)!r} holds inconsistent arrays ({exc}); the file is damaged") from None


# ---------------------------------------------------------------------------- layout and colour
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


_KIND_HUE = {k: v.hue for k, v in KINDS.items()}  # one table of kinds: connectome/kinds.py


def node_colors(g: Connectome) -> np.ndarray:
    """RGB colours (0-255), shape (n_nodes, 3): by community if present, else by layer kind."""
    if "community" in g.node_attrs:
        c = np.asarray(g.node_attrs["community"], dtype=np.float64)
        c = np.where(np.isfinite(c), c, -1).astype(np.int64)
        golden = 0.61803398875
        hues = (c * golden) % 1.0
        rgb = np.array([colorsys.hsv_to_rgb(h, 0.65, 0.9) if k >= 0 else (0.6, 0.6, 0.6) for h, k in zip(hues, c)])
    else:
        kinds = [g.layers[i].kind for i in g.node_layer]
        rgb = np.array([colorsys.hsv_to_rgb(_KIND_HUE.get(k, 0.0), 0.55 if k != "input" else 0.0, 0.85) for k in kinds])
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.int64).reshape(-1, 3)


def node_sizes(g: Connectome, lo: float = 4.0, hi: float = 30.0) -> np.ndarray:
    """Node sizes for drawing: by |attribution| if present, else by total |edge weight|."""
    if "attribution" in g.node_attrs:
        v = np.abs(np.asarray(g.node_attrs["attribution"], dtype=np.float64))
    else:
        v = np.zeros(g.num_nodes)
        a = np.abs(g.weight.astype(np.float64))
        np.add.at(v, g.src, a)
        np.add.at(v, g.dst, a)
    v = np.where(np.isfinite(v), v, 0.0)
    top = v.max() if v.size else 0.0
    return lo + (hi - lo) * (np.sqrt(v / top) if top > 0 else np.zeros_like(v))


def _export_columns(g: Connectome) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    x, y = layout(g)
    rgb = node_colors(g)
    node_cols: dict[str, np.ndarray] = {
        "label": g.node_labels,
        "layer": np.array([g.layers[i].name for i in g.node_layer], dtype=str),
        "kind": np.array([g.layers[i].kind for i in g.node_layer], dtype=str),
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
    w = g.weight.astype(np.float64)
    edge_cols: dict[str, np.ndarray] = {"weight": np.abs(w), "signed_weight": w}
    for k, v in g.edge_attrs.items():
        if k in edge_cols:
            raise ExportError(f"edge attribute {k!r} collides with a reserved key")
        edge_cols[k] = v
    return node_cols, edge_cols


def _xml_type(arr: np.ndarray) -> str:
    kind = arr.dtype.kind
    if kind in "US":
        return "string"
    if kind == "b":
        return "boolean"
    if kind in "iu":
        return "long"
    return "double"


def _fmt(v: Any) -> str:
    """A value as XML text, unescaped (callers escape for element text or attributes)."""
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if np.isfinite(v) else ("NaN" if np.isnan(v) else ("INF" if v > 0 else "-INF"))
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    return str(v)


def _check_writable(g: Connectome, path: Any) -> Path:
    if not isinstance(g, Connectome):
        raise ExportError(f"expected a Connectome, got {type(g).__name__}")
    return Path(path)


def write_graphml(g: Connectome, path: Any) -> None:
    """Write GraphML that Gephi opens as a layered diagram.

    Node keys ``label, x, y, size, r, g, b`` are read by Gephi as label, position, size and
    colour; ``layer``, ``kind``, ``index`` and every node attribute travel too. Edge ``weight``
    is ``|w|`` (Gephi wants positive weights); the signed value is ``signed_weight``.

    Parameters
    ----------
    g : Connectome
    path : str or PathLike

    Raises
    ------
    ExportError
        The folder does not exist, or an attribute name collides with a Gephi key.
    """
    path = _check_writable(g, path)
    node_cols, edge_cols = _export_columns(g)
    with atomic_write(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        fh.write(
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
            'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n'
        )
        nkeys = {}
        for i, (k, v) in enumerate(node_cols.items()):
            nkeys[k] = f"n{i}"
            fh.write(f'  <key id="n{i}" for="node" attr.name={quoteattr(k)} attr.type="{_xml_type(v)}"/>\n')
        ekeys = {}
        for i, (k, v) in enumerate(edge_cols.items()):
            ekeys[k] = f"e{i}"
            fh.write(f'  <key id="e{i}" for="edge" attr.name={quoteattr(k)} attr.type="{_xml_type(v)}"/>\n')
        fh.write('  <key id="g0" for="graph" attr.name="meta" attr.type="string"/>\n')
        fh.write('  <graph id="G" edgedefault="directed">\n')
        fh.write(f'    <data key="g0">{escape(json.dumps(g.meta))}</data>\n')
        ids = g.node_ids.tolist()
        ncols = [(nkeys[k], v.tolist()) for k, v in node_cols.items()]
        for i, nid in enumerate(ids):
            parts = [f"    <node id={quoteattr(nid)}>"]
            for key, col in ncols:
                parts.append(f'<data key="{key}">{escape(_fmt(col[i]))}</data>')
            parts.append("</node>\n")
            fh.write("".join(parts))
        ecols = [(ekeys[k], v.tolist()) for k, v in edge_cols.items()]
        src, dst = g.src.tolist(), g.dst.tolist()
        for e in range(g.num_edges):
            parts = [f"    <edge source={quoteattr(ids[src[e]])} target={quoteattr(ids[dst[e]])}>"]
            for key, col in ecols:
                parts.append(f'<data key="{key}">{escape(_fmt(col[e]))}</data>')
            parts.append("</edge>\n")
            fh.write("".join(parts))
        fh.write("  </graph>\n</graphml>\n")


def write_gexf(g: Connectome, path: Any) -> None:
    """Write GEXF 1.2 with ``viz:position``, ``viz:color`` and ``viz:size`` for Gephi.

    Carries the same attributes as :func:`write_graphml`; edge ``weight`` is ``|w|`` and the
    signed value is the ``signed_weight`` attribute.
    """
    path = _check_writable(g, path)
    node_cols, edge_cols = _export_columns(g)
    viz = {"label", "x", "y", "size", "r", "g", "b"}
    n_attrs = {k: v for k, v in node_cols.items() if k not in viz}
    e_attrs = {k: v for k, v in edge_cols.items() if k != "weight"}
    gexf_type = {"string": "string", "boolean": "boolean", "long": "long", "double": "double"}
    with atomic_write(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        fh.write(
            '<gexf xmlns="http://www.gexf.net/1.2draft" xmlns:viz="http://www.gexf.net/1.2draft/viz" '
            'version="1.2">\n'
        )
        fh.write(f"  <meta><description>{escape(json.dumps(g.meta))}</description></meta>\n")
        fh.write('  <graph defaultedgetype="directed" mode="static">\n')
        fh.write('    <attributes class="node" mode="static">\n')
        for i, (k, v) in enumerate(n_attrs.items()):
            fh.write(f'      <attribute id="{i}" title={quoteattr(k)} type="{gexf_type[_xml_type(v)]}"/>\n')
        fh.write("    </attributes>\n")
        fh.write('    <attributes class="edge" mode="static">\n')
        for i, (k, v) in enumerate(e_attrs.items()):
            fh.write(f'      <attribute id="{i}" title={quoteattr(k)} type="{gexf_type[_xml_type(v)]}"/>\n')
        fh.write("    </attributes>\n")
        ids = g.node_ids.tolist()
        labels = node_cols["label"].tolist()
        xs, ys, sz = node_cols["x"].tolist(), node_cols["y"].tolist(), node_cols["size"].tolist()
        rs, gs, bs = node_cols["r"].tolist(), node_cols["g"].tolist(), node_cols["b"].tolist()
        ncols = [v.tolist() for v in n_attrs.values()]
        fh.write("    <nodes>\n")
        for i, nid in enumerate(ids):
            vals = "".join(f'<attvalue for="{a}" value={quoteattr(_fmt(col[i]))}/>' for a, col in enumerate(ncols))
            fh.write(
                f"      <node id={quoteattr(nid)} label={quoteattr(str(labels[i]))}><attvalues>{vals}</attvalues>"
                f'<viz:size value="{sz[i]!r}"/><viz:position x="{xs[i]!r}" y="{ys[i]!r}" z="0.0"/>'
                f'<viz:color r="{rs[i]}" g="{gs[i]}" b="{bs[i]}"/></node>\n'
            )
        fh.write("    </nodes>\n    <edges>\n")
        ecols = [v.tolist() for v in e_attrs.values()]
        wabs = edge_cols["weight"].tolist()
        src, dst = g.src.tolist(), g.dst.tolist()
        for e in range(g.num_edges):
            vals = "".join(f'<attvalue for="{a}" value={quoteattr(_fmt(col[e]))}/>' for a, col in enumerate(ecols))
            fh.write(
                f'      <edge id="{e}" source={quoteattr(ids[src[e]])} target={quoteattr(ids[dst[e]])} '
                f'weight="{wabs[e]!r}"><attvalues>{vals}</attvalues></edge>\n'
            )
        fh.write("    </edges>\n  </graph>\n</gexf>\n")
