"""Many categories as a user runs them: `connectome extract` into one category store.

A synthetic ImageFolder is generated at run time (one random 32x32 PNG per category, folders
named by output unit, ``0000`` ...), and resnet18 (random weights, 1.9M edges) runs on the CPU
at 32 px, every run a fresh `python -m connectome extract` process. Measured in the same run:

- peak memory (the process's maximum resident set) of a run of ``--many`` categories against
  one of ``--few`` (the store keeps one category's sums and the topology, whatever the count);
- wall time of the ``--many``-category run against one `extract` of the same images as a
  single category (the baseline: the work without the per-category writing);
- bytes on disk per category: the store's size / categories against the mean ``.npz`` of the
  older layout (``--layout npz``, ``--few`` categories);
- seconds to open the store and list it (``cn.load(DIR)``), and to compare all categories
  (``compare_categories(store)``: flow and attribution correlations, circuit overlaps).

With ``--synthetic N``, also a store of N categories made from the first extracted graph (its
flows scaled at random per category, its circuit with 5% of units flipped), written with
``StoreWriter`` directly: the seconds to open it and to compare all N categories, without
computing N real categories.

Usage: python benchmarks/bench_categories.py [--many 1000] [--few 10] [--size 32] [--synthetic N]
Writes benchmarks/results/categories.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(u.ru_utime + u.ru_stime, u.ru_maxrss, rc)")


def _folder(root: Path, n: int, size: int, single: bool = False) -> Path:
    """``n`` categories of one image each (or, ``single``, the same ``n`` images in one category)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    data = root / ("single" if single else f"cats{n}")
    for i in range(n):
        d = data / ("0000" if single else f"{i:04d}")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return data


CPU: dict[str, float] = {}  # CPU seconds (user + system) of each run: on a machine shared with other jobs
# the wall time measures the load as much as the work


def _extract(data: Path, out: Path, size: int, *extra: str) -> tuple[float, float]:
    """Seconds and peak resident memory (MB) of one `connectome extract` process (its CPU seconds in ``CPU``)."""
    cmd = [sys.executable, "-m", "connectome", "extract", "torchvision:resnet18", str(data), "--out", str(out),
           "--image-size", str(size), "--device", "cpu", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    cpu, peak_kb, rc = done.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"extract failed:\n{done.stderr[-3000:]}")
    CPU[out.name] = float(cpu)
    return seconds, int(peak_kb) / 1024


def _bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def _synthetic(store, name: str, path: Path, n: int) -> dict:
    import connectome as cn
    from connectome.store import StoreWriter

    g = store[name]
    mask = np.asarray(store.array("circuit", "units")[store.entry(name)["row"]], dtype=np.int64)
    rng = np.random.default_rng(0)
    w = StoreWriter(path, {"model": "synthetic"})
    w.reserve(n)
    t = time.perf_counter()
    for i in range(n):
        m = mask.copy()
        flip = rng.random(m.size) < 0.05
        m[flip] = 1 - m[flip]
        w.write(str(i), g.with_weight(g.weight * rng.uniform(0.5, 1.5, g.num_edges)), m)
    s_write = time.perf_counter() - t
    t = time.perf_counter()
    s = cn.load(path)
    assert len(list(s)) == n
    s_open = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    cn.analysis.compare_categories(s)
    s_cmp, c_cmp = time.perf_counter() - t, time.process_time() - c
    print(f"synthetic store of {n} categories: written in {s_write:.0f} s, opened in {s_open * 1e3:.1f} ms, "
          f"compare_categories {s_cmp:.1f} s, {c_cmp:.1f} CPU s (goal < 60 s)")
    return {"categories": n, "seconds_write": s_write, "seconds_open": s_open, "seconds_compare": s_cmp,
            "cpu_seconds_compare": c_cmp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--few", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--synthetic", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import connectome as cn

    res: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "many": args.many, "few": args.few,
                 "size": args.size, "model": "torchvision:resnet18 (random weights)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        few, many = _folder(tmp_p, args.few, args.size), _folder(tmp_p, args.many, args.size)
        single = _folder(tmp_p, args.many, args.size, single=True)
        s_few, m_few = _extract(few, tmp_p / "store_few", args.size)
        s_many, m_many = _extract(many, tmp_p / "store_many", args.size)
        s_one, m_one = _extract(single, tmp_p / "store_one", args.size)
        s_npz, m_npz = _extract(few, tmp_p / "npz_few", args.size, "--layout", "npz")
        npz_each = _bytes(tmp_p / "npz_few", "*.npz") / args.few
        store_each = _bytes(tmp_p / "store_many") / args.many
        t = time.perf_counter()
        store = cn.load(tmp_p / "store_many")
        names = list(store)
        s_open = time.perf_counter() - t
        assert len(names) == args.many
        t, c = time.perf_counter(), time.process_time()
        r = cn.analysis.compare_categories(store)
        s_cmp, c_cmp = time.perf_counter() - t, time.process_time() - c
        res.update({
            "seconds": {"few": s_few, "many": s_many, "one_category_same_images": s_one, "npz_few": s_npz,
                        "open_store": s_open, "compare_categories": s_cmp},
            "cpu_seconds": {"few": CPU["store_few"], "many": CPU["store_many"],
                            "one_category_same_images": CPU["store_one"], "npz_few": CPU["npz_few"],
                            "compare_categories": c_cmp},
            "peak_mb": {"few": m_few, "many": m_many, "one_category_same_images": m_one, "npz_few": m_npz},
            "bytes_per_category": {"store": store_each, "npz": npz_each},
            "ratios": {
                "peak_memory_many_over_few": m_many / m_few,
                "wall_many_over_one_category": s_many / s_one,
                "cpu_many_over_one_category": CPU["store_many"] / CPU["store_one"],
                "bytes_store_over_npz": store_each / npz_each,
            },
            "jaccard_range": [float(np.nanmin(r.jaccard)), float(np.nanmax(r.jaccard[~np.eye(len(names), dtype=bool)]))],
        })
        if args.synthetic:
            res["synthetic"] = _synthetic(store, names[0], tmp_p / "synthetic", args.synthetic)
    print(json.dumps(res, indent=2))
    out = ROOT / "benchmarks" / "results" / "categories.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"peak memory {args.many} vs {args.few} categories: {m_many:.0f} / {m_few:.0f} MB = {m_many / m_few:.2f}x "
          "(goal <= 1.25)")
    print(f"wall time {args.many} categories vs the same images as one category: {s_many:.1f} / {s_one:.1f} s = "
          f"{s_many / s_one:.2f}x (goal <= 1.5); CPU seconds {CPU['store_many']:.1f} / {CPU['store_one']:.1f} = "
          f"{CPU['store_many'] / CPU['store_one']:.2f}x")
    print(f"bytes per category: store {store_each / 1e6:.2f} MB, npz {npz_each / 1e6:.2f} MB = "
          f"{store_each / npz_each:.2f}x (goal <= 1)")
    print(f"open the store: {s_open * 1e3:.1f} ms (goal < 1 s); compare_categories over {args.many}: "
          f"{s_cmp:.1f} s (goal < 60 s)")


if __name__ == "__main__":
    main()
