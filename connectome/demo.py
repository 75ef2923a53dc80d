"""``make demo``: the whole toolkit on the embedded zoo, in a few minutes on a laptop CPU.

Generates the shapes probe images (fixed seed, never used in training), extracts one
attribution graph per category for each zoo model, and reports: hubs, communities,
circuits and neuron groups per category; category similarity per layer; units shared
between categories; analogous circuits across categories and across two independently
trained models; unit matching and universality; circuit fidelity by ablation and faithfulness
(necessity and sufficiency against same-size baselines, with verdicts); a two-image
comparison; GraphML and GEXF per category for Gephi.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo"]

MAIN = "smallresnet"
PAIR = ("simplecnn_a", "simplecnn_b")
N_PER_CLASS = 24
PROBE_SEED = 12345  # not a training or evaluation seed of the zoo
# Per-layer flow mass kept in circuits: 30% gives circuits of ~25 of 300 units that a person
# can read and that ablation separates clearly from random unit sets of the same size.
MASS = 0.3
EXAMPLES = 8  # top images kept per unit


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run_demo(out: str | Path = "demo_out", progress: bool = True, n_per_class: int = N_PER_CLASS,
             n_random: int = 20) -> str:
    """Run the demo and write ``out/report.html``; returns its path.

    ``n_per_class`` probe images per category and ``n_random`` random ablations per circuit
    (smaller values make a quick smoke run).
    """
    import torch

    from connectome import analysis as an
    from connectome import io, viz, zoo
    from connectome.extract import attribution_by_category
    from connectome.reporting import graph_sections
    from connectome.viz.report import add_faithfulness

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gephi").mkdir(exist_ok=True)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    classes = list(zoo.SHAPE_CLASSES)
    data = zoo.shapes(n_per_class, seed=PROBE_SEED, size=int(zoo.model_info(MAIN).get("image_size", 32)))
    models = {name: zoo.load_model(name) for name in (MAIN, *PAIR)}
    summary: dict[str, Any] = {"classes": classes, "n_images_per_class": n_per_class}
    rep = viz.Report("connectome demo: the shapes zoo as a connectome")
    rep.add_text(
        f"{len(classes)} categories of procedural shapes ({', '.join(classes)}), {n_per_class} probe images each "
        f"(seed {PROBE_SEED}, never seen in training). Models: {', '.join(models)} (held-out accuracies "
        + ", ".join(f"{n} {zoo.model_info(n).get('accuracy', float('nan')):.3f}" for n in models) + ")."
    )

    # 1. attribution graphs per category, per model
    graphs: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        _log(f"[{time.perf_counter() - t0:5.1f}s] extracting attribution graphs of {name}", progress)
        # dataset examples (top images per unit) for the main model's unit cards and viewer
        graphs[name] = attribution_by_category(model, data, "label", per_sample=True, batch_size=64,
                                               progress=progress, device="cpu", name=f"zoo:{name}", labels=classes,
                                               examples=EXAMPLES if name == MAIN else 0)
    main = graphs[MAIN]
    resid = max(abs(g.meta["completeness_relative"]) for gs in graphs.values() for g in gs.values())
    summary["completeness_relative_max"] = resid
    rep.add_heading("1. Extraction", 2)
    rep.add_table([[n, len(gs), next(iter(gs.values())).num_nodes, next(iter(gs.values())).num_edges,
                    max(abs(g.meta["completeness_relative"]) for g in gs.values())] for n, gs in graphs.items()],
                  headers=["model", "categories", "units", "edges", "max completeness residual (relative)"],
                  caption="Attribution graphs: flows are exact, so input attribution + bias terms equal the class "
                          "logits up to float32 rounding.")
    for cname, g in main.items():
        # Gephi files carry the analysis: centralities, Leiden community (node colour), circuit
        g = an.annotate(g, centrality=an.centrality(g, an.default_measures(g, betweenness=False)),
                        partition=an.communities(g, seed=0), circuit=an.circuit(g, mass=MASS))
        main[cname] = g
        pruned = g.prune(top_k=8, by="abs_weight")
        io.write_graphml(pruned, out / "gephi" / f"{MAIN}_{cname}.graphml")
        io.write_gexf(pruned, out / "gephi" / f"{MAIN}_{cname}.gexf")
        g.save(out / "gephi" / f"{MAIN}_{cname}.npz")

    # 2. per-category analysis of the main model
    _log(f"[{time.perf_counter() - t0:5.1f}s] hubs, communities, circuits, neuron groups", progress)
    rep.add_heading(f"2. Circuits of {MAIN}, per category", 2)
    circuits: dict[str, Any] = {}
    rows = []
    for i, (cname, g) in enumerate(main.items()):
        sec = graph_sections(g, top=5, report=rep if i < 3 else None, prefix="", mass=MASS, images=data, max_cards=12)
        circuits[cname] = sec["_circuit"]
        c = sec["_circuit"]
        rows.append([cname, c.num_nodes, c.num_edges, sec["communities"]["n"], sec["hubs"]["top"][0][0]])
    summary["circuits"] = {r[0]: {"units": r[1], "edges": r[2]} for r in rows}
    rep.add_table(rows, headers=["category", "circuit units", "circuit edges", "communities", "top hub"],
                  caption=f"Circuits carrying {MASS:.0%} of the flow per layer into each class (first three drawn above).")

    # 3. categories compared: same units vs analogous units
    _log(f"[{time.perf_counter() - t0:5.1f}s] comparing categories", progress)
    rep.add_heading("3. Categories compared", 2)
    cc = an.compare_categories(main, attr="attribution")
    mats = {layer: cc.matrix(layer) for layer in cc.layers} if hasattr(cc, "matrix") else dict(cc)
    rep.add_figure(viz.plot_similarity(mats, classes, title="Category similarity of unit attribution per layer"),
                   "Correlation across units of per-unit attribution between categories, layer by layer: shapes "
                   "that share parts (circle/ring/ellipse; square/triangle/cross; stripes) share units.",
                   "category_similarity")
    pairs = [("circle", "ring"), ("square", "triangle"), ("hstripes", "vstripes"), ("circle", "square")]
    prow = []
    for a, b in pairs:
        cmp = an.compare(main[a], main[b], top=10, mass=MASS)
        s = cmp.summary
        prow.append([f"{a} / {b}", s["jaccard"], s["spearman"], s["circuit_jaccard"], s["nmi"], len(cmp.shared_units)])
    summary["category_pairs"] = prow
    rep.add_table(prow, headers=["pair", "top-unit Jaccard (mean over layers)", "rank corr. of attribution",
                                 "circuit Jaccard", "community NMI", "shared important units"],
                  caption="Same units: categories that share parts reuse the same units.")
    # analogous circuits across categories: the same wiring carried by other units
    # The pattern: the skeleton of a small circuit (each unit's strongest input within it);
    # the host keeps each unit's 8 strongest inputs, so that a placement can use other units.
    pat = _skeleton(main["circle"])
    hits = an.find_analogous(pat, main["ring"].prune(top_k=8, by="abs_weight"), max_matches=5, time_budget=5.0)
    summary["analogous_circle_in_ring"] = len(hits)
    rep.add_text(
        f"Analogous wiring: the skeleton of the top-2-per-layer circuit of 'circle' ({pat.num_nodes} units, "
        f"{pat.num_edges} edges) "
        f"has {len(hits)} sign-preserving placement(s) in the pruned 'ring' graph"
        + (f"; the best (weight agreement {hits[0].score:.3f}) maps "
           + ", ".join(f"{k}->{v}" for k, v in list(hits[0].mapping.items())[:6]) + " ..." if len(hits) else "")
        + "."
    )

    # 4. two models: unit matching and universality
    _log(f"[{time.perf_counter() - t0:5.1f}s] matching units of {PAIR[0]} and {PAIR[1]}", progress)
    rep.add_heading(f"4. Two independently trained models: {PAIR[0]} vs {PAIR[1]}", 2)
    probe = torch.stack([data[i][0] for i in range(0, len(data), 2)])
    m = an.match_units(models[PAIR[0]], models[PAIR[1]], probe, device="cpu")
    corrs = {f"{la}->{lb}": m.correlation(la) for la, lb in m.layer_pairs}
    summary["matching"] = {k: float(np.mean(v)) for k, v in corrs.items()}
    circs = {n: {c: an.circuit(g, mass=MASS) for c, g in graphs[n].items()} for n in PAIR}
    uni = an.universality({PAIR[0]: graphs[PAIR[0]], PAIR[1]: graphs[PAIR[1]]}, m, circuits=circs)
    summary["universality"] = uni.to_dict() if hasattr(uni, "to_dict") else str(uni)
    overlaps = _overlaps_by_pair(uni, m)
    rep.add_figure(viz.plot_matching(corrs, overlaps or None, title="Unit matching between two seeds"),
                   "Correlation of matched units (one-to-one assignment on activations, Li et al. 2015) per layer, "
                   "and how much of model A's circuits lands, through the matching, in model B's circuits compared "
                   "with random unit sets.", "matching")
    rep.add_code(repr(uni))
    pat = _skeleton(graphs[PAIR[0]]["triangle"])
    hits = an.find_analogous(pat, graphs[PAIR[1]]["triangle"].prune(top_k=8, by="abs_weight"), max_matches=5,
                             time_budget=5.0)
    summary["analogous_across_models"] = len(hits)
    if len(hits):
        mapped = [m.map_node(k) for k in hits[0].mapping]
        agree = float(np.mean([mp == v for mp, v in zip(mapped, hits[0].mapping.values())]))
        rep.add_text(
            f"Analogous circuits across models: {PAIR[0]}'s top-2 'triangle' circuit has {len(hits)} placement(s) "
            f"in {PAIR[1]}'s 'triangle' graph; in the best one {agree:.0%} of the units are the partners the "
            "activation matching found independently."
        )

    # 5. causal validation
    _log(f"[{time.perf_counter() - t0:5.1f}s] ablating circuits", progress)
    rep.add_heading("5. Do the circuits matter? Ablation", 2)
    frow = []
    curves = {}
    fids = {}
    for cname in classes:
        sub_idx = [i for i, t in enumerate(data.targets) if int(t) == classes.index(cname)]
        xs = torch.stack([data[i][0] for i in sub_idx])
        ys = torch.tensor([classes.index(cname)] * len(sub_idx))
        fid = an.fidelity(models[MAIN], circuits[cname], (xs, ys), n_random=n_random, seed=0, curves=cname == "circle",
                          device="cpu")
        fids[cname] = fid
        frow.append([cname, fid.circuit_drop, fid.random_mean, fid.random_std, fid.complement_drop])
        if cname == "circle":
            curves = _curves(fid)
    summary["fidelity"] = frow
    rep.add_table(frow, headers=["category", "circuit ablation: prob. drop", "random sets: mean drop", "random std",
                                 "keep only circuit: drop"],
                  caption="Zeroing a category's circuit units versus the same number of random units per layer.")
    rep.add_figure(viz.plot_fidelity(fids, title="Drop in class probability: circuit ablated vs random units"),
                   f"Fidelity: the probability drop from ablating each circuit, next to the drop from ablating "
                   f"{n_random} random unit sets with as many units per layer (the baseline it is measured against).",
                   "fidelity")
    if curves:
        rep.add_figure(viz.plot_curves(curves, title="Deletion and insertion curves (circle)",
                                       xlabel="fraction of circuit units removed (deletion) / restored (insertion)",
                                       ylabel="class probability"),
                       "Removing circuit units in order of attribution (deletion) or restoring them (insertion).",
                       "curves")

    # 5b. faithfulness: necessity and sufficiency against baselines of the same size
    _log(f"[{time.perf_counter() - t0:5.1f}s] faithfulness of the circuits", progress)
    faith = _faithfulness(models[MAIN], main, data, classes, n_per_class)
    summary["faithfulness"] = {c: {"verdict": r.verdict, "reason": r.reason, "z_necessity": r.z_necessity,
                                   "auc_necessity": r.auc_necessity["circuit"], "auc_sufficiency":
                                   r.auc_sufficiency["circuit"]} for c, r in faith.categories.items()}
    add_faithfulness(rep, {MAIN: faith}, categories=["circle", "square", "hstripes"], level=3,
                     heading=f"Faithfulness of {MAIN}'s circuits (mean ablation, same-size baselines)")

    # 6. two images compared
    rep.add_heading("6. Compare two images", 2)
    ia = next(i for i, t in enumerate(data.targets) if int(t) == classes.index("circle"))
    ib = next(i for i, t in enumerate(data.targets) if int(t) == classes.index("square"))
    ca = an.compare_activations(models[MAIN], data[ia][0], data[ib][0], top=5, device="cpu")
    rep.add_figure(_image_comparison_figure(ca, data[ia][0], data[ib][0], zoo),
                   "Units whose activations differ most between a circle and a square, per layer, and the spatial "
                   "map of the most different unit over each image.", "two_images")
    rep.add_code(repr(ca))

    # 7. the interactive viewer: every category of the main model in one self-contained page
    _log(f"[{time.perf_counter() - t0:5.1f}s] writing the interactive viewer", progress)
    viewer = viz.write_viewer({c: g for c, g in main.items()}, out / "viewer.html", images=data, mass=0.9,
                              title=f"connectome viewer: {MAIN} on the shapes zoo")
    summary["viewer"] = viewer.name
    rep.add_heading("7. Explore the circuits", 2)
    rep.add_text("viewer.html (next to this report) shows the circuit of every category interactively: hover a unit "
                 "for its top image patches and strongest flows, click to pin it, move the circuit-mass slider, "
                 "switch categories, search a unit by id. It is one file and needs no network.")

    # 8. functional connectivity, lesions, the connectome over training
    _log(f"[{time.perf_counter() - t0:5.1f}s] functional connectivity, lesion curves, connectomes over training",
         progress)
    summary["toolbox"] = _toolbox(rep, models[MAIN], main, data, classes, out)

    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 1)
    rep.add_heading("Files", 2)
    rep.add_text(f"GraphML, GEXF and .npz of every category of {MAIN} are in gephi/ (pruned to the 8 strongest inputs "
                 f"per unit by per-image |flow|). Finished in {seconds:.0f} s.")
    path = rep.write(out)
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    print(_summary_text(summary, path))
    return str(path)


TRAIN_STEPS = 9  # optimizer steps of the short training run whose checkpoints section 8 reads
SAVE_EVERY = 3


def _toolbox(rep: Any, model: Any, main: dict[str, Any], data: Any, classes: list[str], out: Path) -> dict[str, Any]:
    """Section 8: functional vs effective connectivity, targeted vs random lesions, and a
    class circuit forming over a short training run of simplecnn_a (checkpoints every 3 steps)."""
    import torch

    from connectome import analysis as an
    from connectome import extract, zoo
    from connectome.viz.report import functional_section, lesion_section, trajectory_section
    from connectome.zoo.train import train_model

    t = time.perf_counter()
    rep.add_heading("8. Fire together, break apart, grow: functional connectivity, lesions, training", 2)
    fc = an.functional_connectivity(model, data, device="cpu", fdr=None)
    effective = main["circle"]
    coup = an.coupling(effective, fc, absolute=True, n_permutations=200)
    functional_section(rep, fc, effective, coup, level=3)
    pick = list(range(0, len(data), 4))
    x = torch.stack([data[i][0] for i in pick])
    y = torch.tensor([int(data.targets[i]) for i in pick])
    w = extract.weights(model, tuple(x.shape[1:]))
    ref = next(iter(main.values()))  # every category's graph has the same units
    flow = sum(np.abs(np.asarray(g.node_attrs["attribution"], dtype=np.float64)) for g in main.values())
    curves = {
        "attribution (targeted)": an.lesion_curve(model, (x, y), flow, graph=ref, steps=6, fraction=0.5,
                                                  device="cpu"),
        "strength (targeted)": an.lesion_curve(model, (x, y), "strength", graph=w, steps=6, fraction=0.5,
                                               device="cpu"),
        "random": an.lesion_curve(model, (x, y), "random", steps=6, fraction=0.5, seeds=3, device="cpu"),
    }
    lesion_section(rep, curves, level=3)
    ck = out / "checkpoints"
    n_per_class = -(-TRAIN_STEPS * 64 // len(classes))  # TRAIN_STEPS batches of 64 in one epoch
    grown, acc = train_model("simplecnn_a", epochs=1, n_per_class=n_per_class, progress=False, save_every=SAVE_EVERY,
                             checkpoint_dir=ck, heldout_per_class=10)
    graphs = extract.over_training(zoo.build_model("simplecnn_a"), ck, input_shape=tuple(x.shape[1:]), labels=classes)
    traj = an.trajectory(graphs, mass=MASS)
    trajectory_section(rep, traj, level=3)
    return {"seconds": round(time.perf_counter() - t, 1), "functional_edges": fc.n_edges,
            "coupling_rho": coup.overall.rho,
            "lesion_auc": {k: c.auc_accuracy for k, c in curves.items()},
            "trajectory_steps": list(traj.steps), "circuit_formed": traj.formed, "trained_accuracy": acc}


# Faithfulness in the demo: a few mass levels, random sets and images per category, so that it
# adds seconds, not minutes (benchmarks/bench_faithfulness.py runs the full measurement).
FAITH_LEVELS = (0.1, 0.3, 0.6)
FAITH_RANDOM = 4
FAITH_IMAGES = 8


def _faithfulness(model: Any, graphs: dict[str, Any], data: Any, classes: list[str], n_per_class: int) -> Any:
    """``an.faithfulness`` of the main model's circuits on the first FAITH_IMAGES images per class."""
    import torch

    from connectome import analysis as an

    keep = [i for c in range(len(classes)) for i in [j for j, t in enumerate(data.targets) if int(t) == c][:FAITH_IMAGES]]
    x = torch.stack([data[i][0] for i in keep])
    y = torch.tensor([int(data.targets[i]) for i in keep])
    return an.faithfulness(model, graphs, (x, y), levels=FAITH_LEVELS, n_random=FAITH_RANDOM, n_boot=200,
                           device="cpu")


