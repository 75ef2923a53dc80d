"""Faithfulness of the circuits of every zoo model, every shapes category, two selectors.

For each zoo model (simplecnn_a, simplecnn_b, smallresnet, tinyvit): attribution graphs per
category on a held-out shapes probe set (32 images per class, seed 12345 as in the demo,
never used in training), then ``an.faithfulness`` with mean ablation for the per-layer
selector (``circuit(select="layer")``, the default) and the global one
(``select="global"``). Printed per category: the necessity and sufficiency areas (AUC over
the mass levels) of the circuit and of each baseline (random mean, activation magnitude,
weight-connectome flow share, gradient x activation, other categories' circuits), how many
standard deviations above the random sets the circuit is, and the verdict; per model and
selector, the counts the issue's goal asks for.

This is a measurement, not a timing: the images and seeds are fixed; nothing is tuned.
``--demo-cost`` instead times what the demo adds (its faithfulness section: the call and the
report figure) against the demo's existing fidelity section, in the same run.

Run: ``python benchmarks/bench_faithfulness.py [--models a,b] [--select layer,global]
[--n-per-class 32] [--value mean|zero|resample] [--out FILE]``; writes
``benchmarks/results/faithfulness.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectome import analysis as an  # noqa: E402
from connectome import zoo  # noqa: E402
from connectome.analysis.faithfulness import BASELINES  # noqa: E402
from connectome.extract import attribution_by_category  # noqa: E402

MODELS = ("simplecnn_a", "simplecnn_b", "smallresnet", "tinyvit")
PROBE_SEED = 12345


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--select", default="layer,global")
    ap.add_argument("--n-per-class", type=int, default=32)
    ap.add_argument("--n-boot", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--value", default="mean", choices=("mean", "zero", "resample"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faithfulness.json"))
    ap.add_argument("--demo-cost", action="store_true", help="time the demo's faithfulness section instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.demo_cost:
        demo_cost()
        return
    classes = list(zoo.SHAPE_CLASSES)
    out: dict[str, dict] = {}
    for name in args.models.split(","):
        model = zoo.load_model(name)
        data = zoo.shapes(args.n_per_class, seed=PROBE_SEED, size=int(zoo.model_info(name).get("image_size", 32)))
        t0 = time.perf_counter()
        graphs = attribution_by_category(model, data, "label", device="cpu", labels=classes, progress=False)
        t_graph = time.perf_counter() - t0
        for sel in args.select.split(","):
            t0 = time.perf_counter()
            f = an.faithfulness(model, graphs, data, select=sel, device="cpu", n_boot=args.n_boot, value=args.value)
            secs = time.perf_counter() - t0
            print(f"\n== {name}, select={sel} ({secs:.0f} s; graphs {t_graph:.0f} s), ablation value {f.value!r}, "
                  f"metric {f.metric!r}")
            head = (f"{'category':<9} {'units':>11} | {'necessity AUC: circ':>19} {'rand':>6} "
                    + " ".join(f"{b[:8]:>8}" for b in BASELINES) + f" {'other':>6} {'z':>6} | "
                    f"{'suff AUC: circ':>14} {'rand':>6} " + " ".join(f"{b[:8]:>8}" for b in BASELINES)
                    + f" {'other':>6} {'z':>6} | verdict")
            print(head)
            n_rand = n_all = n_faith = 0
            for c, r in f.categories.items():
                a, s = r.auc_necessity, r.auc_sufficiency
                units = f"{int(r.n_units.min())}-{int(r.n_units.max())}"
                print(f"{c:<9} {units:>11} | {a['circuit']:>19.3f} {a['random']:>6.3f} "
                      + " ".join(f"{a.get(b, float('nan')):>8.3f}" for b in BASELINES)
                      + f" {a.get('other', float('nan')):>6.3f} {r.z_necessity:>6.1f} | {s['circuit']:>14.3f} "
                      f"{s['random']:>6.3f} " + " ".join(f"{s.get(b, float('nan')):>8.3f}" for b in BASELINES)
                      + f" {s.get('other', float('nan')):>6.3f} {r.z_sufficiency:>6.1f} | {r.verdict}")
                n_rand += r.beats["random"]
                n_all += all(r.beats.values())
                n_faith += r.verdict == "faithful"
            k = len(f.categories)
            print(f"-> necessity > 2 sd above random: {n_rand}/{k}; above every baseline in necessity: {n_all}/{k}; "
                  f"verdict faithful: {n_faith}/{k}")
            out.setdefault(name, {})[sel] = {
                "seconds": round(secs, 1), "beats_random": n_rand, "beats_all": n_all, "faithful": n_faith,
                "n_categories": k, "result": _compact(f.to_dict()),
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, separators=(",", ":")))
    print("\nsummary (necessity > 2 sd above random / above every baseline / faithful):")
    for name, by in out.items():
        print(f"  {name:<12} " + "   ".join(f"{sel}: {v['beats_random']}/{v['n_categories']}, {v['beats_all']}/"
                                           f"{v['n_categories']}, {v['faithful']}/{v['n_categories']}"
                                           for sel, v in by.items()))


def _compact(d: dict) -> dict:
    """The result without per-seed and per-other-category curves, numbers to 4 decimals."""
    def r(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, list):
            return [r(a) for a in v]
        if isinstance(v, dict):
            return {k: r(a) for k, a in v.items() if not str(k).startswith("other:")}
        return v

    for c in d["categories"].values():
        c.pop("random_necessity", None)
        c.pop("random_sufficiency", None)
    return r(d)


def demo_cost() -> None:
    """Wall and CPU seconds of the demo's faithfulness section vs its fidelity section."""
    from connectome import demo
    from connectome.viz.report import Report, add_faithfulness

    classes = list(zoo.SHAPE_CLASSES)
    data = zoo.shapes(demo.N_PER_CLASS, seed=demo.PROBE_SEED)
    model = zoo.load_model(demo.MAIN)
    graphs = attribution_by_category(model, data, "label", device="cpu", labels=classes, progress=False)
    c0, w0 = time.process_time(), time.perf_counter()
    f = demo._faithfulness(model, graphs, data, classes, demo.N_PER_CLASS)
    add_faithfulness(Report("x"), {demo.MAIN: f}, categories=["circle", "square", "hstripes"], level=3)
    c1, w1 = time.process_time(), time.perf_counter()
    for cname in classes:
        idx = [i for i, t in enumerate(data.targets) if int(t) == classes.index(cname)]
        xs = torch.stack([data[i][0] for i in idx])
        ys = torch.tensor([classes.index(cname)] * len(idx))
        an.fidelity(model, an.circuit(graphs[cname], mass=demo.MASS), (xs, ys), n_random=20, seed=0,
                    curves=cname == "circle", device="cpu")
    c2, w2 = time.process_time(), time.perf_counter()
    print(f"demo faithfulness section: wall {w1 - w0:.1f} s (cpu {c1 - c0:.1f} s); existing fidelity section: "
          f"wall {w2 - w1:.1f} s (cpu {c2 - c1:.1f} s); ratio {(w1 - w0) / (w2 - w1):.2f}")


if __name__ == "__main__":
    main()
