"""Attribution extraction speed against baselines measured in the same run.

For each model (resnet18, resnet50 at 224x224, random weights) and device (CPU, and CUDA
when present), on one batch:

- ratio of attribution extraction time to a plain forward + backward of the same batch
  (goal: <= 1.3 default, <= 3 with per_sample);
- speedup over the naive way of getting one layer's edges: masking input channels one at
  a time (a few channels timed per layer, extrapolated to all channels of all layers);
- images per second and peak memory.

Usage: python benchmarks/bench_extract.py [--quick] [--batch N] [--repeats N]
Writes benchmarks/results/extract.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from connectome.extract._model import eval_mode, no_inplace
from connectome.extract.flow import FlowAccumulator
from connectome.extract.trace import trace_units


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev: torch.device, repeats: int) -> float:
    fn()  # warm-up (cudnn autotune, allocator)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_seconds(model, ug, x, y, dev, channels_per_layer: int = 2) -> float:
    """Masking baseline: per conv layer, one conv per kept input channel, times a few, extrapolated."""
    saved: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    hooks = []
    for name, m in convs.items():
        def fwd(mod, inp, out, name=name):
            saved[name] = inp[0].detach()
            out.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach()))
        hooks.append(m.register_forward_hook(fwd))
    try:
        xr = x.clone().requires_grad_(True)
        logits = model(xr)
        logits.gather(1, y[:, None]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    total = 0.0
    with torch.no_grad():
        for name, m in convs.items():
            xin, g = saved[name], grads[name]
            cin = xin.shape[1]
            k = min(channels_per_layer, cin)
            t0 = time.perf_counter()
            for i in range(k):
                mask = torch.zeros(1, cin, 1, 1, device=dev, dtype=xin.dtype)
                mask[:, i] = 1
                out = F.conv2d(xin * mask, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
                (out * g).sum(dim=(0, 2, 3))
            _sync(dev)
            total += (time.perf_counter() - t0) / k * cin
    return total


def bench(name: str, dev: torch.device, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).to(dev).eval()
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def plain():
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        model(xr).gather(1, y[:, None]).sum().backward()

    out = {"model": name, "device": str(dev), "batch": batch}
    with eval_mode(model), no_inplace(model):
        ug = trace_units(model, x[:1])
        accs = {key: FlowAccumulator(ug, dev, torch.float32, per_sample=key == "per_sample")
                for key in ("default", "per_sample")}
    target = lambda logits: logits.gather(1, y[:, None]).squeeze(1)  # noqa: E731
    runs = {
        "plain": plain,
        "default": lambda: accs["default"].step(x, target),
        "per_sample": lambda: accs["per_sample"].step(x, target),
    }
    # Interleave the three so that load changes on a shared machine hit all of them alike;
    # keep the best time of each.
    best = {k: float("inf") for k in runs}
    peak = {}
    for k, fn in runs.items():
        with eval_mode(model), no_inplace(model):
            fn()  # warm-up
    for _ in range(repeats):
        for k, fn in runs.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with eval_mode(model), no_inplace(model):
                _sync(dev)
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                best[k] = min(best[k], time.perf_counter() - t0)
            peak[k] = _peak_mb(dev)
    out["plain_s"] = best["plain"]
    out["plain_peak_mb"] = peak["plain"]
    for key in ("default", "per_sample"):
        out[f"{key}_s"] = best[key]
        out[f"{key}_ratio"] = best[key] / best["plain"]
        out[f"{key}_images_per_s"] = batch / best[key]
        out[f"{key}_peak_mb"] = peak[key]
    with eval_mode(model), no_inplace(model):
        model.zero_grad(set_to_none=True)
        out["naive_s"] = naive_seconds(model, ug, x, y, dev)
        out["speedup_vs_naive"] = out["naive_s"] / out["default_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resnet18 only, batch 4")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    models = ["resnet18"] if args.quick else ["resnet18", "resnet50"]
    rows = []
    for dev in devices:
        batch = args.batch or (4 if args.quick else (8 if dev.type == "cpu" else 64))
        for name in models:
            r = bench(name, dev, batch, args.repeats)
            rows.append(r)
            print(f"{r['model']:<9} {r['device']:<5} batch {r['batch']:>3}  plain {r['plain_s']:.3f}s  "
                  f"attribution x{r['default_ratio']:.2f}  per-sample x{r['per_sample_ratio']:.2f}  "
                  f"vs naive masking {r['speedup_vs_naive']:.0f}x faster  "
                  f"{r['default_images_per_s']:.1f} img/s  peak {r['default_peak_mb']:.0f} MB", flush=True)
    res = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    path = Path(__file__).parent / "results" / "extract.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
