"""Reading GraphML back (``connectome.gephi.read_graphml``): linear in nodes x columns, and
its cost against the writer's on a 1M-edge file.

Three measurements, each against a baseline taken in the same run:

1. A ~1M-edge graph (5 layers, 6 node attribute columns besides the 10 the export adds) is
   written with ``connectome.io.write_graphml`` and read back with ``read_graphml``; prints
   both times and reader / writer. The graph read back is checked to be the one written.
2. Linearity: a graph of n nodes and one of 2n (one edge per node, the same columns) is
   read; prints the read time per node at each size and their ratio (1.0 is linear, 2.0
   quadratic).
3. The old algorithm as the baseline: the node-column assembly the reader had before
   (``cols.setdefault(k, [nan] * n_nodes)[i] = v``, which builds an n-long list for every
   value of every node: quadratic) against today's (``_node_columns``), on the same parsed
   rows of both files; prints time per node at n and 2n for each.

Times are CPU seconds of this process (every step is single-threaded); at n and 2n the
least of ``--repeat`` runs.

Usage: python benchmarks/bench_gephi_read.py [--edges 1000000] [--nodes 10000] [--repeat 3] [--skip-old]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from connectome import gephi, io
from connectome.graph import Connectome, Layer


def _graph(sizes: list[int], n_edges: int, seed: int = 0) -> Connectome:
    """Layers of ``sizes``, ``n_edges`` distinct random edges spread over consecutive layer pairs."""
    rng = np.random.default_rng(seed)
    off = np.r_[0, np.cumsum(sizes)]
    pairs = list(zip(range(len(sizes) - 1), range(1, len(sizes))))
    share = np.array([sizes[a] * sizes[b] for a, b in pairs], dtype=np.float64)
    per = np.floor(n_edges * share / share.sum()).astype(np.int64)
    per[-1] += n_edges - per.sum()
    src, dst = [], []
    for (a, b), m in zip(pairs, per.tolist()):
        flat = rng.choice(sizes[a] * sizes[b], size=min(m, sizes[a] * sizes[b]), replace=False)
        src.append(off[a] + flat // sizes[b])
        dst.append(off[b] + flat % sizes[b])
    src, dst = np.concatenate(src), np.concatenate(dst)
    n = int(off[-1])
    layers = tuple(Layer(f"layer{i}", "input" if i == 0 else "conv", s) for i, s in enumerate(sizes))
    attrs = {"attribution": rng.normal(size=n), "activation_mean": rng.random(n), "activation_max": rng.random(n) * 3,
             "pagerank": rng.random(n) / n, "community": rng.integers(0, 12, n), "in_circuit": rng.random(n) < 0.1}
    return Connectome(layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]), src=src, dst=dst,
                      weight=rng.normal(size=src.size), node_attrs=attrs, meta={"model": "bench"})


def _old_columns(nodes: list[tuple[Any, dict]]) -> dict[str, np.ndarray]:
    """The node-column assembly of read_graphml before issue 20 (quadratic), as it was."""
    cols: dict[str, list[Any]] = {}
    for i, (_, d) in enumerate(nodes):
        for k, v in d.items():
            if k in gephi.DRAWING_KEYS or k in ("layer", "index", "kind") or not gephi._number(v):
                continue
            cols.setdefault(k, [np.nan] * len(nodes))[i] = v
    out = {}
    for k, v in cols.items():
        if all(isinstance(x, (bool, np.bool_)) for x in v):
            out[k] = np.array(v, dtype=bool)
        else:
            ints = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v)
            out[k] = np.array(v, dtype=np.int64 if ints else np.float64)
    return out


def _timed(fn: Any, *args: Any, repeat: int = 1) -> tuple[float, Any]:
    """The least CPU seconds of ``repeat`` calls of ``fn(*args)`` (single-threaded work: on a
    shared machine wall time also counts the waits for a core) and its result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        out = fn(*args)
        best = min(best, time.process_time() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=10_000, help="n of the n / 2n linearity graphs")
    ap.add_argument("--repeat", type=int, default=3, help="least time of this many runs at n and 2n")
    ap.add_argument("--skip-old", action="store_true", help="leave out the old (quadratic) column assembly")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # 1. write and read a ~1M-edge file
        g = _graph([2_000, 8_000, 8_000, 8_000, 1_000], a.edges)
        path = Path(tmp) / "big.graphml"
        t_write, _ = _timed(io.write_graphml, g, path)
        t_read, back = _timed(gephi.read_graphml, path)
        same = (back.node_ids.tolist() == g.node_ids.tolist() and np.array_equal(back.src, g.src)
                and np.array_equal(back.dst, g.dst) and np.array_equal(back.weight, g.weight)
                and all(np.array_equal(back.node_attr(k), v) for k, v in g.node_attrs.items()))
        print(f"GraphML: {g.num_nodes:,} nodes, {g.num_edges:,} edges, "
              f"{path.stat().st_size / 1e6:,.0f} MB, read back identical: {same}")
        print(f"  write_graphml {t_write:7.2f} s   read_graphml {t_read:7.2f} s   (CPU)   "
              f"reader / writer {t_read / t_write:5.2f}")

        # 2. and 3. n and 2n nodes
        print(f"\nlinearity: graphs of n and 2n nodes (one edge per node, {len(g.node_attrs)} attribute columns)")
        per_node: dict[str, list[float]] = {"read_graphml": [], "columns, new": [], "columns, old": []}
        for n in (a.nodes, 2 * a.nodes):
            h = _graph([n // 2, n - n // 2], n // 2, seed=1)
            p = Path(tmp) / f"n{n}.graphml"
            io.write_graphml(h, p)
            per_node["read_graphml"].append(_timed(gephi.read_graphml, p, repeat=a.repeat)[0] / n)
            rows = gephi._graphml_tables(p)[2]
            t_new, new = _timed(gephi._node_columns, rows, repeat=a.repeat)
            per_node["columns, new"].append(t_new / n)
            if not a.skip_old:
                t_old, old = _timed(_old_columns, rows, repeat=a.repeat)
                per_node["columns, old"].append(t_old / n)
                assert old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in old)
        print(f"  {'':14s} {'per node at n=' + format(a.nodes, ','):>22s} {'at 2n':>12s} {'2n / n':>8s}")
        for name, (t1, *rest) in ((k, v) for k, v in per_node.items() if v):
            t2 = rest[0]
            print(f"  {name:14s} {t1 * 1e6:19.2f} us {t2 * 1e6:9.2f} us {t2 / t1:8.2f}")
        if per_node["columns, old"]:
            old2, new2 = per_node["columns, old"][1], per_node["columns, new"][1]
            print(f"  old / new column assembly at 2n: {old2 / new2:,.0f}x")


if __name__ == "__main__":
    main()
