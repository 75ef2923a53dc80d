"""The README's Python tour, run literally on torchvision resnet50, step by step.

Reads the first ```python block of README.md (the tour that starts with
``import torchvision, connectome as cn``) and runs its statements in order in one
namespace, in a temporary folder, printing for each step the seconds it took and the
peak resident memory of the process during that step (``VmHWM``, reset before every step
through ``/proc/self/clear_refs``; on other systems the process-wide peak) and how far that
peak rose above the memory held when the step started (what the step itself needed; the
process also holds everything earlier steps kept, e.g. both graphs and ``igg``).

The tour leaves a few names to the reader; this script provides them:

- ``images/``: an ImageFolder with two categories, ``tabby`` and ``tiger``, of
  ``--images`` random 224x224 JPEGs each (seeded);
- ``model_a``, ``model_b``: two more randomly initialised ``resnet50`` (seeds 1 and 2);
- ``probe_images``: the random images as one tensor; ``images, labels``: the ``tabby``
  images and their class unit, for ``fidelity``.

Goal (issue 14): every step under 60 s and the whole tour under 5 minutes on 2 CPU cores.

Run: ``python benchmarks/bench_tour.py [--images 4] [--model resnet50] [--step-timeout S]``;
writes ``benchmarks/results/tour.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_STEP_S = 60.0
GOAL_TOTAL_S = 300.0


def tour_source(readme: Path = ROOT / "README.md") -> str:
    """The README's Python tour: the first ```python block that imports connectome as cn."""
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)
    for b in blocks:
        if "connectome as cn" in b:
            return b
    raise SystemExit("README.md has no ```python block with 'import ... connectome as cn'")


def tour_steps(source: str) -> list[tuple[str, str]]:
    """(label, code) per line of statements: statements sharing a line run as one step."""
    tree = ast.parse(source)
    lines = source.splitlines()
    steps: dict[int, list[ast.stmt]] = {}
    for node in tree.body:
        steps.setdefault(node.lineno, []).append(node)
    out = []
    for lineno, nodes in steps.items():
        end = max(n.end_lineno or n.lineno for n in nodes)
        code = "\n".join(lines[lineno - 1 : end])
        label = code.split("#")[0].strip().splitlines()[0]
        out.append((label, code))
    return out


def _peak_kb() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    m = re.search(r"VmHWM:\s+(\d+)", text)
    return int(m.group(1)) if m else None


def _rss_kb() -> int | None:
    try:
        m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _StepTimeout(Exception):
    pass


def make_images(root: Path, n: int, size: int = 224, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cat in ("tabby", "tiger"):
        (root / cat).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cat / f"{i}.jpg", quality=90)


def harness(model_name: str, n_images: int, workdir: Path) -> dict[str, Any]:
    """The names the tour leaves to the reader."""
    import torch
    import torchvision

    from connectome.extract.data import default_transform

    make_images(workdir / "images", n_images)
    builder = getattr(torchvision.models, model_name)
    torch.manual_seed(1)
    model_a = builder(weights=None)
    torch.manual_seed(2)
    model_b = builder(weights=None)
    ds = torchvision.datasets.ImageFolder(str(workdir / "images"), transform=default_transform(224))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    tabby = ys == ds.class_to_idx["tabby"]
    return {"model_a": model_a, "model_b": model_b, "probe_images": xs,
            "images": xs[tabby], "labels": ys[tabby]}


def run_steps(steps: list[tuple[str, str]], ns: dict[str, Any], step_timeout: float | None = None,
              echo: bool = True) -> list[dict[str, Any]]:
    """Run the tour's steps in ``ns`` in order; one row per step. A step that fails or times
    out ends the tour (later steps use its names) and is recorded with its reason."""
    rows = []
    for label, code in steps:
        _reset_peak()
        start_kb = _rss_kb()
        t0 = time.perf_counter()
        status = "ok"
        old = None
        if step_timeout:
            def on_alarm(signum, frame):  # noqa: ARG001
                raise _StepTimeout

            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, step_timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                exec(compile(code, "<README tour>", "exec"), ns)
        except _StepTimeout:
            status = f"timed out after {step_timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - the benchmark reports it and stops
            status = f"failed: {type(exc).__name__}: {exc}"
        finally:
            if step_timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        dt = time.perf_counter() - t0
        peak = _peak_kb()
        rise = (peak - start_kb) / 1024 if peak and start_kb else None
        rows.append({"step": label, "seconds": round(dt, 2), "peak_mb": round(peak / 1024, 1) if peak else None,
                     "rise_mb": round(rise, 1) if rise is not None else None, "status": status})
        if echo:
            mark = "" if status == "ok" and dt < GOAL_STEP_S else ("  <-- over the goal" if status == "ok" else f"  <-- {status}")
            print(f"{label[:64]:<64} {dt:7.1f} s  peak {rows[-1]['peak_mb'] or float('nan'):6.0f} MB  "
                  f"+{rise if rise is not None else float('nan'):5.0f} MB{mark}", flush=True)
        if status != "ok":
            break
    return rows


def run(model_name: str = "resnet50", n_images: int = 4, step_timeout: float | None = None) -> dict[str, Any]:
    import torch

    source = tour_source()
    if model_name != "resnet50":
        source = source.replace("resnet50", model_name)
    steps = tour_steps(source)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="connectome-tour-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            ns: dict[str, Any] = {"__name__": "__tour__"}
            t0 = time.perf_counter()
            ns.update(harness(model_name, n_images, Path(tmp)))
            print(f"{'(harness: images, model_a, model_b)':<72} {time.perf_counter() - t0:7.1f} s", flush=True)
            rows = run_steps(steps, ns, step_timeout)
        finally:
            os.chdir(cwd)
    total = time.perf_counter() - t_all
    complete = len(rows) == len(steps) and all(r["status"] == "ok" for r in rows)
    result = {
        "model": model_name, "images_per_category": n_images, "steps": rows, "total_seconds": round(total, 1),
        "slowest_step": max(rows, key=lambda r: r["seconds"])["step"] if rows else None,
        "goal": {"step_s": GOAL_STEP_S, "total_s": GOAL_TOTAL_S},
        "met": complete and all(r["seconds"] < GOAL_STEP_S for r in rows) and total < GOAL_TOTAL_S,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    print(f"{'total (harness included)':<72} {total:7.1f} s   goal: each step < {GOAL_STEP_S:.0f} s, "
          f"total < {GOAL_TOTAL_S:.0f} s: {'met' if result['met'] else 'NOT met'}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help="torchvision model to run the tour on (default resnet50)")
    ap.add_argument("--images", type=int, default=4, help="random images per category (default 4)")
    ap.add_argument("--step-timeout", type=float, default=None, help="give up a step after this many seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tour.json"), help="JSON results file")
    a = ap.parse_args(argv)
    result = run(a.model, a.images, a.step_timeout)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
