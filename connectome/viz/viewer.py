"""An interactive circuit viewer: one self-contained HTML file, opened from disk, no network.

The layered circuit of each category is drawn on a canvas (units as dots, coloured by
community and sized by |attribution|; flows as lines, red positive and blue negative, as in
the PNG drawings), with pan and zoom, a card per unit on hover (its top image patches
cropped to the receptive field, attribution, flow in and out, community, strongest inputs
and outputs, highlighted in the drawing), click to pin, a slider for the circuit mass,
a menu of categories and a search by unit id. The data (JSON) and the patches (one PNG
sprite per category) are inlined with a small script of its own: nothing is fetched.

The page is safe to open whatever the names in the graphs are (they come from folder names
and model files, and the file is mailed around): it is filled in one pass, so no name is
read as a placeholder; the inlined JSON has ``<``, ``>``, ``&``, U+2028 and U+2029 escaped,
so it can neither end its ``<script>`` element nor open a comment; the script puts every
name into the page as text (``textContent``), never as HTML; and a Content-Security-Policy
lets the browser run only the page's own inline script and style (by their SHA-256 hashes)
and show only ``data:`` images: no other script, no event handler attribute, no network.

The slider steps through circuit masses; at each it shows exactly the units of
:func:`connectome.analysis.circuit` of that mass (:func:`circuit_levels`); graphs without a
target unit (weight graphs) use each layer's strongest units by ``|attribution|`` (or
strength) instead.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from connectome.errors import ConnectomeError
from connectome.graph import Connectome
from connectome.viz.display import for_display

__all__ = ["viewer_html", "write_viewer", "circuit_levels", "inline_json", "content_security_policy"]

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def circuit_levels(g: Connectome, mass: float = 0.9) -> tuple[list[float], np.ndarray]:
    """Which units are in the circuit of each mass on the slider.

    Returns
    -------
    levels : list of float
        The masses of ``LEVELS`` below ``mass``, and ``mass``.
    member : ndarray of bool, shape (len(levels), n_nodes)
        ``member[j]`` marks the nodes of ``connectome.analysis.circuit(g, mass=levels[j])``.
        Circuits of growing mass need not be nested (a unit strong into a small circuit can
        be outranked once the circuit grows), so each is kept as it is. Graphs without a
        target unit (weight graphs) use, per layer, the strongest units by ``|attribution|``
        (or strength) that hold ``levels[j]`` of the layer's total.
    """
    from connectome.analysis.circuits import circuit, has_target

    levels = [v for v in LEVELS if v < mass] + [float(mass)]
    member = np.zeros((len(levels), g.num_nodes), dtype=bool)
    if has_target(g) and g.num_edges > 0:
        for j, m in enumerate(levels):
            try:
                c = circuit(g, mass=m)
            except ConnectomeError:  # no flow reaches the target at this mass
                continue
            member[j, g.index_of(c.node_ids.tolist())] = True
        return levels, member
    if "attribution" in g.node_attrs:
        score = np.abs(np.asarray(g.node_attrs["attribution"], dtype=np.float64))
    else:
        score = np.bincount(g.src, weights=np.abs(g.weight), minlength=g.num_nodes) + \
            np.bincount(g.dst, weights=np.abs(g.weight), minlength=g.num_nodes)
    for layer in g.layers:
        sl = g.layer_slice(layer.name)
        sc = np.nan_to_num(score[sl])
        order = np.argsort(-sc, kind="stable")
        total = sc.sum()
        before = (np.cumsum(sc[order]) - sc[order]) / total if total > 0 else np.arange(sc.size) / max(sc.size, 1)
        lv = np.empty(sc.size)
        lv[order] = before  # the share held by the units stronger than this one
        member[:, sl] = lv[None, :] < np.asarray(levels)[:, None] - 1e-12
    return levels, member


def _round(a: np.ndarray, digits: int = 4) -> list[float]:
    a = np.asarray(a, dtype=np.float64)
    return [float(f"{v:.{digits}g}") if np.isfinite(v) else 0.0 for v in a.tolist()]


def _category(g: Connectome, name: str, images: Any, mass: float, max_units: int, max_edges: int,
              n_patches: int, patch_size: int) -> dict[str, Any]:
    from connectome.io import node_colors
    from connectome.patches import has_examples, image_source, unit_patches
    from connectome.viz.units import compact_image_uri, patch_strip, unit_flows

    levels, member = circuit_levels(g, mass)
    first = np.where(member.any(0), member.argmax(0), len(levels))  # the smallest level holding a unit
    keep = np.flatnonzero(first < len(levels))
    if keep.size > max_units:
        keep = np.sort(keep[np.argsort(first[keep], kind="stable")[:max_units]])
    if keep.size == 0:
        raise ConnectomeError(f"graph {name!r} has no unit with flow to show; is it empty?")
    sub = g.subgraph(g.node_ids[keep].tolist())
    if "community" not in sub.node_attrs and sub.num_edges:
        try:
            from connectome.analysis import communities

            sub = communities(sub, seed=0).to_node_attr(sub)
        except Exception:  # no igraph partition possible (no positive flow): colour by kind
            pass
    into, out = unit_flows(g)
    attr = np.asarray(g.node_attrs.get("attribution", into), dtype=np.float64)[keep]
    comm = np.asarray(sub.node_attrs.get("community", np.full(sub.num_nodes, -1.0)), dtype=np.float64)
    comm = np.where(np.isfinite(comm), comm, -1)
    rgb = node_colors(sub)
    shown_layers = sorted(set(sub.node_layer.tolist()))
    col = {li: c for c, li in enumerate(shown_layers)}
    # within a layer: by community, then by |attribution|, centred on the layer's axis
    y = np.zeros(sub.num_nodes)
    for li in shown_layers:
        idx = np.flatnonzero(sub.node_layer == li)
        order = idx[np.lexsort((-np.abs(attr[idx]), comm[idx]))]
        y[order] = np.arange(order.size) - (order.size - 1) / 2
    w = sub.weight
    e = np.arange(sub.num_edges)
    if e.size > max_edges:
        e = np.sort(np.argsort(-np.abs(w), kind="stable")[:max_edges])
    sprite, rows = None, np.full(sub.num_nodes, -1)
    source = None
    if has_examples(sub):
        try:
            source = image_source(sub, images)
        except (ConnectomeError, OSError, TypeError, ValueError) as exc:  # --data mistyped: say so, as report does
            warnings.warn(f"viewer {name!r}: no patches ({exc})", stacklevel=3)
            source = None
    if source is not None:
        hidden = [str(sub.node_ids[i]) for i in range(sub.num_nodes)
                  if sub.layers[int(sub.node_layer[i])].kind != "input"]
        try:
            patches = unit_patches(sub, source, hidden, n=n_patches, size=patch_size)
        except (ConnectomeError, OSError) as exc:  # image files gone: the viewer works without patches
            warnings.warn(f"viewer {name!r}: no patches ({exc})", stacklevel=3)
            patches = {}
        if patches:
            per_row = 16
            strips = []
            for r, nid in enumerate(patches):
                rows[sub.index_of(nid)] = r
                strips.append(patch_strip([p["patch"] for p in patches[nid]], patch_size, n_patches, pad=0))
            pad = (-len(strips)) % per_row
            strips += [np.full_like(strips[0], 255)] * pad
            grid = np.concatenate([np.concatenate(strips[i : i + per_row], 1) for i in range(0, len(strips), per_row)], 0)
            sprite = compact_image_uri(grid)
    target = None
    tc, n_images = g.meta.get("target_class"), g.meta.get("n_images")
    if tc is not None and g.layers[-1].labels:
        try:  # meta is read from a file: a list, a text or inf there is no unit number
            t = int(tc)
        except (TypeError, ValueError, OverflowError):
            t = None
        if t is not None:
            target = g.layers[-1].labels[t] if 0 <= t < len(g.layers[-1].labels) else str(t)
    return {
        "name": name,
        "target": target,
        "n_images": int(n_images) if isinstance(n_images, (int, np.integer)) else None,  # JSON has no NaN
        "layers": [sub.layers[li].name for li in shown_layers],
        "nodes": {
            "id": sub.node_ids.tolist(),
            "col": [col[int(li)] for li in sub.node_layer],
            "y": y.tolist(),
            "mask": (member[:, keep].T.astype(np.int64) << np.arange(len(levels))).sum(1).tolist(),
            "attr": _round(attr),
            "fin": _round(into[keep]),
            "fout": _round(out[keep]),
            "comm": comm.astype(np.int64).tolist(),
            "rgb": ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in rgb],
            "row": rows.tolist(),
        },
        "edges": {"s": sub.src[e].tolist(), "t": sub.dst[e].tolist(), "w": _round(w[e])},
        "sprite": sprite,
        "patch": patch_size,
        "npatch": n_patches,
        "perRow": 16,
        "levels": levels,
    }


def viewer_html(graphs: Connectome | Mapping[str, Connectome], images: Any = None, *, title: str | None = None,
                mass: float = 0.9, max_units: int = 2000, max_edges: int = 20000, n_patches: int = 6,
                patch_size: int = 24) -> str:
    """The viewer as one HTML string (see :func:`write_viewer`)."""
    if isinstance(graphs, Connectome):
        graphs = {str(graphs.meta.get("category") or graphs.meta.get("model") or "graph"): graphs}
    if not graphs:
        raise ValueError("graphs is empty; pass a Connectome or a dict of category -> Connectome")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    from connectome._text import printable

    cats = []
    for name, g in graphs.items():
        if not isinstance(g, Connectome):
            raise TypeError(f"graphs[{name!r}] is a {type(g).__name__}, not a Connectome")
        imgs = images.get(name) if isinstance(images, Mapping) else images
        cats.append(_category(for_display(g), printable(str(name)), imgs, mass, max_units, max_edges, n_patches,
                              patch_size))
    first = next(iter(graphs.values()))
    title = printable(title or f"connectome viewer: {first.meta.get('model', '')}".strip())
    return _fill(_PAGE, {
        "TITLE": html.escape(title),
        "CSP": html.escape(content_security_policy()),
        "CSS": _CSS,
        "DATA": inline_json({"title": title, "categories": cats}),
        "SCRIPT": _SCRIPT,
    })


#: Characters that must not appear raw in JSON inside ``<script>``: ``<`` (``</script>``,
#: ``<!--``), ``>`` and ``&`` (kept out for good measure), and the line separators older
#: JavaScript parsers read as line ends.
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                 0x2028: "\\u2028", 0x2029: "\\u2029"}
_SLOT = re.compile(r"__(TITLE|CSP|CSS|DATA|SCRIPT)__")


def inline_json(obj: Any) -> str:
    """``obj`` as JSON that is safe inside an HTML ``<script type="application/json">`` element.

    Outside strings JSON holds none of the escaped characters, so the text parses back to
    ``obj`` with any JSON parser.

    Examples
    --------
    >>> inline_json({"name": "</script><!--"})
    '{"name":"\\\\u003c/script\\\\u003e\\\\u003c!--"}'
    """
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).translate(_JSON_ESCAPES)


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Every ``__NAME__`` slot of ``template`` filled in one pass: text put in a slot is never
    searched again, so a name that reads ``__DATA__`` stays a name."""
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy() -> str:
    """The page's Content-Security-Policy: its own inline script and style (by hash), data:
    images, nothing else (no network, no other script, no event handler attributes)."""
    return (f"default-src 'none'; script-src {_sha256_source(_SCRIPT)}; style-src {_sha256_source(_CSS)}; "
            "img-src data:; base-uri 'none'; form-action 'none'")


