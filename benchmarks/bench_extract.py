"""Attribution extraction speed against baselines measured in the same run.

For each model (resnet18, resnet50 at 224x224, random weights) and device (CPU, and CUDA
when present), on one batch:

- ratio of attribution extraction time to a plain forward + backward of the same batch
  (goal: <= 1.3 default, <= 3 with per_sample);
- speedup over the naive way of getting one layer's edges: masking input channels one at
  a time (a few channels timed per layer, extrapolated to all channels of all layers);
- images per second and peak memory.

End to end (``--only e2e``): the public API, ``cn.extract.attribution(model, (x, y))`` on N
images held in tensors (CPU, pinned, or already on the GPU), against a plain forward +
backward loop over the same batches at the same precision (``exact``: float32 with TF32
off; ``tf32``; ``bf16``: bfloat16 autocast), with the time split into steps, data and
setup (tracing), and graph building (goal: <= 1.3x, <= 3x with per_sample), images/s,
peak memory and the completeness residual of the graph.

Usage: python benchmarks/bench_extract.py [--quick] [--batch N] [--repeats N]
       python benchmarks/bench_extract.py --only e2e [--device cuda] [--models resnet18,resnet50]
              [--batch 128] [--images 1536] [--precisions exact,tf32,bf16] [--per-sample]
              [--source pinned|cpu|device] [--out FILE]
Writes benchmarks/results/extract.json (steps) and benchmarks/results/extract_e2e.json (end to end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import connectome as cn
from connectome.extract._model import eval_mode, no_inplace, precision_mode
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


# ----------------------------------------------------------------------------- end to end
def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # Linux: reset VmHWM, the peak resident size
            Path("/proc/self/clear_refs").write_text("5")


def _host_peak_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _host_peak_mb()


def _autocast(dev: torch.device, precision: str):
    return torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def plain_loop(model, x, y, batch: int, dev: torch.device, precision: str) -> None:
    """The baseline: forward + backward of every batch, data moved as a training loop moves it."""
    with precision_mode(precision):
        for a in range(0, x.shape[0], batch):
            xb = x[a : a + batch].to(dev, non_blocking=True).requires_grad_(True)
            yb = y[a : a + batch].to(dev, non_blocking=True)
            model.zero_grad(set_to_none=True)
            with _autocast(dev, precision):
                logits = model(xb)
            logits.float().gather(1, yb[:, None]).sum().backward()
    _sync(dev)


@contextlib.contextmanager
def _timed_parts(dev: torch.device, parts: dict[str, float]):
    """Time FlowAccumulator.step and .to_graph (synchronised) inside one API call."""
    step, to_graph = FlowAccumulator.step, FlowAccumulator.to_graph

    def timed(key, fn):
        def wrapper(*a, **k):
            _sync(dev)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(dev)
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    FlowAccumulator.step = timed("steps_s", step)
    FlowAccumulator.to_graph = timed("graph_s", to_graph)
    try:
        yield
    finally:
        FlowAccumulator.step, FlowAccumulator.to_graph = step, to_graph


def e2e(name: str, dev: torch.device, batch: int, n_images: int, precision: str, per_sample: bool,
        source: str, repeats: int, size: int = 224) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_images, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (n_images,), generator=gen)
    if dev.type == "cuda" and source == "pinned":
        x, y = x.pin_memory(), y.pin_memory()
    elif source == "device":
        x, y = x.to(dev), y.to(dev)

    def api():
        return cn.extract.attribution(model, (x, y), batch_size=batch, device=dev, precision=precision,
                                      per_sample=per_sample, progress=False)

    # warm-up (cudnn autotune, allocator, first trace) on one batch each
    plain_loop(model, x[:batch], y[:batch], batch, dev, precision)
    cn.extract.attribution(model, (x[:batch], y[:batch]), batch_size=batch, device=dev, precision=precision,
                           per_sample=per_sample, progress=False)
    best = {"plain": float("inf"), "api": float("inf")}
    peak = {}
    g = None
    for _ in range(repeats):  # interleaved: load changes on a shared machine hit both alike
        for key in ("plain", "api"):
            _reset_peak(dev)
            _sync(dev)
            t0 = time.perf_counter()
            if key == "plain":
                plain_loop(model, x, y, batch, dev, precision)
            else:
                g = api()
            _sync(dev)
            best[key] = min(best[key], time.perf_counter() - t0)
            peak[key] = _peak(dev)
            model.zero_grad(set_to_none=True)
    parts: dict[str, float] = {}
    with _timed_parts(dev, parts):
        t0 = time.perf_counter()
        api()
        total = time.perf_counter() - t0
    steps, graph = parts.get("steps_s", 0.0), parts.get("graph_s", 0.0)
    return {
        "model": name, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "batch": batch, "images": n_images, "precision": precision, "per_sample": per_sample, "source": source,
        "plain_s": best["plain"], "api_s": best["api"], "ratio": best["api"] / best["plain"],
        "plain_images_per_s": n_images / best["plain"], "api_images_per_s": n_images / best["api"],
        # one more API run, synchronised around each step and the graph build: the split
        "split_total_s": total, "steps_s": steps, "graph_s": graph, "data_and_setup_s": total - steps - graph,
        "steps_ratio": steps / best["plain"],
        "plain_peak_mb": peak["plain"], "api_peak_mb": peak["api"],
        "edges": g.num_edges, "exact": g.meta["exact"], "expected_error": g.meta.get("expected_error"),
        "completeness_relative": g.meta["completeness_relative"],
    }


def _e2e_line(r: dict) -> str:
    ps = " per_sample" if r["per_sample"] else ""
    return (f"{r['model']:<9} {r['device']:<6} {r['precision']:<5}{ps:<11} batch {r['batch']:>3} x{r['images'] // r['batch']:<3} "
            f"{r['source']:<6} plain {r['plain_s']:.3f}s  API {r['api_s']:.3f}s  x{r['ratio']:.2f}  "
            f"(steps {r['steps_s']:.3f}s x{r['steps_ratio']:.2f}, data+setup {r['data_and_setup_s']:.3f}s, "
            f"graph {r['graph_s']:.3f}s)  {r['api_images_per_s']:.1f} img/s vs {r['plain_images_per_s']:.1f}  "
            f"peak {r['api_peak_mb']:.0f}/{r['plain_peak_mb']:.0f} MB  completeness {r['completeness_relative']:.1e}")


def main_e2e(args: argparse.Namespace) -> None:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = args.models.split(",") if args.models else ["resnet18", "resnet50"]
    batch = args.batch or (8 if dev.type == "cpu" else 128)
    n = args.images or (8 * batch if dev.type == "cpu" else 1536)
    n = max(batch, n // batch * batch)
    sources = args.source.split(",")
    n_ps = max(batch, (args.per_sample_images or n) // batch * batch)
    configs = [(p, False, sources[0], n) for p in args.precisions.split(",")]
    if args.per_sample:
        configs.append(("exact", True, sources[0], n_ps))
    configs += [("exact", False, src, n) for src in sources[1:]]
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / "extract_e2e.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        for precision, per_sample, source, images in configs:
            r = e2e(name, dev, batch, images, precision, per_sample, source, args.repeats, args.size)
            rows.append(r)
            print(_e2e_line(r), flush=True)
            res = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "rows": rows}
            path.write_text(json.dumps(res, indent=2))  # after every row: a run cut short keeps what it measured
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resnet18 only, batch 4")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (steps), 2 (e2e)")
    ap.add_argument("--only", choices=["steps", "e2e"], default="steps",
                    help="steps: one batch through FlowAccumulator (default); e2e: the public API on N images")
    ap.add_argument("--device", default=None, help="e2e: cpu or cuda (default: cuda when available)")
    ap.add_argument("--models", default=None, help="e2e: comma-separated torchvision models (default resnet18,resnet50)")
    ap.add_argument("--images", type=int, default=None, help="e2e: images per run (default 8 batches on CPU, 1536 on CUDA)")
    ap.add_argument("--precisions", default="exact", help="e2e: comma-separated of exact, tf32, bf16 (default exact)")
    ap.add_argument("--per-sample", action="store_true", help="e2e: also a per_sample=True row (exact)")
    ap.add_argument("--source", default="pinned",
                    help="e2e: where the image tensors live, comma-separated of pinned (pinned CPU memory on CUDA, "
                         "plain on CPU), cpu, device; rows after the first source are exact only")
    ap.add_argument("--per-sample-images", type=int, default=None, help="e2e: images of the per_sample row")
    ap.add_argument("--size", type=int, default=224, help="e2e: image size")
    ap.add_argument("--out", default=None, help="e2e: JSON file to write")
    args = ap.parse_args()
    if args.only == "e2e":
        args.repeats = args.repeats or 2
        main_e2e(args)
        return
    args.repeats = args.repeats or 5
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
