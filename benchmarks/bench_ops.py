"""ATen ops dispatched per batch: attribution against a training step, through the public API.

Where a step is short (a GPU with a small model), the host launching kernels is the limit, and
the number of ops a step dispatches predicts it without a GPU. Counted with a
``TorchDispatchMode`` that sees every ATen op, for:

- attribution: ``cn.extract.attribution(model, (x, y), batch_size=B)`` over 1 and over 3
  batches: ops per batch = (ops(3) - ops(1)) / 2, fixed ops per run = ops(1) - ops per batch
  (tracing, graph building);
- a training step: forward, the target logits' sum, ``.backward()`` into the weights, over 1 and 3
  batches the same way.

Ops are counted twice: as a GPU runs the step, and as a CPU does. The two differ in one
place only: which per-unit sums are joined into one op (:data:`connectome.extract.batched.JOIN_LIMIT`,
tensors up to 2**22 elements on a GPU, 2**14 on a CPU, where a join's copy costs more than the
ops it saves); the GPU count sets the CPU's limit to the GPU's while it counts.

Prints the ratios per model; ``--time`` also times both end to end on the CPU, as the issue
measured them: one batch of ``--time-batch`` images at ``--time-size`` px, one thread,
tracing and graph building included, ``--repeats`` interleaved runs, medians (and the load).

Usage: python benchmarks/bench_ops.py [--models resnet50,convnext_tiny,...] [--timm resnetv2_18,deit_tiny_patch16_224]
       [--size 64] [--batch 4] [--time] [--time-size 224] [--time-batch 8] [--repeats 5]
       [--out benchmarks/results/ops.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import connectome as cn
from connectome.extract import batched


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active (views and in-place ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.n += 1
        return func(*args, **(kwargs or {}))


def build(name: str, source: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    with torch.no_grad():  # zero-initialised heads would make every flow zero
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.05)
    return model.eval()


def attribution(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    cn.extract.attribution(model, (x, y), batch_size=batch, progress=False)


def training(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    for a in range(0, x.shape[0], batch):
        t = model(x[a : a + batch]).gather(1, y[a : a + batch, None]).sum()
        model.zero_grad(set_to_none=True)
        t.backward()


def count(fn, *args) -> int:  # noqa: ANN001
    with OpCounter() as c:
        fn(*args)
    return c.n


def per_batch(fn, model, x, y, batch) -> tuple[float, float]:  # noqa: ANN001
    """(ops per batch, fixed ops per run) from runs over 1 and 3 batches."""
    one = count(fn, model, x[:batch], y[:batch], batch)
    three = count(fn, model, x[: 3 * batch], y[: 3 * batch], batch)
    step = (three - one) / 2
    return step, one - step


def per_batch_gpu(fn, model, x, y, batch) -> tuple[float, float]:  # noqa: ANN001
    """:func:`per_batch` with the per-unit sums joined as on a GPU."""
    with batched.joining_on_cpu(batched.JOIN_LIMIT["cuda"]):
        return per_batch(fn, model, x, y, batch)


def interleaved(a, b, repeats: int, *args) -> tuple[float, float]:  # noqa: ANN001
    """Median seconds of ``a(*args)`` and ``b(*args)``, run in turn (after one warm-up each)."""
    a(*args)
    b(*args)
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a(*args)
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b(*args)
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,convnext_tiny,efficientnet_b0,vit_b_16")
    ap.add_argument("--timm", default="resnetv2_18,deit_tiny_patch16_224", help="timm models ('' for none)")
    ap.add_argument("--size", type=int, default=64, help="image side (vision transformers get their own)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--time", action="store_true", help="also time both end to end on the CPU")
    ap.add_argument("--time-size", type=int, default=224, help="image side for --time")
    ap.add_argument("--time-batch", type=int, default=8, help="images (one batch) for --time")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs for --time (medians)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ops.json"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    todo = [(m, "torchvision") for m in a.models.split(",") if m] + [(m, "timm") for m in a.timm.split(",") if m]
    rows = []
    print(f"{'model':<24}{'GPU path':>9}{'CPU path':>9}{'training':>9}{'ratio':>7}{'CPU ratio':>10}{'fixed':>8}"
          + (f"{'attr s':>8}{'train s':>8}{'time ratio':>11}" if a.time else ""))
    for name, source in todo:
        try:
            model = build(name, source)
        except Exception as exc:  # timm missing, or a builder this version lacks
            print(f"{name:<26}skipped ({type(exc).__name__}: {exc})")
            continue
        size = 224 if name.startswith(("vit_", "deit", "swin")) else a.size
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3 * a.batch, 3, size, size, generator=gen)
        y = torch.randint(0, 10, (3 * a.batch,), generator=gen)
        attr, fixed = per_batch_gpu(attribution, model, x, y, a.batch)
        attr_cpu, _ = per_batch(attribution, model, x, y, a.batch)
        train, _ = per_batch(training, model, x, y, a.batch)
        row = {"model": name, "source": source, "ops_per_batch": attr, "cpu_ops_per_batch": attr_cpu,
               "train_ops_per_batch": train, "ratio": round(attr / train, 3), "cpu_ratio": round(attr_cpu / train, 3),
               "fixed_ops": fixed, "batch": a.batch, "size": size}
        line = (f"{name:<24}{attr:>9,.0f}{attr_cpu:>9,.0f}{train:>9,.0f}{attr / train:>6.2f}x{attr_cpu / train:>9.2f}x"
                f"{fixed:>8,.0f}")
        if a.time:
            tsize = 224 if name.startswith(("vit_", "deit", "swin")) else a.time_size
            xt = torch.randn(a.time_batch, 3, tsize, tsize, generator=gen)
            yt = torch.randint(0, 10, (a.time_batch,), generator=gen)
            load = os.getloadavg()[0]
            ta, tt = interleaved(attribution, training, a.repeats, model, xt, yt, a.time_batch)
            row.update(seconds=ta, train_seconds=tt, time_ratio=round(ta / tt, 3), time_size=tsize,
                       time_batch=a.time_batch, repeats=a.repeats, load=[load, os.getloadavg()[0]])
            line += f"{ta:>8.2f}{tt:>8.2f}{ta / tt:>10.2f}x  (load {load:.1f})"
        print(line, flush=True)
        rows.append(row)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
