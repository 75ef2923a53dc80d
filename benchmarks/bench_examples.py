"""Extra time of the dataset examples (top-k images per unit) on top of an attribution run.

For each model (resnet18 at 224x224 with random weights, the zoo's smallresnet at 32x32)
and device (CPU, and CUDA when present), the same batches run through a
:class:`FlowAccumulator` without and with ``examples=16``, interleaved, best of N:
the ratio with/without is the cost of the streaming top-k (goal: <= 1.10).

Usage: python benchmarks/bench_examples.py [--quick] [--repeats N]
Writes benchmarks/results/examples.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torchvision

from connectome import zoo
from connectome.extract._model import eval_mode, no_inplace
from connectome.extract.flow import FlowAccumulator
from connectome.extract.trace import trace_units

K = 16


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, dev: torch.device, batches: int, repeats: int) -> dict:
    model = model.to(dev).eval()
    x = x.to(dev)
    y = torch.arange(x.shape[0], device=dev) % 9  # the zoo has 9 classes
    ug = trace_units(model, x[:1])

    def run(k: int) -> float:
        acc = FlowAccumulator(ug, dev, torch.float32, examples=k)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(batches):
            acc.step(x, lambda logits: logits.gather(1, y[:, None]).squeeze(1))
        acc.attr[0].sum().item()  # one host sync at the end, as in a real run
        _sync(dev)
        return time.perf_counter() - t0

    with eval_mode(model), no_inplace(model):
        run(0), run(K)  # warm-up
        plain, withk = float("inf"), float("inf")
        for _ in range(repeats):  # interleaved: load on a shared machine hits both alike
            plain = min(plain, run(0))
            withk = min(withk, run(K))
    n = batches * x.shape[0]
    return {"model": name, "device": dev.type, "batch": x.shape[0], "images": n, "k": K,
            "attribution_s": plain, "with_examples_s": withk, "ratio": withk / plain,
            "images_per_s_with_examples": n / withk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for dev in devs:
        big = dev.type == "cuda"  # batches that keep a GPU busy
        cases = [("zoo:smallresnet", zoo.load_model("smallresnet"), torch.randn(256 if big else 64, 3, 32, 32), 4)]
        if not a.quick:
            cases.append(("resnet18", torchvision.models.resnet18(), torch.randn(64 if big else 8, 3, 224, 224),
                          8 if big else 2))
        for name, m, x, batches in cases:
            r = bench(name, m, x, dev, batches, 2 if a.quick else a.repeats)
            rows.append(r)
            print(f"{r['model']:>16} {r['device']:>4} batch {r['batch']:3d}: attribution {r['attribution_s']:.3f} s, "
                  f"with examples (k={K}) {r['with_examples_s']:.3f} s, ratio {r['ratio']:.3f}", flush=True)
    out = Path(__file__).parent / "results" / "examples.json"
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
