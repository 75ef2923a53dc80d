"""Flows before and after a change: save float64 attribution graphs of a fixed set of models, compare later.

Usage: python tools/flowcheck.py save DIR [NAMES]     (NAMES: comma-separated, default every model below)
       python tools/flowcheck.py compare DIR [NAMES]  (exit 1 when any edge weight differs by more than 1e-12)

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


def graph(name: str):
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
    return cn.extract.attribution(model, (x, torch.tensor([1, 7])), progress=False)


def main(argv: list[str]) -> int:
    what, folder = argv[0], Path(argv[1])
    names = argv[2].split(",") if len(argv) > 2 else list(MODELS)
    folder.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name in names:
        t0 = time.perf_counter()
        g = graph(name)
        w = np.asarray(g.weight, np.float64)
        path = folder / f"{name}.npz"
        if what == "save":
            np.savez(path, weight=w, src=np.asarray(g.src), dst=np.asarray(g.dst))
            print(f"{name}: saved {w.size} edges ({time.perf_counter() - t0:.0f} s)", flush=True)
            continue
        ref = np.load(path)
        same = ref["weight"].shape == w.shape and np.array_equal(ref["src"], g.src) and np.array_equal(ref["dst"], g.dst)
        diff = float(np.max(np.abs(ref["weight"] - w))) if same else float("inf")
        ok = diff <= 1e-12
        bad += not ok
        print(f"{name}: {'same' if ok else 'DIFFERENT'} (max |diff| {diff:.3g}, {time.perf_counter() - t0:.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
