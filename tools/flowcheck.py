"""Flows before and after a change: save float64 attribution graphs of a fixed set of models, compare later.

Usage: python tools/flowcheck.py save DIR [NAMES]     (NAMES: comma-separated, default every model below)
       python tools/flowcheck.py compare DIR [NAMES]  (exit 1 when any edge weight or node column differs
                                                       by more than 1e-12 relative to its largest value)

Compared: the edge weights, every node column (attribution, bias_attribution, activation
statistics) and, from a second run with ``per_sample=True``, the ``abs_weight`` edge column.

Models: torchvision builders at small sizes, random weights seeded by name, two images with labels.
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torchvision

MODELS = {  # name -> (builder, image size)
    "resnet18": ("resnet18", 32), "mobilenet_v3_small": ("mobilenet_v3_small", 32),
    "efficientnet_b0": ("efficientnet_b0", 32), "regnet_y_400mf": ("regnet_y_400mf", 32),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", 32), "squeezenet1_0": ("squeezenet1_0", 64),
    "densenet121": ("densenet121", 32), "googlenet": ("googlenet", 64), "convnext_tiny": ("convnext_tiny", 32),
    "swin_t": ("swin_t", 64), "vit_b_16": ("vit_b_16", 224),
}


def graph(name: str, per_sample: bool = False):
    import connectome as cn

    builder, size = MODELS[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    kw = {"aux_logits": False, "init_weights": False} if builder == "googlenet" else {}
    model = torchvision.models.get_model(builder, weights=None, num_classes=10, **kw).eval().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.05)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    return cn.extract.attribution(model, (x, torch.tensor([1, 7])), per_sample=per_sample, progress=False)


def columns(name: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Every compared column of model ``name``, with the edges' source and target indices."""
    g = graph(name)
    out = {"weight": np.asarray(g.weight, np.float64)}
    out.update({f"node:{k}": np.asarray(v, np.float64) for k, v in g.node_attrs.items()})
    out["abs_weight"] = np.asarray(graph(name, per_sample=True).edge_attr("abs_weight"), np.float64)
    return out, np.asarray(g.src), np.asarray(g.dst)


def main(argv: list[str]) -> int:
    what, folder = argv[0], Path(argv[1])
    names = argv[2].split(",") if len(argv) > 2 else list(MODELS)
    folder.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name in names:
        t0 = time.perf_counter()
        cols, src, dst = columns(name)
        path = folder / f"{name}.npz"
        if what == "save":
            np.savez(path, src=src, dst=dst, **cols)
            print(f"{name}: saved {cols['weight'].size} edges ({time.perf_counter() - t0:.0f} s)", flush=True)
            continue
        ref = np.load(path)
        worst, where = 0.0, ""
        if not (np.array_equal(ref["src"], src) and np.array_equal(ref["dst"], dst)):
            worst, where = float("inf"), "edges"
        for k, v in cols.items():
            r = ref[k] if k in ref.files else None
            if r is None or r.shape != v.shape:
                worst, where = float("inf"), k
                continue
            fin = np.isfinite(r)
            if not (np.array_equal(fin, np.isfinite(v)) and np.array_equal(r[~fin], v[~fin])):
                worst, where = float("inf"), k
                continue
            r, v = r[fin], v[fin]
            scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-300)
            d = float(np.max(np.abs(r - v))) / scale if r.size else 0.0
            if d > worst:
                worst, where = d, k
        ok = worst <= 1e-12
        bad += not ok
        print(f"{name}: {'same' if ok else 'DIFFERENT'} (max relative |diff| {worst:.3g}{' in ' + where if where else ''}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
