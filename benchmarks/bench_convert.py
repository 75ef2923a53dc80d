"""``to_networkx`` / ``to_igraph`` against the per-edge Python code they replaced, in one run.

Graph: the synthetic ResNet-50-like layered graph of ``bench_analysis.py`` (27,563 units,
``--fan-in`` random inputs per unit; 16 gives 0.44M edges, 64 gives 1.8M) with an
``attribution`` node column and an ``abs_weight`` edge column, as an attribution graph has.

Baselines (the code before issue 14, kept here verbatim in spirit):

- networkx: ``G.add_node`` per node, ``G.add_edges_from`` with one attribute dict built per
  edge;
- igraph: ``ig.Graph(edges=list(zip(src, dst)))`` and every attribute as a list.

Ours: ``g.to_networkx()`` (adjacency filled run by run from arrays) and ``g.to_igraph()``
cold (topology cache cleared: the build itself) and warm (a second graph of the same
edges, e.g. another category: a C copy of the cached topology).

Memory: the rise of the peak resident set during each conversion (``VmHWM`` reset through
``/proc/self/clear_refs`` before it), against the bytes of the Connectome's own arrays.

Run: ``python benchmarks/bench_convert.py [--fan-in 16] [--repeat 3]``; writes
``benchmarks/results/convert.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import connectome._igraph as igraph_cache  # noqa: E402
from bench_analysis import random_layered, resnet50_layers  # noqa: E402
from bench_tour import _peak_kb, _reset_peak  # noqa: E402
from connectome.graph import Connectome  # noqa: E402


def old_to_networkx(g: Connectome) -> Any:
    import networkx as nx

    G = nx.DiGraph()
    G.graph["layers"] = [l.to_dict() for l in g.layers]
    G.graph["meta"] = dict(g.meta)
    ids = g.node_ids.tolist()
    labels = g.node_labels.tolist()
    cols = {k: v.tolist() for k, v in g.node_attrs.items()}
    for i, nid in enumerate(ids):
        l = g.layers[g.node_layer[i]]
        d = {"layer": l.name, "index": int(g.node_units[i]), "kind": l.kind, "label": labels[i]}
        for k, v in cols.items():
            d[k] = v[i]
        G.add_node(nid, **d)
    ecols = {"weight": g.weight.tolist(), **{k: v.tolist() for k, v in g.edge_attrs.items()}}
    s, t = g.src.tolist(), g.dst.tolist()
    G.add_edges_from((ids[s[e]], ids[t[e]], {k: v[e] for k, v in ecols.items()}) for e in range(g.num_edges))
    return G


def old_to_igraph(g: Connectome) -> Any:
    import igraph as ig

    G = ig.Graph(n=g.num_nodes, edges=list(zip(g.src.tolist(), g.dst.tolist())), directed=True)
    G.vs["name"] = g.node_ids.tolist()
    G.vs["layer"] = [g.layers[i].name for i in g.node_layer]
    G.vs["index"] = g.node_units.tolist()
    G.vs["label"] = g.node_labels.tolist()
    for k, v in g.node_attrs.items():
        G.vs[k] = v.tolist()
    G.es["weight"] = g.weight.tolist()
    for k, v in g.edge_attrs.items():
        G.es[k] = v.tolist()
    return G


def measure(fn: Callable[[], Any], repeat: int, before: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(best seconds, peak RSS rise in MB) over ``repeat`` runs; the result is dropped each time."""
    best, rise = float("inf"), 0.0
    for _ in range(repeat):
        before()
        gc.collect()
        _reset_peak()
        start = _peak_kb() or 0
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        rise = max(rise, ((_peak_kb() or 0) - start) / 1024)
        del out
        best = min(best, dt)
    return best, rise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fan-in", type=int, default=16, help="inputs per unit (16: 0.44M edges)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best time counts")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert.json"), help="JSON results file")
    a = ap.parse_args(argv)
    g = random_layered(resnet50_layers(), fan_in=a.fan_in)
    rng = np.random.default_rng(0)
    g = g.with_node_attrs(attribution=rng.normal(size=g.num_nodes)).with_edge_attrs(abs_weight=np.abs(g.weight))
    other = g.with_weight(g.weight * 2)  # same edges: what another category's graph looks like to the cache
    graph_mb = (g.src.nbytes + g.dst.nbytes + g.weight.nbytes + sum(v.nbytes for v in g.edge_attrs.values())) / 2**20
    print(f"graph: {g.num_nodes:,} units, {g.num_edges:,} edges, {graph_mb:.0f} MB of edge arrays; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []

    def row(task: str, base: tuple[float, float], ours: tuple[float, float]) -> None:
        r = {"task": task, "baseline_s": base[0], "ours_s": ours[0], "ratio": base[0] / ours[0],
             "baseline_peak_rise_mb": base[1], "ours_peak_rise_mb": ours[1]}
        rows.append(r)
        print(f"  {task:<28} baseline {base[0]:8.2f} s {base[1]:7.0f} MB   ours {ours[0]:8.2f} s {ours[1]:7.0f} MB   "
              f"{r['ratio']:5.1f}x faster", flush=True)

    row("to_networkx", measure(lambda: old_to_networkx(g), a.repeat), measure(g.to_networkx, a.repeat))
    base_ig = measure(lambda: old_to_igraph(g), a.repeat)
    row("to_igraph (cold)", base_ig, measure(g.to_igraph, a.repeat, before=igraph_cache.clear))
    igraph_cache.clear()
    g.to_igraph()
    row("to_igraph (same edges cached)", base_ig, measure(other.to_igraph, a.repeat))
    result = {"graph": {"units": g.num_nodes, "edges": g.num_edges, "edge_arrays_mb": graph_mb, "fan_in": a.fan_in},
              "rows": rows, "load_avg_1m": os.getloadavg()[0]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