def write_viewer(graphs: Connectome | Mapping[str, Connectome], path: Any, images: Any = None, **kw: Any) -> Path:
    """Write the interactive circuit viewer: one self-contained HTML file.

    Parameters
    ----------
    graphs : Connectome or dict of str -> Connectome
        One graph, or the graphs of several categories of one model (a menu switches).
    path : str or PathLike
        The HTML file to write (atomically).
    images : optional
        The data the graphs' dataset examples index (see
        :func:`connectome.patches.image_source`); a dict per category is accepted. Default:
        the files or data spec in each graph's ``meta["examples"]``. Without images (or
        examples) the cards show numbers only.
    **kw
        ``title``, ``mass`` (largest circuit mass on the slider, default 0.9), ``max_units``
        (2000), ``max_edges`` (20000), ``n_patches`` (6), ``patch_size`` (24 pixels).

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> write_viewer(graphs, "viewer.html", images=data)   # doctest: +SKIP
    """
    from connectome.io import atomic_write

    text = viewer_html(graphs, images, **kw)
    p = Path(path)
    if not p.parent.is_dir():
        raise ConnectomeError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    with atomic_write(p) as fh:
        fh.write(text.encode("utf-8"))
    return p


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title><style>__CSS__</style></head>
<body>
<div id="bar">
  <b id="title">__TITLE__</b>
  <label>category <select id="cat"></select></label>
  <label>circuit mass <input id="mass" type="range" min="0" max="1" step="1" value="0"> <span id="massv"></span></label>
  <label><input id="search" type="search" placeholder="unit id, e.g. conv2:5" list="ids" size="18"></label>
  <datalist id="ids"></datalist>
  <span id="count"></span>
  <span class="legend"><i class="pos"></i>positive flow <i class="neg"></i>negative flow</span>
