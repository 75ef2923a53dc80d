"""Speed and memory of the file writers on the full weight graph of ResNet-50 (15.5M edges).

Each writer (GraphML, GEXF, and the .npz of ``save``) writes the same graph to a temporary
folder; the baseline is ``np.savetxt`` of the same edge columns (source index, target index,
|w|, w as ``%.17g``, the digits the writers use), measured in the same run. Old-vs-new
cannot be measured in one run, so each writer is reported against the baseline and against
the graph's own size:

- seconds, edges per second, and time / baseline time;
- peak memory of the write: growth of the resident set's peak (Linux: ``VmHWM`` after
  ``malloc_trim`` and a reset of the peak), in MB and as a multiple of the graph's arrays
  (src, dst, weight and attributes);
- the file's size.

Usage: python benchmarks/bench_io.py [--model resnet50] [--size 224] [--edges N] [--skip-baseline]
``--edges N`` keeps the first N edges (a quick run). Writes benchmarks/results/io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _rss_kb(field: str) -> int | None:
    """A line of /proc/self/status in kB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _measure(fn: Callable[[], Any]) -> tuple[float, int | None]:
    """Seconds of ``fn()`` and the growth of the resident set's peak during it, in bytes.

    Freed memory is handed back to the OS first (``malloc_trim``) and the kernel's peak
    counter is reset (``/proc/self/clear_refs``), so the peak is this call's, and memory
    freed earlier cannot hide an allocation.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return seconds, None if before is None or peak is None else max(0, peak - before) * 1024


def _graph(model: str, size: int, n_edges: int | None) -> Any:
    import torch
    import torchvision

    import connectome as cn

    torch.manual_seed(0)
    m = getattr(torchvision.models, model)(weights=None).eval()
    g = cn.extract.weights(m, (3, size, size))
    if n_edges is not None and n_edges < g.num_edges:
        g = cn.Connectome(layers=g.layers, node_units=g.node_units, src=g.src[:n_edges], dst=g.dst[:n_edges],
                          weight=g.weight[:n_edges], node_attrs=g.node_attrs, meta=g.meta)
    return g


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--edges", type=int, default=None, help="keep only the first N edges")
    ap.add_argument("--skip-baseline", action="store_true", help="leave out np.savetxt (it is the slowest)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "io.json"))
    a = ap.parse_args(argv)

    from connectome import io as cio

    t0 = time.perf_counter()
    g = _graph(a.model, a.size, a.edges)
    build = time.perf_counter() - t0
    graph_bytes = g.src.nbytes + g.dst.nbytes + g.weight.nbytes + sum(v.nbytes for v in g.edge_attrs.values()) \
        + g.node_units.nbytes + sum(v.nbytes for v in g.node_attrs.values())
    print(f"{a.model} weights graph at {a.size}px: {g.num_nodes} units, {g.num_edges} edges, "
          f"{graph_bytes / 1e6:.0f} MB of arrays (built in {build:.1f} s)")

    def savetxt(path: Path) -> None:
        w = g.weight.astype(np.float64)
        cols = np.column_stack([g.src.astype(np.float64), g.dst.astype(np.float64), np.abs(w), w])
        np.savetxt(path, cols, fmt=["%d", "%d", "%.17g", "%.17g"])

    writers: list[tuple[str, Callable[[Path], None], str]] = [
        ("write_graphml", lambda p: cio.write_graphml(g, p), "g.graphml"),
        ("write_gexf", lambda p: cio.write_gexf(g, p), "g.gexf"),
        ("save (.npz)", lambda p: cio.save(g, p), "g.npz"),
    ]
    if not a.skip_baseline:
        writers.append(("np.savetxt (baseline)", savetxt, "g.txt"))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, fn, fname in writers:
            p = Path(d) / fname
            seconds, peak = _measure(lambda: fn(p))
            rows.append({"writer": name, "seconds": seconds, "edges_per_s": g.num_edges / seconds,
                         "peak_extra_mb": None if peak is None else peak / 1e6,
                         "peak_over_graph": None if peak is None else peak / graph_bytes,
                         "file_mb": p.stat().st_size / 1e6})
            p.unlink()
    base = next((r["seconds"] for r in rows if r["writer"].startswith("np.savetxt")), None)
    print(f"{'writer':<24}{'seconds':>9}{'edges/s':>12}{'x savetxt':>11}{'peak MB':>9}{'x graph':>9}{'file MB':>9}")
    for r in rows:
        r["over_baseline"] = r["seconds"] / base if base else None
        ratio = f"{r['over_baseline']:.2f}" if base else "-"
        mem = "        ?        ?" if r["peak_extra_mb"] is None else \
            f"{r['peak_extra_mb']:9.0f}{r['peak_over_graph']:9.2f}"
        print(f"{r['writer']:<24}{r['seconds']:9.1f}{r['edges_per_s']:12.0f}{ratio:>11}{mem}{r['file_mb']:9.0f}")
    result = {"model": a.model, "image_size": a.size, "num_nodes": g.num_nodes, "num_edges": g.num_edges,
              "graph_mb": graph_bytes / 1e6, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "numpy": np.__version__, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
