"""Functional connectivity and lesion curves against plain forward passes, timed in the same run.

Model: a zoo model (default ``smallresnet``, 300 units) on ``zoo.shapes`` images (default 64
per class, 576 images), batches of 64, float32.

- ``functional``: ``analysis.functional_connectivity(model, data, fdr=None)`` (one traced pass
  with streaming float64 moments of every layer and adjacent layer pair, then the
  correlations, Fisher z and Benjamini-Hochberg over every pair) against
  - ``plain``: ``model(x)`` over the same batches under ``inference_mode`` (goal: ratio <= 1.3);
  - ``activations``: ``extract.activations(model, data)``, the same traced pass that reads
    each unit's pooled activation, without the moments (what the moments add).
- ``lesion``: ``analysis.lesion_curve(model, (x, y), "strength", steps=k)`` (k + 1 masked
  forward passes, step 0 the intact model; the order's weight graph passed in, so not
  timed) against k + 1 plain forward passes of the same images (goal: ratio about 1, i.e.
  "a lesion curve of k steps costs about k forward passes").

Times are the minimum over ``--repeats`` rounds, baseline and candidate interleaved in each
round. On a loaded machine use ``--threads 1``: with several threads per process a busy
machine deschedules them at every barrier and times vary several-fold. Run:
``python benchmarks/bench_functional.py [--model smallresnet] [--per-class 64] [--steps 10] [--device cpu]``;
writes ``benchmarks/results/functional.json`` (``functional_<device>.json`` off the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from connectome import analysis, extract, zoo  # noqa: E402


def _best(fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Minimum time of each function over ``repeats`` rounds, the functions interleaved within
    a round (so that a change of machine load hits baseline and candidate alike)."""
    for fn in fns.values():  # warm-up (tracing caches, allocator)
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smallresnet")
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    model = zoo.load_model(args.model).to(dev).eval()
    data = zoo.shapes(args.per_class, seed=424242, size=32)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.as_tensor(data.targets)
    n = x.shape[0]
    xd = x.to(dev)
    bs = args.batch_size

    def plain() -> None:
        with torch.inference_mode():
            for s in range(0, n, bs):
                model(xd[s : s + bs])

    def functional() -> None:
        analysis.functional_connectivity(model, (x, y), fdr=None, device=dev, batch_size=bs)

    def acts() -> None:
        extract.activations(model, (x, y), device=dev, batch_size=bs)

    t = _best({"plain": plain, "functional": functional, "activations": acts}, args.repeats, sync)
    t_plain, t_fc, t_act = t["plain"], t["functional"], t["activations"]

    k = args.steps
    # a probe the size of one batch, so that a step is one forward pass
    xp, yp = x[:bs], y[:bs]
    xpd = xp.to(dev)
    w = extract.weights(model, tuple(x.shape[1:]))

    def plain_k() -> None:
        with torch.inference_mode():
            for _ in range(k + 1):
                model(xpd)

    def lesion() -> None:
        analysis.lesion_curve(model, (xp, yp), "strength", graph=w, steps=k, fraction=0.5, device=dev)

    t = _best({"plain_k": plain_k, "lesion": lesion}, args.repeats, sync)
    t_plain_k, t_lesion = t["plain_k"], t["lesion"]

    fc = analysis.functional_connectivity(model, (x, y), fdr=None, device=dev, batch_size=bs)
    res = {
        "model": args.model, "n_images": n, "batch_size": bs, "device": str(dev),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "units": fc.graph.num_nodes, "tested_pairs": fc.graph.meta["n_tested"],
        "plain_forward_s": t_plain, "functional_s": t_fc, "activations_s": t_act,
        "functional_over_plain": t_fc / t_plain, "functional_over_activations": t_fc / t_act,
        "lesion_steps": k, "lesion_probe_images": int(xp.shape[0]),
        "plain_k_plus_1_forwards_s": t_plain_k, "lesion_curve_s": t_lesion,
        "lesion_over_k_plus_1_forwards": t_lesion / t_plain_k,
    }
    print(f"{args.model}, {n} images, batch {bs}, {dev}, {torch.get_num_threads()} threads "
          f"(load average {res['load_avg_1min']})")
    print(f"  plain forward            {t_plain:8.3f} s")
    print(f"  activations (traced)     {t_act:8.3f} s")
    print(f"  functional connectivity  {t_fc:8.3f} s   ratio to plain {t_fc / t_plain:.2f}  "
          f"(goal <= 1.3), to activations {t_fc / t_act:.2f}")
    print(f"  {k + 1} plain forwards of {xp.shape[0]} images {t_plain_k:8.3f} s")
    print(f"  lesion curve, {k} steps     {t_lesion:8.3f} s   ratio {t_lesion / t_plain_k:.2f}")
    out = ROOT / "benchmarks" / "results" / ("functional.json" if dev.type == "cpu" else f"functional_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