def _curves(fid: Any) -> dict[str, tuple[Any, Any]]:
    """Deletion and insertion curves of a FidelityResult as ``name -> (x, y)`` for plot_curves."""
    if fid.deletion_curve is None:
        return {}
    # each curve holds its y values over the shared x (fraction of circuit units)
    return {"deletion": (fid.curve_x, fid.deletion_curve), "insertion": (fid.curve_x, fid.insertion_curve)}


def _skeleton(g: Any) -> Any:
    """A small circuit's skeleton: top 2 units per layer, each keeping its strongest input."""
    from connectome import analysis as an

    return an.circuit(g, top_k=2).prune(top_k=1, by="abs_weight" if "abs_weight" in g.edge_attrs else "weight")


def _overlaps_by_pair(uni: Any, m: Any) -> dict[str, tuple[float, float]]:
    """Per matched layer pair: circuit overlap through the matching vs chance, pooled over categories."""
    pair_of = dict(m.layer_pairs)
    hits: dict[str, list[float]] = {}
    for cat in uni.per_category:
        for layer, row in cat.per_layer.items():
            if layer in pair_of and row.get("overlap") is not None and np.isfinite(row["overlap"]):
                hits.setdefault(layer, []).append((row["overlap"], row.get("random_mean", float("nan"))))
    return {f"{layer}->{pair_of[layer]}": (float(np.mean([o for o, _ in v])), float(np.nanmean([c for _, c in v])))
            for layer, v in hits.items()}


