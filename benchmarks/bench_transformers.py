"""Attribution of vision transformers against a plain forward + backward, in the same run.

Through the public API as a user calls it: ``cn.extract.attribution(model, (images, labels))``
against two plain loops over the same batches at the same precision (float32, random
weights), both running ``model(x)`` and backpropagating from the target logits:

- a training step, ``.backward()`` into the weights' gradients as well (the baseline of
  ``bench_extract.py --only e2e`` and of the goal, <= 1.5 for vit_b_16 on CPU): attribution
  needs ``dT/dW`` too, since every edge is ``W * dT/dW``;
- the input gradient only, ``autograd.grad(T, x)`` (a saliency map), which skips the weight
  gradients: a stricter baseline, about half a training step's backward for weight-heavy models.

Prints both ratios, images/s and the graph's size.

Usage: python benchmarks/bench_transformers.py [--models vit_b_16,swin_t] [--images 8] [--batch 8] [--repeats 3]
Writes benchmarks/results/transformers.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torchvision

import connectome as cn


def plain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, weights: bool = True) -> None:
    """Forward + backward of every batch: into the weights too (a training step), or the input only."""
    for a in range(0, x.shape[0], batch):
        xb = x[a : a + batch].clone().requires_grad_(True)
        t = model(xb).gather(1, y[a : a + batch, None]).sum()
        if weights:
            model.zero_grad(set_to_none=True)
            t.backward()
        else:
            torch.autograd.grad(t, xb)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_b_16,swin_t", help="torchvision builders, comma-separated")
    ap.add_argument("--images", type=int, default=8, help="images per run")
    ap.add_argument("--batch", type=int, default=8, help="batch size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (best taken), after one warm-up")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(args.images, 3, 224, 224)
        y = torch.randint(0, 1000, (args.images,))
        t_plain = best_of(lambda: plain(model, x, y, args.batch), args.repeats)
        t_input = best_of(lambda: plain(model, x, y, args.batch, weights=False), args.repeats)
        out = {}

        def api() -> None:
            out["g"] = cn.extract.attribution(model, (x, y), batch_size=args.batch, progress=False, device="cpu")

        t_api = best_of(api, args.repeats)
        g = out["g"]
        row = {
            "model": name, "device": "cpu", "images": args.images, "batch": args.batch,
            "plain_s": round(t_plain, 3), "input_grad_s": round(t_input, 3), "attribution_s": round(t_api, 3),
            "ratio": round(t_api / t_plain, 2), "ratio_input_grad": round(t_api / t_input, 2),
            "images_per_s": round(args.images / t_api, 2), "units": g.num_nodes, "edges": g.num_edges,
            "layers": len(g.layers), "completeness_relative": g.meta["completeness_relative"],
        }
        rows.append(row)
        print(f"{name:10s} attribution / training step = {row['ratio']:.2f}, / input gradient = "
              f"{row['ratio_input_grad']:.2f}  ({t_api:.2f} s vs {t_plain:.2f} s and {t_input:.2f} s, "
              f"{row['images_per_s']:.1f} img/s)  graph: {g.num_nodes:,} units, "
              f"{g.num_edges:,} edges in {len(g.layers)} layers; completeness {row['completeness_relative']:.1e}",
              flush=True)
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    (res / "transformers.json").write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                       "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
