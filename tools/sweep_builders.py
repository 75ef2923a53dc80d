"""Every torchvision classification builder through attribution in float64, in parallel processes.

The same check as tests/extract/test_torchvision_sweep.py (exact, completeness, the model's own
logits), for machines with many cores: one process per builder, results as they finish.

Usage: python tools/sweep_builders.py [--jobs N] [--timeout S] [NAME ...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time


def check(name: str) -> tuple[str, str]:
    import warnings

    import torch
    import torchvision

    import connectome as cn

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    try:
        kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw).eval().double()
        with torch.no_grad():  # zero-initialised heads (ViT) would make the check trivially true
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and not m.weight.any():
                    m.weight.normal_(0, 0.05)
        size = 96 if name == "inception_v3" else (64 if name.startswith(("alexnet", "vgg")) else 32)
        if name.startswith(("vit_", "maxvit_")):
            size = 224
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
        y = torch.tensor([1, 7])
        g = cn.extract.attribution(model, (x, y), progress=False, device="cpu")
        with torch.no_grad():
            T = model(x).gather(1, y[:, None]).sum().item()
        ok = T != 0 and g.meta["exact"] and g.meta["completeness_relative"] <= 1e-9 and \
            abs(g.meta["target_total"] - T) <= 1e-12 * max(1.0, abs(T))
        return name, (f"{'ok  ' if ok else 'BAD '} completeness {g.meta['completeness_relative']:.1e}, "
                      f"{g.num_nodes} units, {g.num_edges} edges, {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # report every builder, whatever fails
        return name, f"FAIL {type(exc).__name__}: {str(exc)[:200]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="builders (default: all of torchvision.models.list_models())")
    ap.add_argument("--jobs", type=int, default=max(1, mp.cpu_count() // 2), help="parallel processes")
    args = ap.parse_args(argv)
    import torchvision

    names = args.names or torchvision.models.list_models(module=torchvision.models)
    # the largest first, so that they are not the last to finish
    heavy = ("128gf", "32gf", "16gf", "vit_h", "vit_l", "b7", "b6", "v2_l", "large", "v2_m", "152", "101", "161")
    names = sorted(names, key=lambda n: not any(h in n for h in heavy))
    bad = 0
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for name, line in pool.imap_unordered(check, names):
            bad += not line.startswith("ok")
            print(f"{name:22s} {line}", flush=True)
    print(f"{len(names) - bad} of {len(names)} builders exact", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