def _image_comparison_figure(ca: Any, img_a: Any, img_b: Any, zoo: Any) -> Any:
    from connectome import viz

    hidden = [r for r in ca.per_layer if r.layer not in ("input", "logits")]
    diffs = {r.layer: list(zip(r.node_ids, r.a.tolist(), r.b.tolist())) for r in hidden}
    # the spatial map of each layer's most different unit, over both images
    maps = {r.layer: ca.maps[r.layer][:, 0] for r in hidden if r.layer in ca.maps}
    return viz.plot_image_comparison(zoo.denormalize(img_a), zoo.denormalize(img_b), diffs, maps or None,
                                     names=("circle", "square"), title="Compare two images")


def _summary_text(s: dict[str, Any], path: Any) -> str:
    lines = [f"connectome demo finished in {s['seconds']} s", ""]
    lines.append(f"circuits ({MASS:.0%} of flow per layer) per category of {MAIN}: "
                 + ", ".join(f"{k} {v['units']} units" for k, v in s["circuits"].items()))
    for r in s["category_pairs"]:
        lines.append(f"  {r[0]:<20} top-unit Jaccard {r[1]:.2f}  circuit Jaccard {r[3]:.2f}  community NMI {r[4]:.2f}")
    lines.append("unit matching " + PAIR[0] + " -> " + PAIR[1] + ": "
                 + ", ".join(f"{k} r={v:.2f}" for k, v in s["matching"].items()))
    lines.append(f"analogous circuits (subgraph isomorphism): circle's circuit skeleton placed in ring's graph "
                 f"{s['analogous_circle_in_ring']}x, triangle's of {PAIR[0]} in {PAIR[1]} {s['analogous_across_models']}x")
    lines.append("fidelity, zero ablation (prob. drop, circuit vs random mean +- sd): "
                 + ", ".join(f"{r[0]} {r[1]:.2f} vs {r[2]:.2f}+-{r[3]:.2f}" for r in s["fidelity"]))
    if "faithfulness" in s:
        lines.append("faithfulness (mean ablation; circuit vs same-size random, activation, weight, grad x act and "
                     "other categories' units):")
        by: dict[str, list[str]] = {}
        for c, v in s["faithfulness"].items():
            by.setdefault(v["verdict"], []).append(c)
        for verdict in ("faithful", "partial", "not faithful"):
            if verdict in by:
                lines.append(f"  {verdict}: {', '.join(by[verdict])}")
        weak = {c: v for c, v in s["faithfulness"].items() if v["verdict"] != "faithful"}
        for c, v in weak.items():
            lines.append(f"    {c}: {v['reason']}")
    lines.append(f"max completeness residual (relative): {s['completeness_relative_max']:.1e}")
    lines.append(f"viewer: {Path(path).parent / s['viewer']}")
    return "\n".join(lines)
