"""The smallest model of every timm architecture module through attribution, exact in float64.

For each module of ``timm.list_modules()`` (a family: resnet, vision_transformer, swin_transformer
...), the model with the fewest parameters among ``timm.list_models(module=...)``, counted by
building each one on the ``meta`` device (no memory, no weights; ties go to the first name in
alphabetical order; models that do not build there are passed over and counted). It is built
with random weights (``torch.manual_seed(0)``; all-zero Linear/Conv weights, zero-initialised
heads, get random values), 10 classes, float64, eval mode, and two random images at its
input size (see below); ``connectome.extract.attribution`` must be exact (``tools/_sweep.py``
says what each result means).

The choice is recorded in ``tools/sweep_results/timm_smallest.json`` (``--select`` makes it again,
for a new timm); the images are 64 x 64 where the model runs on them (built with ``img_size=64``
where it takes that keyword), else of its default input size.

Usage: python tools/sweep_timm.py --select
       python tools/sweep_timm.py [--only a,b] [--jobs 1] [--timeout 600]
                                  [--json tools/sweep_results/timm.json] [--readme README.md]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import _sweep

NAME, WHAT = "timm", "timm families"  # README markers <!-- sweep:timm -->, the counts line
JSON = _sweep.ROOT / "tools" / "sweep_results" / "timm.json"
SMALLEST = _sweep.ROOT / "tools" / "sweep_results" / "timm_smallest.json"  # the recorded choice per family
NUM_CLASSES = 10
SIDE = 64  # image side used where the model runs on it (a smaller input, a faster sweep); else its default


def families() -> list[str]:
    import timm

    return sorted(timm.list_modules())


def preload() -> None:
    """The imports every model needs, made once in the sweep server before it forks (timm imports all its models)."""
    import timm  # noqa: F401

    import connectome.extract  # noqa: F401


def versions() -> dict[str, str]:
    import timm
    import torch

    return {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]}


def smallest(module: str) -> tuple[str | None, int, int, int]:
    """The module's model with the fewest parameters: ``(name, parameters, candidates, not built)``.

    Counted on the meta device with the default configuration (its own number of classes).
    """
    import timm
    import torch

    names = sorted(timm.list_models(module=module))
    best: tuple[int, str] | None = None
    failed = 0
    for name in names:
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:  # a model that does not build on meta is passed over (and counted)
            failed += 1
            continue
        n = sum(p.numel() for p in m.parameters())
        best = min(best, (n, name)) if best else (n, name)
    return (best[1] if best else None), (best[0] if best else 0), len(names), failed


def recorded(module: str) -> str | None:
    """The recorded smallest model of a family, if any."""
    return _sweep.load(SMALLEST)["results"].get(module, {}).get("model")


def choice(module: str) -> dict[str, Any]:
    """The recorded smallest model of a family (``SMALLEST``), chosen now where none is recorded for this timm."""
    import timm

    recorded = _sweep.load(SMALLEST)
    if recorded.get("versions", {}).get("timm") == timm.__version__ and module in recorded["results"]:
        return recorded["results"][module]
    t0 = time.perf_counter()
    name, params, candidates, failed = smallest(module)
    return {"model": name, "params": params, "candidates": candidates, "meta_unbuilt": failed,
            "select_seconds": round(time.perf_counter() - t0, 1)}


def build(name: str, side: int = SIDE) -> tuple[Any, tuple[int, ...]]:
    """The model in float64 with random weights, and its input size: ``(3, side, side)`` where it runs on that
    (built with ``img_size=side`` where it takes one), else ``pretrained_cfg["input_size"]``."""
    import timm
    import torch

    def make(**kw: Any) -> Any:
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)
        return _sweep.randomise_zero_weights(m).eval().double()

    for kw in ({"img_size": side}, {}):
        try:
            model = make(**kw)
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side, dtype=torch.float64))
            return model, (3, side, side)
        except Exception:  # the model does not take that size (or that keyword): try the next way
            continue
    model = make()
    return model, tuple(model.pretrained_cfg["input_size"])


def run_one(module: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    base = choice(module)
    name = base["model"]
    if name is None:
        return {**base, "model": "", "result": "skipped",
                "reason": f"none of its {base['candidates']} models builds on the meta device"}
    try:
        model, size = build(name)
    except Exception as exc:
        return {**base, "result": "skipped", "reason": "does not build: " + _sweep.first_line(exc)}
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([1, 7])
    return {**base, "input_size": list(size), **_sweep.classify(model, x, y)}


def select(path: Path = SMALLEST) -> None:
    """Choose and record the smallest model of every family (minutes: it builds all of timm's models on meta)."""
    out = {}
    for module in families():
        t0 = time.perf_counter()
        name, params, candidates, failed = smallest(module)
        out[module] = {"model": name, "params": params, "candidates": candidates, "meta_unbuilt": failed}
        print(f"{module:28s} {name} {params:,} of {candidates} ({failed} not built) {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    _sweep.save(path, {"versions": versions(), "results": out})


def record_choices(results: Path = JSON, path: Path = SMALLEST) -> None:
    """Add the choices a sweep made itself (where none was recorded) to the record of the smallest models."""
    data = _sweep.load(results)
    made = {fam: {k: r[k] for k in ("model", "params", "candidates", "meta_unbuilt")}
            for fam, r in data["results"].items() if "select_seconds" in r}
    if made:
        _sweep.save(path, _sweep.merge(_sweep.load(path), made, versions={"timm": data["versions"]["timm"]}))


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--select"]:
        select()
        return 0
    return _sweep.sweep_main(argv, doc=__doc__, script=Path(__file__).resolve(), name=NAME, what=WHAT,
                             families=families, run_one=run_one, versions=versions, default_json=JSON,
                             preload=preload, after=lambda path: record_choices(path) if path == JSON else None,
                             describe=lambda module: {"model": recorded(module)})


if __name__ == "__main__":
    sys.exit(main())
