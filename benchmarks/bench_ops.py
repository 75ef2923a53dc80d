"""ATen ops dispatched per batch: attribution against a training step, through the public API.

Where a step is short (a GPU with a small model), the host launching kernels is the limit, and
the number of ops a step dispatches predicts it without a GPU. Counted with a
``TorchDispatchMode`` that sees every ATen op, for:

- attribution: ``cn.extract.attribution(model, (x, y), batch_size=B)`` over 1 and over 3
  batches: ops per batch = (ops(3) - ops(1)) / 2, fixed ops per run = ops(1) - ops per batch
  (tracing, graph building);
- a training step: forward, the target logits' sum, ``.backward()`` into the weights, over 1 and 3
  batches the same way.

Prints the ratio per model; ``--time`` also times both end to end (best of ``--repeats``).

Usage: python benchmarks/bench_ops.py [--models resnet50,convnext_tiny,...] [--timm resnetv2_18,deit_tiny_patch16_224]
       [--size 64] [--batch 4] [--time] [--out benchmarks/results/ops.json]
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
from torch.utils._python_dispatch import TorchDispatchMode

import connectome as cn


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


def best_of(fn, repeats: int, *args) -> float:  # noqa: ANN001
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,convnext_tiny,efficientnet_b0,vit_b_16")
    ap.add_argument("--timm", default="resnetv2_18,deit_tiny_patch16_224", help="timm models ('' for none)")
    ap.add_argument("--size", type=int, default=64, help="image side (vision transformers get their own)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--time", action="store_true", help="also time both end to end over 3 batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ops.json"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    todo = [(m, "torchvision") for m in a.models.split(",") if m] + [(m, "timm") for m in a.timm.split(",") if m]
    rows = []
    print(f"{'model':<26}{'attr/batch':>11}{'train/batch':>12}{'ratio':>7}{'attr fixed':>11}"
          + (f"{'time ratio':>11}" if a.time else ""))
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
        attr, fixed = per_batch(attribution, model, x, y, a.batch)
        train, _ = per_batch(training, model, x, y, a.batch)
        row = {"model": name, "source": source, "ops_per_batch": attr, "train_ops_per_batch": train,
               "ratio": round(attr / train, 3), "fixed_ops": fixed, "batch": a.batch, "size": size}
        line = f"{name:<26}{attr:>11,.0f}{train:>12,.0f}{attr / train:>6.2f}x{fixed:>11,.0f}"
        if a.time:
            ta = best_of(attribution, a.repeats, model, x, y, a.batch)
            tt = best_of(training, a.repeats, model, x, y, a.batch)
            row.update(seconds=ta, train_seconds=tt, time_ratio=round(ta / tt, 3))
            line += f"{ta / tt:>10.2f}x"
        print(line, flush=True)
        rows.append(row)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
