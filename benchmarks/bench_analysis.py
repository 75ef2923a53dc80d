"""Graph analysis against the plain networkx way, timed in the same run.

Graphs (default): the ResNet-50 weight connectome (random init; only the wiring matters
for timing), pruned ``top_k=16``, and attribution graphs of two zoo models. With
``--synthetic``, generated graphs of the same shapes (seeded, no torch):

- ``resnet50-like``: the conv layers of ResNet-50 (bottleneck widths 64..2048, with the
  downsample projections) plus input and a 1000-way output: 27,563 units in 55 layers.
  Every unit draws 16 distinct random inputs (a ``prune(top_k=16)`` graph) from the
  previous layer, or, for 30% of layers, from the previous two (skip connections).
  ``--quick`` uses a quarter of every width (6,899 units).
- ``simplecnn-like`` and ``smallresnet-like``: dense unit graphs shaped like the zoo
  models (124 and 300 units), residual adds as identity edges.

Tasks, each side from the same Connectome:

- convert: ours = the bare igraph topology (``analysis._util.topology``); networkx = a
  ``DiGraph`` with ``|w|`` and ``-log`` distance edge attributes (the minimum the
  networkx calls below need; ``g.to_networkx()`` with every attribute is slower still and
  is timed for reference).
- pagerank on ``|w|``: ``centrality(g, ["pagerank"])`` vs ``nx.pagerank``.
- betweenness with ``-log(|w|/max|w|)`` lengths from the same number of sampled sources:
  ``centrality(g, ["betweenness"], betweenness_samples=k)`` vs
  ``nx.betweenness_centrality(k=k)`` (exact on the small graphs).
- communities: ``communities(g)`` (Leiden, igraph engine; the leidenalg engine too) vs
  ``nx.community.louvain_communities``, all three optimising directed modularity on
  ``|w|``; the modularity each reaches is reported.

``ratio`` = networkx time / ours, algorithm against algorithm (ours includes building the
weight lists it passes to igraph; the igraph topology is cached per Connectome, as in a
session that runs several analyses); ``ratio_e2e`` adds each side's conversion from the
Connectome. Times are the minimum over repeats.

Run: ``python benchmarks/bench_analysis.py [--quick]``; writes
``benchmarks/results/analysis.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

util_mod = importlib.import_module("connectome.analysis._util")
import connectome._igraph as igraph_cache  # noqa: E402
from connectome.analysis.centrality import ZERO_DISTANCE, centrality  # noqa: E402
from connectome.analysis.communities import communities  # noqa: E402
from connectome.graph import Connectome, Layer  # noqa: E402

GOALS = {(big, task): goal for big in ("resnet50-like", "resnet50 weights top_k=16")
         for task, goal in (("pagerank", 20.0), ("communities", 10.0))}


# ----------------------------------------------------------------------------- graphs
def resnet50_layers(div: int = 1) -> list[tuple[str, str, int]]:
    layers = [("input", "input", 3), ("conv1", "conv", 64 // div)]
    for stage, (w, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        w //= div
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            layers += [(f"{p}.conv1", "conv", w), (f"{p}.conv2", "conv", w), (f"{p}.conv3", "conv", 4 * w)]
            if b == 0:
                layers.append((f"{p}.downsample", "conv", 4 * w))
    layers.append(("fc", "output", 1000 // div))
    return layers


def random_layered(layers: list[tuple[str, str, int]], fan_in: int = 16, skip_p: float = 0.3, seed: int = 0) -> Connectome:
    """Each unit gets ``fan_in`` distinct random inputs from the previous 1-2 layers."""
    rng = np.random.default_rng(seed)
    sizes = np.array([s for _, _, s in layers])
    off = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for li in range(1, len(layers)):
        lo = off[li - 2] if li >= 2 and rng.random() < skip_p else off[li - 1]
        pool, n = off[li] - lo, sizes[li]
        k = min(fan_in, pool)
        # k distinct inputs per unit: the k smallest of random keys
        cols = np.argpartition(rng.random((n, pool)), k - 1, axis=1)[:, :k] if k < pool else np.tile(np.arange(pool), (n, 1))
        src.append((cols + lo).ravel())
        dst.append(np.repeat(np.arange(off[li], off[li + 1]), k))
    src, dst = np.concatenate(src), np.concatenate(dst)
    weight = (rng.laplace(size=src.size) * 0.05).astype(np.float32)
    return Connectome(
        layers=tuple(Layer(n, k, s) for n, k, s in layers),
        node_units=np.concatenate([np.arange(s) for s in sizes]),
        src=src, dst=dst, weight=weight,
        meta={"model": "synthetic resnet50-like", "fan_in": fan_in, "seed": seed},
    )


def dense_layered(spec: list[tuple[str, str, int, list[tuple[str, str]]]], seed: int = 0) -> Connectome:
    """Layers wired ``dense`` (all pairs) or ``identity`` (unit i -> unit i) to named sources."""
    rng = np.random.default_rng(seed)
    pos, off = {}, [0]
    for name, _, size, _ in spec:
        pos[name] = len(off) - 1
        off.append(off[-1] + size)
    src, dst = [], []
    for name, _, size, inputs in spec:
        d0 = off[pos[name]]
        for sname, how in inputs:
            s0, ssize = off[pos[sname]], spec[pos[sname]][2]
            if how == "dense":
                i, j = np.meshgrid(np.arange(ssize), np.arange(size), indexing="ij")
                src.append(i.ravel() + s0)
                dst.append(j.ravel() + d0)
            else:
                src.append(np.arange(size) + s0)
                dst.append(np.arange(size) + d0)
    src, dst = np.concatenate(src), np.concatenate(dst)
    return Connectome(
        layers=tuple(Layer(n, k, s) for n, k, s, _ in spec),
        node_units=np.concatenate([np.arange(s) for _, _, s, _ in spec]),
        src=src, dst=dst, weight=rng.normal(size=src.size).astype(np.float32),
    )


def simplecnn_like() -> Connectome:
    return dense_layered([
        ("input", "input", 3, []),
        ("conv1", "conv", 16, [("input", "dense")]),
        ("conv2", "conv", 32, [("conv1", "dense")]),
        ("conv3", "conv", 64, [("conv2", "dense")]),
        ("fc", "output", 9, [("conv3", "dense")]),
    ], seed=1)


def smallresnet_like() -> Connectome:
    d = "dense"
    return dense_layered([
        ("input", "input", 3, []),
        ("conv1", "conv", 16, [("input", d)]),
        ("layer1.conv1", "conv", 16, [("conv1", d)]),
        ("layer1.conv2", "conv", 16, [("layer1.conv1", d)]),
        ("layer1.add", "residual", 16, [("layer1.conv2", "identity"), ("conv1", "identity")]),
        ("layer2.conv1", "conv", 32, [("layer1.add", d)]),
        ("layer2.conv2", "conv", 32, [("layer2.conv1", d)]),
        ("layer2.shortcut_conv", "conv", 32, [("layer1.add", d)]),
        ("layer2.add", "residual", 32, [("layer2.conv2", "identity"), ("layer2.shortcut_conv", "identity")]),
        ("layer3.conv1", "conv", 32, [("layer2.add", d)]),
        ("layer3.conv2", "conv", 32, [("layer3.conv1", d)]),
        ("layer3.add", "residual", 32, [("layer3.conv2", "identity"), ("layer2.add", "identity")]),
        ("fc", "output", 9, [("layer3.add", d)]),
    ], seed=2)


# ----------------------------------------------------------------------------- timing
def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def nx_graph(g: Connectome):
    import networkx as nx

    a = np.abs(g.weight.astype(np.float64))
    dist = np.maximum(-np.log(a / a.max()), ZERO_DISTANCE)
    G = nx.DiGraph()
    G.add_nodes_from(range(g.num_nodes))
    G.add_edges_from(
        (s, d, {"weight": w, "dist": x})
        for s, d, w, x in zip(g.src.tolist(), g.dst.tolist(), a.tolist(), dist.tolist())
    )
    return G


def directed_modularity(g: Connectome, membership: np.ndarray) -> float:
    G = util_mod.topology(g)
    return float(G.modularity(membership.tolist(), weights=np.abs(g.weight).astype(np.float64).tolist(), directed=True))


def bench_graph(name: str, g: Connectome, *, samples: int | None, big: bool, quick: bool) -> list[dict[str, Any]]:
    import networkx as nx

    rep_fast = 3 if quick else 5
    rep_nx = 1 if big else (2 if quick else 3)
    rows: list[dict[str, Any]] = []

    def row(task: str, t_nx: float, t_ours: float, conv_nx: float | None, conv_ours: float | None, **extra: Any) -> None:
        r = {"graph": name, "task": task, "networkx_s": t_nx, "ours_s": t_ours, "ratio": t_nx / t_ours}
        if conv_nx is not None:
            r["ratio_e2e"] = (t_nx + conv_nx) / (t_ours + conv_ours)
        r.update(extra)
        goal = GOALS.get((name, task))
        if goal is not None:
            r["goal"] = goal
            r["goal_met"] = r["ratio"] >= goal
        rows.append(r)
        print(
            f"  {task:<24} networkx {t_nx:9.4f} s   ours {t_ours:9.4f} s   ratio {r['ratio']:8.1f}x"
            + (f"   e2e {r['ratio_e2e']:6.1f}x" if "ratio_e2e" in r else "")
            + (f"   (goal {goal:.0f}x: {'met' if r['goal_met'] else 'MISSED'})" if goal else ""),
            flush=True,
        )

    def ours_topology():
        igraph_cache.clear()
        return util_mod.topology(g)

    conv_ours, _ = best_of(ours_topology, rep_fast)
    conv_nx, G = best_of(lambda: nx_graph(g), 1 if big else rep_nx)
    row("convert", conv_nx, conv_ours, None, None)
    if not quick or not big:
        t_full, _ = best_of(g.to_networkx, 1)
        rows[-1]["to_networkx_all_attributes_s"] = t_full
        print(f"  {'':<24} (g.to_networkx() with every attribute: {t_full:.3f} s)")

    t_nx, pr_nx = best_of(lambda: nx.pagerank(G, weight="weight"), rep_nx)
    t_ours, pr = best_of(lambda: centrality(g, ["pagerank"])["pagerank"], rep_fast)
    diff = float(np.abs(pr - np.array([pr_nx[i] for i in range(g.num_nodes)])).max())
    row("pagerank", t_nx, t_ours, conv_nx, conv_ours, max_abs_diff=diff)

    k = samples if samples is not None and samples < g.num_nodes else None
    t_nx, b_nx = best_of(lambda: nx.betweenness_centrality(G, k=k, weight="dist", normalized=False, seed=0), rep_nx)
    t_ours, b = best_of(lambda: centrality(g, ["betweenness"], betweenness_samples=k)["betweenness"], rep_fast)
    extra: dict[str, Any] = {"sources": k if k is not None else g.num_nodes}
    if k is None:
        extra["max_abs_diff"] = float(np.abs(b - np.array([b_nx[i] for i in range(g.num_nodes)])).max())
    row("betweenness" + (f" (k={k})" if k else " (exact)"), t_nx, t_ours, conv_nx, conv_ours, **extra)

    t_nx, comms = best_of(lambda: nx.community.louvain_communities(G, weight="weight", seed=0), rep_nx)
    m_nx = np.empty(g.num_nodes, dtype=np.int64)
    for c, members in enumerate(comms):
        m_nx[list(members)] = c
    t_ours, p = best_of(lambda: communities(g, seed=0), rep_fast)
    row("communities", t_nx, t_ours, conv_nx, conv_ours,
        modularity_networkx=directed_modularity(g, m_nx), modularity_ours=p.quality,
        n_communities_networkx=len(comms), n_communities_ours=p.n_communities,
        engine="igraph Leiden vs networkx Louvain")
    t_la, p_la = best_of(lambda: communities(g, seed=0, engine="leidenalg"), 1 if big else rep_fast)
    row("communities (leidenalg)", t_nx, t_la, conv_nx, conv_ours,
        modularity_networkx=directed_modularity(g, m_nx), modularity_ours=p_la.quality,
        n_communities_ours=p_la.n_communities, engine="leidenalg Leiden vs networkx Louvain")
    print(
        f"  {'':<24} directed modularity: networkx Louvain {directed_modularity(g, m_nx):.4f} "
        f"({len(comms)}), igraph Leiden {p.quality:.4f} ({p.n_communities}), "
        f"leidenalg {p_la.quality:.4f} ({p_la.n_communities})"
    )
    return rows


def real_graphs(quick: bool) -> list[tuple[str, Connectome, bool]]:
    """The real graphs: zoo attribution graphs and the ResNet-50 weight connectome, pruned top_k=16."""
    import torchvision

    from connectome import extract, zoo

    data = zoo.shapes(8, seed=12345)
    out = []
    for name in ("simplecnn_a", "smallresnet"):
        g = extract.attribution(zoo.load_model(name), data, progress=False, device="cpu")
        out.append((f"zoo {name} (attribution)", g, False))
    size = 64 if quick else 224
    r50 = extract.weights(torchvision.models.resnet50(weights=None), (3, size, size)).prune(top_k=16)
    out.append(("resnet50 weights top_k=16", r50, True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter-width ResNet-50-like graph, fewer repeats")
    ap.add_argument("--samples", type=int, default=16, help="betweenness sources on the big graph (default 16)")
    ap.add_argument("--synthetic", action="store_true",
                    help="generated graphs of the same shapes instead of the real ResNet-50 and zoo graphs (no torch)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis.json"))
    args = ap.parse_args(argv)

    import igraph
    import leidenalg
    import networkx

    t0 = time.perf_counter()
    if args.synthetic:
        graphs = [
            ("simplecnn-like", simplecnn_like(), False),
            ("smallresnet-like", smallresnet_like(), False),
            ("resnet50-like", random_layered(resnet50_layers(4 if args.quick else 1)), True),
        ]
    else:
        graphs = real_graphs(args.quick)
    results: list[dict[str, Any]] = []
    info = {}
    for name, g, big in graphs:
        info[name] = {"units": g.num_nodes, "edges": g.num_edges, "layers": len(g.layers)}
        print(f"{name}: {g.num_nodes} units, {g.num_edges} edges, {len(g.layers)} layers", flush=True)
        results += bench_graph(name, g, samples=args.samples if big else None, big=big, quick=args.quick)

    print()
    print(f"{'graph':<17} {'task':<25} {'networkx s':>11} {'ours s':>9} {'ratio':>8} {'e2e':>7}")
    for r in results:
        e2e = f"{r['ratio_e2e']:6.1f}x" if "ratio_e2e" in r else ""
        print(f"{r['graph']:<17} {r['task']:<25} {r['networkx_s']:>11.4f} {r['ours_s']:>9.4f} {r['ratio']:>7.1f}x {e2e:>7}")
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.1f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "analysis",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": {"igraph": igraph.__version__, "leidenalg": leidenalg.version,
                     "networkx": networkx.__version__, "numpy": np.__version__},
        "graphs": info,
        "betweenness_samples": args.samples,
        "ratio": "networkx seconds / ours, algorithm only; ratio_e2e adds each side's conversion from the Connectome",
        "results": results,
        "total_s": total,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