</div>
<canvas id="view"></canvas>
<div id="card" hidden></div>
<div id="help">drag to pan, wheel to zoom, hover a unit, click to pin (click empty space to unpin)</div>
<script type="application/json" id="data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_CSS = """
html, body { margin: 0; height: 100%; overflow: hidden; font: 13px -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #222; }
#bar { position: fixed; top: 0; left: 0; right: 0; height: 38px; display: flex; gap: 14px; align-items: center;
       padding: 0 10px; background: #f6f6f6; border-bottom: 1px solid #ddd; z-index: 2; white-space: nowrap; }
#view { position: fixed; top: 39px; left: 0; cursor: grab; }
#card { position: fixed; top: 48px; right: 10px; width: 320px; max-height: calc(100% - 70px); overflow: auto;
        background: #fff; border: 1px solid #bbb; border-radius: 6px; padding: 8px 10px; box-shadow: 0 2px 8px #0002; z-index: 3; }
#card.pinned { border-color: #333; border-width: 2px; }
#card h3 { margin: 0 0 4px 0; font: bold 14px monospace; }
#card table { border-collapse: collapse; width: 100%; }
#card td { padding: 1px 4px; } #card td.n { text-align: right; font-variant-numeric: tabular-nums; }
#card canvas { image-rendering: pixelated; display: block; margin: 4px 0; border: 1px solid #eee; }
#card .sub { color: #666; margin-top: 6px; }
#help { position: fixed; bottom: 6px; left: 10px; color: #888; font-size: 12px; }
.legend i { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin: 0 4px 0 8px; }
.legend i.pos { background: #d62728; } .legend i.neg { background: #1f77b4; }
#card td.pos { color: #d62728; } #card td.neg { color: #1f77b4; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var V = window.connectomeViewer = { ready: false, errors: [] };
  window.addEventListener("error", function (e) { V.errors.push(String(e.message || e)); });
  var D = JSON.parse(document.getElementById("data").textContent);
  var canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
  var card = document.getElementById("card"), sel = document.getElementById("cat");
  var slider = document.getElementById("mass"), massv = document.getElementById("massv");
  var search = document.getElementById("search"), count = document.getElementById("count");
  var COLX = 220, ROWY = 16, POS = "214,39,40", NEG = "31,119,180";
  var C = null, view = { s: 1, tx: 0, ty: 0 }, hover = -1, pinned = -1, lv = 0, sprite = null;
  var inE = [], outE = [], wx = [], wy = [], rad = [], shown = [], maxW = 1;

  function fmt(v) { return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : v.toFixed(3); }

  function load(i) {
    C = D.categories[i];
    var n = C.nodes.id.length, E = C.edges, maxA = 0;
    inE = []; outE = []; wx = []; wy = []; rad = []; maxW = 0;
    for (var k = 0; k < n; k++) { inE.push([]); outE.push([]); maxA = Math.max(maxA, Math.abs(C.nodes.attr[k])); }
    for (var e = 0; e < E.s.length; e++) { outE[E.s[e]].push(e); inE[E.t[e]].push(e); maxW = Math.max(maxW, Math.abs(E.w[e])); }
    var byW = function (a, b) { return Math.abs(E.w[b]) - Math.abs(E.w[a]); };
    for (k = 0; k < n; k++) {
      inE[k].sort(byW); outE[k].sort(byW);
      wx.push(C.nodes.col[k] * COLX); wy.push(C.nodes.y[k] * ROWY);
      rad.push(2.5 + 7 * Math.sqrt(maxA > 0 ? Math.abs(C.nodes.attr[k]) / maxA : 0));
    }
    sprite = null;
    if (C.sprite) { sprite = new Image(); sprite.onload = function () { showCard(); }; sprite.src = C.sprite; }
    var dl = document.getElementById("ids"); dl.textContent = "";
    C.nodes.id.forEach(function (id) { var o = document.createElement("option"); o.value = id; dl.appendChild(o); });
    hover = -1; pinned = -1; card.hidden = true;
    filter(); fit(); draw();
  }

  function filter() {
    lv = Math.min(lv, C.levels.length - 1);
    shown = C.nodes.mask.map(function (m) { return ((m >> lv) & 1) === 1; });
    var nu = shown.filter(Boolean).length, ne = 0;
    for (var e = 0; e < C.edges.s.length; e++) if (shown[C.edges.s[e]] && shown[C.edges.t[e]]) ne++;
    massv.textContent = Math.round(C.levels[lv] * 100) + "%";
    slider.max = C.levels.length - 1; slider.value = lv;
    count.textContent = nu + " units, " + ne + " edges" + (C.target ? " into " + C.target : "");
  }

  function fit() {
    var w = canvas.width / devicePixelRatio, h = canvas.height / devicePixelRatio;
    var x1 = Math.max(COLX, (C.layers.length - 1) * COLX), ys = C.nodes.y, y0 = 0, y1 = 0;
    for (var k = 0; k < ys.length; k++) { y0 = Math.min(y0, ys[k] * ROWY); y1 = Math.max(y1, ys[k] * ROWY); }
    view.s = Math.min((w - 80) / x1, (h - 80) / Math.max(ROWY, y1 - y0), 4);
    view.tx = 40 - 0 * view.s + (w - 80 - x1 * view.s) / 2;
    view.ty = h / 2 - (y0 + y1) / 2 * view.s;
  }

  function sx(k) { return wx[k] * view.s + view.tx; }
  function sy(k) { return wy[k] * view.s + view.ty; }

  function resize() {
    canvas.width = window.innerWidth * devicePixelRatio;
    canvas.height = (window.innerHeight - 39) * devicePixelRatio;
    canvas.style.width = window.innerWidth + "px"; canvas.style.height = (window.innerHeight - 39) + "px";
  }

  function focusNode() { return pinned >= 0 ? pinned : hover; }

  function strokeEdges(list, width, alphaScale) {
    var E = C.edges, buckets = {};
    for (var q = 0; q < list.length; q++) {
      var e = list[q], a = Math.sqrt(Math.abs(E.w[e]) / maxW);
      var key = (E.w[e] >= 0 ? "p" : "n") + Math.min(4, Math.floor(a * 5));
      (buckets[key] = buckets[key] || []).push(e);
    }
    Object.keys(buckets).forEach(function (key) {
      var a = (parseInt(key.slice(1), 10) + 1) / 5;
      ctx.strokeStyle = "rgba(" + (key[0] === "p" ? POS : NEG) + "," + Math.min(1, (0.08 + 0.8 * a) * alphaScale) + ")";
      ctx.lineWidth = width * (0.5 + 1.5 * a);
      ctx.beginPath();
      buckets[key].forEach(function (e) {
        var s = E.s[e], t = E.t[e];
        ctx.moveTo(sx(s), sy(s)); ctx.lineTo(sx(t), sy(t));
      });
      ctx.stroke();
    });
  }

  function topEdges(k) {
    return inE[k].filter(function (e) { return shown[C.edges.s[e]]; }).slice(0, 5)
      .concat(outE[k].filter(function (e) { return shown[C.edges.t[e]]; }).slice(0, 5));
  }

  function draw() {
    var t0 = performance.now(), w = canvas.width, h = canvas.height;
    ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.clearRect(0, 0, w, h);
    ctx.setTransform(devicePixelRatio, 0, 0, devicePixelRatio, 0, 0);
    var f = focusNode(), E = C.edges, vis = [];
    for (var e = 0; e < E.s.length; e++) if (shown[E.s[e]] && shown[E.t[e]]) vis.push(e);
    strokeEdges(vis, 1, f >= 0 ? 0.35 : 1);
    if (f >= 0) strokeEdges(topEdges(f), 2.5, 1.6);
    ctx.fillStyle = "#555"; ctx.font = "11px sans-serif"; ctx.textAlign = "center";
    C.layers.forEach(function (name, c) { ctx.fillText(name, c * COLX * view.s + view.tx, 14); });
    var hl = {};
    if (f >= 0) { hl[f] = 1; topEdges(f).forEach(function (e) { hl[E.s[e]] = 1; hl[E.t[e]] = 1; }); }
    for (var k = 0; k < wx.length; k++) {
      if (!shown[k]) continue;
      var r = rad[k] * Math.min(1.6, Math.max(0.6, Math.sqrt(view.s)));
      ctx.globalAlpha = f >= 0 && !hl[k] ? 0.35 : 1;
      ctx.beginPath(); ctx.arc(sx(k), sy(k), r, 0, 6.2832);
      ctx.fillStyle = C.nodes.rgb[k]; ctx.fill();
      if (k === f) { ctx.lineWidth = 2.5; ctx.strokeStyle = "#000"; ctx.stroke(); }
    }
    ctx.globalAlpha = 1;
    V.lastDrawMs = performance.now() - t0;
  }

  function nearest(mx, my) {
    var best = -1, bd = 100;
    for (var k = 0; k < wx.length; k++) {
      if (!shown[k]) continue;
      var dx = sx(k) - mx, dy = sy(k) - my, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = k; }
    }
    return best;
  }

  // Names reach the page only as text (textContent): a unit, layer or category called
  // "<img onerror=...>" is shown as those characters, never parsed as HTML.
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function table(rows) {  // rows: [label, value, class of the value cell]
    var t = el("table");
    rows.forEach(function (r) {
      var tr = el("tr"); tr.appendChild(el("td", r[0])); tr.appendChild(el("td", r[1], "n" + (r[2] ? " " + r[2] : "")));
      t.appendChild(tr);
    });
    return t;
  }

  function edgeRows(list, other) {
    var E = C.edges;
    return list.slice(0, 5).map(function (e) { return [C.nodes.id[other(e)], fmt(E.w[e]), E.w[e] >= 0 ? "pos" : "neg"]; });
  }

  function showCard() {
    var k = focusNode();
    if (k < 0) { card.hidden = true; return; }
    var N = C.nodes, E = C.edges, masses = C.levels.filter(function (m, j) { return (N.mask[k] >> j) & 1; });
    var parts = [el("h3", N.id[k]), table([
      ["attribution", fmt(N.attr[k])], ["flow in", fmt(N.fin[k])], ["flow out", fmt(N.fout[k])],
      ["community", N.comm[k] >= 0 ? N.comm[k] : "-"],
      ["in the circuits of mass", masses.map(function (m) { return Math.round(m * 100); }).join(", ") + "%"]])];
    if (N.row[k] >= 0) {
      parts.push(el("div", "top images, cropped to the receptive field", "sub"));
      var pcv = el("canvas"); pcv.id = "patches"; parts.push(pcv);
    }
    var ins = inE[k].filter(function (e) { return shown[E.s[e]]; });
    var outs = outE[k].filter(function (e) { return shown[E.t[e]]; });
    if (ins.length) parts.push(el("div", "strongest inputs", "sub"), table(edgeRows(ins, function (e) { return E.s[e]; })));
    if (outs.length) parts.push(el("div", "strongest outputs", "sub"), table(edgeRows(outs, function (e) { return E.t[e]; })));
    card.textContent = "";
    parts.forEach(function (p) { card.appendChild(p); });
    card.className = pinned >= 0 ? "pinned" : "";
    var left = sx(k) > canvas.width / devicePixelRatio / 2;  // on the other side: never over the unit
    card.style.left = left ? "10px" : "auto"; card.style.right = left ? "auto" : "10px";
    card.hidden = false;
    card.dataset.unit = N.id[k];
    var pc = document.getElementById("patches");
    if (pc && sprite && sprite.complete && sprite.naturalWidth) {
      var p = C.patch, n = C.npatch, r = N.row[k], gap = 3, scale = Math.max(1, (296 - gap * n) / (p * n));
      pc.width = Math.round((p * scale + gap) * n - gap); pc.height = Math.round(p * scale);
      var g = pc.getContext("2d"); g.imageSmoothingEnabled = false;
      for (var j = 0; j < n; j++)
        g.drawImage(sprite, ((r % C.perRow) * n + j) * p, Math.floor(r / C.perRow) * p, p, p,
                    j * (p * scale + gap), 0, p * scale, p * scale);
    }
  }

  var drag = null, pending = false;
  function redraw() { if (!pending) { pending = true; requestAnimationFrame(function () { pending = false; draw(); }); } }
  canvas.addEventListener("mousedown", function (e) { drag = { x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty, moved: false }; });
  window.addEventListener("mouseup", function (e) {
    if (drag && !drag.moved) {
      var r = canvas.getBoundingClientRect(), k = nearest(e.clientX - r.left, e.clientY - r.top);
      if (e.target === canvas) { pinned = k; showCard(); redraw(); }
    }
    drag = null;
  });
  canvas.addEventListener("mousemove", function (e) {
    var r = canvas.getBoundingClientRect();
    if (drag) {
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) { view.tx = drag.tx + dx; view.ty = drag.ty + dy; redraw(); }
      return;
    }
    var k = nearest(e.clientX - r.left, e.clientY - r.top);
    if (k !== hover) { hover = k; if (pinned < 0) showCard(); redraw(); }
  });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    var r = canvas.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
    var z = Math.exp(-e.deltaY * 0.0015);
    view.tx = mx - (mx - view.tx) * z; view.ty = my - (my - view.ty) * z; view.s *= z;
    redraw();
  }, { passive: false });
  slider.addEventListener("input", function () {
    lv = parseInt(slider.value, 10); filter();
    if (pinned >= 0 && !shown[pinned]) pinned = -1;
    if (hover >= 0 && !shown[hover]) hover = -1;
    showCard(); redraw();
  });
  sel.addEventListener("change", function () { load(sel.selectedIndex); });
  search.addEventListener("change", function () { find(search.value); });
  search.addEventListener("keydown", function (e) { if (e.key === "Enter") find(search.value); });
  window.addEventListener("resize", function () { resize(); draw(); });

  function find(text) {
    text = String(text).trim();
    if (!text) return -1;
    var ids = C.nodes.id, k = ids.indexOf(text);
    if (k < 0) for (var q = 0; q < ids.length; q++) if (ids[q].indexOf(text) >= 0) { k = q; break; }
    if (k < 0) { search.style.background = "#fdd"; return -1; }
    search.style.background = "";
    if (!shown[k]) {  // the nearest circuit that holds it
      var best = -1;
      for (var j = 0; j < C.levels.length; j++) if ((C.nodes.mask[k] >> j) & 1 && (best < 0 || Math.abs(j - lv) < Math.abs(best - lv))) best = j;
      lv = best; filter();
    }
    pinned = k;
    var w = canvas.width / devicePixelRatio, h = canvas.height / devicePixelRatio;
    view.tx = w / 2 - wx[k] * view.s; view.ty = h / 2 - wy[k] * view.s;
    showCard(); draw();
    return k;
  }

  D.categories.forEach(function (c, i) {
    var o = document.createElement("option"); o.textContent = c.name + (c.target && c.target !== c.name ? " (" + c.target + ")" : "");
    sel.appendChild(o);
  });
  var L0 = D.categories[0].levels;  // start at the circuit of mass 0.3, or the nearest level
  lv = L0.reduce(function (b, m, j) { return Math.abs(m - 0.3) < Math.abs(L0[b] - 0.3) ? j : b; }, 0);
  resize(); load(0);
  V.find = find;
  V.category = function (i) { sel.selectedIndex = i; load(i); };
  V.setMass = function (m) {  // the largest level not above m
    var j = 0; C.levels.forEach(function (v, q) { if (v <= m + 1e-9) j = q; });
    slider.value = j; slider.dispatchEvent(new Event("input"));
  };
  V.state = function () {
    return { category: C.name, units: shown.filter(Boolean).length, hover: hover >= 0 ? C.nodes.id[hover] : null,
             pinned: pinned >= 0 ? C.nodes.id[pinned] : null, mass: C.levels[lv] };
  };
  V.screenOf = function (id) {
    var k = C.nodes.id.indexOf(id);
    if (k < 0 || !shown[k]) return null;
    var r = canvas.getBoundingClientRect();
    return [sx(k) + r.left, sy(k) + r.top];
  };
  V.visibleUnits = function () { return C.nodes.id.filter(function (id, k) { return shown[k]; }); };
  V.ready = true;
})();
"""
