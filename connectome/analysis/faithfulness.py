"""Faithfulness: is a circuit necessary and sufficient for its class, more than cheaper picks?

For each category, circuits are cut from its attribution graph at several sizes (flow mass
levels). At each size the model runs, over the category's images, with

* **necessity**: the circuit's hidden units ablated; the fraction of the class signal lost,
  ``(m(intact) - m(ablated)) / (m(intact) - m0)``;
* **sufficiency**: every unit of the circuit's layers ablated *except* the circuit's; the
  fraction kept, ``(m(only circuit) - m0) / (m(intact) - m0)``;

where ``m`` is the mean target probability, with ``m0 = 0``, or the mean target logit, with
``m0`` the logit when every unit of the layers the circuit touches is ablated (Wang et al.
2022; Marks et al. 2024). Ablated units pass on their
mean over the data (default), zero, or their value on another image (resampling).

The same is done for **baselines of the same size per layer**: random units (several seeds),
the units with the largest mean activation magnitude on the category's images, the largest
share of weight-connectome flow into the class logit, the largest gradient x (activation -
ablation value) of the class logit (one backward pass: attribution patching), and the circuits
of the other categories (specificity). Areas under the curves (mean over the size levels)
summarise them; confidence intervals come from a bootstrap over images (the same resampled
images for circuit and baselines, so differences are paired).

Every (size level, unit set) pair is one ablation pattern; all patterns of a category run
through the traced model as rows of (pattern, image) batches, never image by image.

References
----------
Wang, K. et al. (2022). Interpretability in the Wild: a Circuit for Indirect Object
Identification in GPT-2 small. arXiv:2211.00593 (faithfulness, mean ablation).
Marks, S. et al. (2024). Sparse Feature Circuits. arXiv:2403.19647 (normalised faithfulness).
Chan, L. et al. (2022). Causal Scrubbing (resample ablation).
Nanda, N. (2023). Attribution Patching (gradient x activation difference).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from connectome.analysis.circuits import SELECTORS, circuit, flow_share, target_node
from connectome.errors import ConnectomeError, DataError, EmptyGraphError
from connectome.graph import Connectome

# torch (and the modules that run models) load on first use, so that importing
# connectome.analysis stays free of torch; hence the string annotations below.

__all__ = ["faithfulness", "FaithfulnessResult", "CategoryFaithfulness", "LEVELS", "BASELINES"]

#: Default flow mass levels of the curves.
LEVELS = (0.05, 0.1, 0.3, 0.6, 0.9)
#: Ranked baselines (random and the other categories are added to them).
BASELINES = ("activation", "weight", "gradxact")
_CI = (2.5, 97.5)


# ---------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class CategoryFaithfulness:
    """Necessity and sufficiency of one category's circuit against its baselines.

    Curves have one value per size level; ``1`` means the whole class signal (necessity: all
    of it lost; sufficiency: all of it kept), ``0`` none.

    Attributes
    ----------
    category : str
    target : int
        The class unit scored.
    n_images : int
        Images of the category the curves are measured on.
    levels : ndarray, shape (k,)
        Flow mass levels of the circuits.
    n_units : ndarray of int, shape (k,)
        Hidden units of the circuit at each level (every baseline has as many per layer).
    necessity, sufficiency : dict of str -> ndarray, shape (k,)
        ``"circuit"``, ``"random"`` (mean over seeds), each of :data:`BASELINES`,
        ``"other"`` (mean over the other categories) and ``"other:<category>"``.
    random_necessity, random_sufficiency : ndarray, shape (n_random, k)
        The curve of each random seed.
    auc_necessity, auc_sufficiency : dict of str -> float
        Areas under the curves, over the levels scaled to [0, 1] (the mean of a flat curve).
    z_necessity, z_sufficiency : float
        ``(circuit AUC - mean random AUC) / std of random AUCs`` over the seeds.
    ci_necessity, ci_sufficiency : (float, float)
        95% bootstrap interval (over images) of the circuit's AUC.
    diff_ci : dict of str -> (float, float)
        95% bootstrap interval of ``circuit - baseline`` necessity AUC (paired over images),
        for ``"random"``, each of :data:`BASELINES` and ``"other"``.
    beats : dict of str -> bool
        Necessity: ``"random"`` when ``z_necessity > z_min``; each other baseline when its
        difference interval lies above 0.
    specificity : float
        Fraction of the other categories whose circuit (same size) hurts this class less.
    verdict : str
        ``"faithful"`` (beats random by ``z_min`` sd in necessity and sufficiency, and every
        baseline in necessity), ``"partial"`` (beats random in necessity, not all the rest)
        or ``"not faithful"`` (not ``z_min`` sd above random in necessity).
    reason : str
        The verdict in words, naming what the circuit did not beat.
    emptied : ndarray, shape (k,)
        Metric ``"prob"``: the target probability with every unit of the touched layers
        ablated, as a fraction of the intact one (how much of the class survives with no
        circuit at all: sufficiency of any set starts there).
    """

    category: str
    target: int
    n_images: int
    levels: np.ndarray
    n_units: np.ndarray
    necessity: dict[str, np.ndarray]
    sufficiency: dict[str, np.ndarray]
    random_necessity: np.ndarray
    random_sufficiency: np.ndarray
    auc_necessity: dict[str, float]
    auc_sufficiency: dict[str, float]
    z_necessity: float
    z_sufficiency: float
    ci_necessity: tuple[float, float]
    ci_sufficiency: tuple[float, float]
    diff_ci: dict[str, tuple[float, float]]
    beats: dict[str, bool]
    specificity: float
    verdict: str
    reason: str
    emptied: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (arrays as lists, NaN as None)."""
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class FaithfulnessResult:
    """Faithfulness of circuits, per category (see :func:`faithfulness`).

    Attributes
    ----------
    value : str
        What ablated units passed on: ``"mean"`` (over all the data), ``"zero"`` or
        ``"resample"`` (another image's value).
    metric : str
        ``"prob"`` or ``"logit"`` of the target class.
    select : str
        The circuit selector (``an.circuit(select=...)``).
    z_min : float
        Standard deviations above random a circuit needs.
    n_random, n_boot : int
    categories : dict of str -> CategoryFaithfulness
    skipped : tuple of str
        Baselines that could not be computed, with why.
    """

    value: str
    metric: str
    select: str
    z_min: float
    n_random: int
    n_boot: int
    categories: dict[str, CategoryFaithfulness]
    skipped: tuple[str, ...] = field(default=())

    def __getitem__(self, category: str) -> CategoryFaithfulness:
        return self.categories[category]

    def verdicts(self) -> dict[str, str]:
        """Category -> verdict."""
        return {c: r.verdict for c, r in self.categories.items()}

    def rows(self) -> list[list[Any]]:
        """One row per category: the numbers of :data:`ROW_HEADERS`."""
        out = []
        for c, r in self.categories.items():
            a, s = r.auc_necessity, r.auc_sufficiency
            out.append([c, int(r.n_units.max()), a["circuit"], a["random"], a.get("activation", math.nan),
                        a.get("weight", math.nan), a.get("gradxact", math.nan), a.get("other", math.nan),
                        r.z_necessity, s["circuit"], s["random"], r.z_sufficiency, r.verdict])
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__ if k != "categories"}
        d["categories"] = {c: r.to_dict() for c, r in self.categories.items()}
        return d

    def __repr__(self) -> str:
        lines = [f"FaithfulnessResult({len(self.categories)} categories, ablation value {self.value!r}, "
                 f"metric {self.metric!r}, selector {self.select!r}, {self.n_random} random sets, "
                 f"{self.n_boot} bootstrap samples)"]
        lines.append(f"  {'category':<12} {'units':>5}  {'necessity AUC: circuit':>22} {'random':>7} {'best other':>10}"
                     f"  {'z':>6}  {'sufficiency AUC':>15} {'z':>6}  verdict")
        for c, r in self.categories.items():
            a = r.auc_necessity
            others = [(k, v) for k, v in a.items() if k in (*BASELINES, "other") and math.isfinite(v)]
            best = max(others, key=lambda kv: kv[1]) if others else ("", math.nan)
            lines.append(f"  {c:<12} {int(r.n_units.max()):>5}  {_fmt(a['circuit']):>22} {_fmt(a['random']):>7} "
                         f"{_fmt(best[1]):>10}  {_fmt(r.z_necessity):>6}  {_fmt(r.auc_sufficiency['circuit']):>15} "
                         f"{_fmt(r.z_sufficiency):>6}  {r.verdict}")
        if self.skipped:
            lines.append("  skipped baselines: " + "; ".join(self.skipped))
        return "\n".join(lines)


ROW_HEADERS = ["category", "units (largest)", "nec. AUC circuit", "random", "activation", "weight", "grad x act",
               "other categories", "nec. z", "suff. AUC circuit", "suff. random", "suff. z", "verdict"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_jsonable(a) for a in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(a) for a in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(a) for k, a in v.items()}
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return None if math.isnan(f) else ("inf" if f == math.inf else "-inf" if f == -math.inf else f)
    if isinstance(v, np.integer):
        return int(v)
    return v


# ---------------------------------------------------------------------- helpers
def _graphs(circuits_or_graph: Any) -> dict[str, Connectome]:
    if isinstance(circuits_or_graph, Connectome):
        g = circuits_or_graph
        return {str(g.meta.get("category", "circuit")): g}
    if isinstance(circuits_or_graph, Mapping) and circuits_or_graph:
        bad = [k for k, g in circuits_or_graph.items() if not isinstance(g, Connectome)]
        if bad:
            raise ConnectomeError(f"circuits_or_graph[{bad[0]!r}] is a {type(circuits_or_graph[bad[0]]).__name__}, "
                                  "not a Connectome; pass attribution graphs (or circuits) per category")
        return {str(k): g for k, g in circuits_or_graph.items()}
    raise ConnectomeError("circuits_or_graph must be a Connectome or a non-empty mapping category -> Connectome "
                          f"(attribution graphs per category, e.g. from attribution_by_category), got "
                          f"{type(circuits_or_graph).__name__}")


def _is_circuit(g: Connectome) -> bool:
    return isinstance(g.meta.get("circuit"), dict)


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _layer_scores(t: Traced, g: Connectome, values: np.ndarray) -> dict[int, np.ndarray]:
    """Node values of ``g`` as ``traced layer -> per-unit array`` (0 for units ``g`` lacks)."""
    out: dict[int, np.ndarray] = {}
    for l in g.layers:
        li = t.index(l.name)
        if li is None or t.layers[li].kind in _io_kinds():
            continue
        arr = out.setdefault(li, np.zeros(t.ug.layers[li].size))
        sl = g.layer_slice(l.name)
        arr[g.node_units[sl]] = values[sl]
    return out


def _io_kinds() -> tuple[str, ...]:
    from connectome.extract.probe import IO_KINDS

    return IO_KINDS


def _sets(t: Traced, c: Connectome) -> dict[int, np.ndarray]:
    from connectome.analysis.ablation import _resolve_units

    try:
        return _resolve_units(t, c)
    except EmptyGraphError:
        return {}


def _top(score: np.ndarray | None, n: int, size: int) -> np.ndarray:
    if score is None:
        score = np.zeros(size)
    order = np.lexsort((np.arange(size), -np.nan_to_num(score, nan=-np.inf)))
    return order[:n]


def _grad_scores(t: Traced, x: torch.Tensor, target: int, layers: Sequence[int], fill: Mapping[int, torch.Tensor] | None,
                 batch_size: int) -> dict[int, np.ndarray]:
    """Per unit, ``|sum over images and positions of grad x (value - ablation value)|`` of the
    target logit: the first-order estimate of what ablating it costs (one backward pass)."""
    import torch

    from connectome.extract.probe import mask_units
    from connectome.extract.trace import run_nodes

    ug = t.ug
    out = {li: np.zeros(ug.layers[li].size) for li in layers}
    with torch.inference_mode(False), torch.enable_grad():
        nodes = {ug.layers[li].out_node: li for li in layers}
        refs = {} if fill is None else {li: f.clone() for li, f in fill.items() if f.shape[0] == 1}
        for start in range(0, x.shape[0], max(1, int(batch_size))):
            xb = x[start : start + batch_size].clone()
            scales = {li: torch.ones(1, ug.layers[li].size, device=t.device, dtype=t.dtype, requires_grad=True)
                      for li in layers}

            def on_value(node: Any, v: Any) -> Any:
                li = nodes.get(node.name)
                if li is None or not isinstance(v, torch.Tensor):
                    return v
                d = ug.one_unit_dim(node.name, "faithfulness")
                r = refs.get(li)
                if r is None:
                    return mask_units(v, scales[li], unit_dim=d)
                r = r.expand_as(v)
                return r + mask_units(v - r, scales[li], unit_dim=d)

            _, kept = run_nodes(ug.gm, (xb,), keep={ug.output_node}, on_value=on_value)
            logit = kept[ug.output_node].reshape(xb.shape[0], -1)[:, target].sum()
            grads = torch.autograd.grad(logit, [scales[li] for li in layers], allow_unused=True)
            for li, gr in zip(layers, grads):
                if gr is not None:
                    out[li] += gr.detach().double().cpu().numpy()[0]
    return {li: np.abs(v) for li, v in out.items()}


def _auc(levels: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under curves ``y[..., k]`` over ``levels`` scaled to [0, 1]; one level: the value."""
    if levels.size == 1:
        return y[..., 0]
    x = (levels - levels[0]) / (levels[-1] - levels[0])
    return np.sum((y[..., 1:] + y[..., :-1]) * np.diff(x), axis=-1) / 2.0


def _z(c: float, r: np.ndarray) -> float:
    if r.size < 2:
        return math.nan
    m, s = float(r.mean()), float(r.std(ddof=1))
    if s > 1e-12 * max(1.0, abs(m)):
        return (c - m) / s
    return 0.0 if abs(c - m) <= 1e-12 else math.copysign(math.inf, c - m)


def _verdict(z_nec: float, z_suff: float, beats: Mapping[str, bool], z_min: float) -> tuple[str, str]:
    lost = [k for k, b in beats.items() if k != "random" and not b]
    if not (z_nec > z_min):
        return "not faithful", (f"necessity only {_fmt(z_nec)} sd above random (needs > {z_min:g})"
                                + (f"; not above {', '.join(lost)}" if lost else ""))
    if lost or not (z_suff > z_min):
        parts = []
        if lost:
            parts.append(f"necessity not above {', '.join(lost)}")
        if not (z_suff > z_min):
            parts.append(f"sufficiency {_fmt(z_suff)} sd above random (needs > {z_min:g})")
        return "partial", f"beats random in necessity ({_fmt(z_nec)} sd); " + "; ".join(parts)
    return "faithful", (f"necessity {_fmt(z_nec)} sd and sufficiency {_fmt(z_suff)} sd above random, "
                        "above every baseline in necessity")


# ---------------------------------------------------------------------- faithfulness
def faithfulness(
    model: Any,
    circuits_or_graph: Any,
    data: Any,
    levels: Sequence[float] = LEVELS,
    *,
    value: str = "mean",
    metric: str = "prob",
    select: str = "layer",
    attr: str = "weight",
    n_random: int = 8,
    baselines: Sequence[str] = BASELINES,
    other: bool = True,
    n_boot: int = 500,
    z_min: float = 2.0,
    seed: int = 0,
    device: Any = None,
    batch_size: int = 256,
) -> FaithfulnessResult:
    """Necessity and sufficiency curves of circuits against baselines of the same size.

    Parameters
    ----------
    model : nn.Module
        The fx-traceable classifier the graphs were extracted from; left as found.
    circuits_or_graph : Connectome or mapping of str -> Connectome
        Attribution graphs per category (``attribution_by_category``): each is cut into
        circuits at every level with ``circuit(g, mass=level, select=select, attr=attr)``.
        A graph that already is a circuit (``meta["circuit"]``) is measured at its own size
        only. Each graph's target is its default circuit target (its category's class unit).
    data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        Probe images, with labels: each category is scored on its own images; the ablation
        values (mean, resampled) and the other baselines come from all of them. Without
        labels every category is scored on all images.
    levels : sequence of float, default :data:`LEVELS`
        Flow mass levels (0 < level <= 1), increasing.
    value : {"mean", "zero", "resample"}, default "mean"
        What an ablated unit passes on: its mean over all the data (per position), zero, or
        its value on another image of the data (one random partner per image, never itself).
    metric : {"prob", "logit"}, default "prob"
        Mean target probability or logit.
    select : {"layer", "global"}, default "layer"
        The circuit selector (see :func:`~connectome.analysis.circuit`).
    attr : str, default "weight"
        Edge column holding the flow.
    n_random : int, default 8
        Random unit sets per level (seeded, nested across levels); at least 2.
    baselines : sequence of str, default ("activation", "weight", "gradxact")
        Ranked baselines to include.
    other : bool, default True
        Include the other categories' circuits (units ranked by their share of the flow into
        that category's class, same size per layer) as baselines.
    n_boot : int, default 500
        Bootstrap samples over images for the confidence intervals (0: none, NaN intervals).
    z_min : float, default 2.0
        Standard deviations above random a circuit needs for its verdict.
    seed : int, default 0
        Seed of the random sets, resampling partners and bootstrap.
    device : optional
        ``None``: CUDA when available, else CPU.
    batch_size : int, default 256
        Rows of (pattern, image) per forward pass.

    Returns
    -------
    FaithfulnessResult

    Raises
    ------
    ConnectomeError
        Graphs of another model, a graph without a class target, or a bad argument.
    DataError
        No images, or a category without images.

    Examples
    --------
    >>> graphs = attribution_by_category(model, data, "label")          # doctest: +SKIP
    >>> f = faithfulness(model, graphs, data)                            # doctest: +SKIP
    >>> f.verdicts()["circle"], f["circle"].z_necessity                 # doctest: +SKIP
    ('faithful', 5.1)
    """
    from connectome.analysis.ablation import check_value, reference_pass
    from connectome.extract.probe import load_probe, traced

    check_value(value)
    if metric not in ("prob", "logit"):
        raise ValueError(f"metric must be 'prob' or 'logit', got {metric!r}")
    if select not in SELECTORS:
        raise ValueError(f"select must be one of {SELECTORS}, got {select!r}")
    if isinstance(n_random, bool) or int(n_random) != n_random or n_random < 2:
        raise ValueError(f"n_random must be an integer >= 2 (the spread of random sets needs two), got {n_random!r}")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose among {BASELINES}")
    lv = np.asarray(list(levels), dtype=np.float64)
    if lv.ndim != 1 or lv.size == 0 or not np.all((lv > 0) & (lv <= 1)) or np.any(np.diff(lv) <= 0):
        raise ValueError(f"levels must be increasing flow masses in (0, 1], got {list(levels)!r}")
    graphs = _graphs(circuits_or_graph)
    x_all, y_all, _ = load_probe(data, batch_size)
    n_random, n_boot = int(n_random), int(n_boot)
    skipped: list[str] = []
    wg = None
    if "weight" in baselines:
        from connectome.extract import weights

        try:
            wg = weights(model, tuple(x_all.shape[1:]))
        except ConnectomeError as e:
            skipped.append(f"weight ({str(e).splitlines()[0]})")
    results: dict[str, CategoryFaithfulness] = {}
    with traced(model, x_all, device) as t:
        hidden = [li for li, l in enumerate(t.layers) if l.kind not in _io_kinds()]
        fill, mags = reference_pass(t, x_all, hidden, value, batch_size, abs_mean="activation" in baselines)
        targets, shares = {}, {}
        for c, g in graphs.items():
            ti = target_node(g, None)
            targets[c] = int(g.node_units[ti])
            if not 0 <= targets[c] < t.n_classes:
                raise ConnectomeError(f"graph {c!r} targets class {targets[c]}, but the model has {t.n_classes} classes")
            shares[c] = _layer_scores(t, g, flow_share(g, g.node_ids[ti], attr))
        for k, (c, g) in enumerate(graphs.items()):
            results[c] = _category(
                t, c, g, graphs, targets, shares, x_all, y_all, lv, fill, mags, wg, value, metric, select, attr,
                n_random, baselines, other, n_boot, z_min, seed + 1000 * k, batch_size)
    return FaithfulnessResult(value=value, metric=metric, select=select, z_min=float(z_min), n_random=n_random,
                              n_boot=n_boot, categories=results, skipped=tuple(skipped))


def _category(t: Traced, c: str, g: Connectome, graphs: Mapping[str, Connectome], targets: Mapping[str, int],
              shares: Mapping[str, dict[int, np.ndarray]], x_all: torch.Tensor, y_all: torch.Tensor | None,
              lv: np.ndarray, fill: Any, mags: Mapping[int, np.ndarray], wg: Connectome | None, value: str,
              metric: str, select: str, attr: str, n_random: int, baselines: Sequence[str], other: bool, n_boot: int,
              z_min: float, seed: int, batch_size: int) -> CategoryFaithfulness:
    import torch

    from connectome.analysis.ablation import _run_patterns, partners

    tc = targets[c]
    idx = np.arange(x_all.shape[0]) if y_all is None else np.flatnonzero(y_all.numpy() == tc)
    if idx.size == 0:
        raise DataError(f"no image labelled {tc} (category {c!r}) in the data; pass images of every category")
    x = x_all[idx].to(t.device, dtype=t.dtype)
    rng = np.random.default_rng(seed)
    # circuits per level
    if _is_circuit(g):
        m = g.meta["circuit"].get("mass")
        levels = np.array([float(m) if m is not None else 1.0])
        sels = [_sets(t, g)]
    else:
        levels = lv
        sels = [_sets(t, circuit(g, mass=float(m), select=select, attr=attr)) for m in levels]
    # rankings of the baselines, per traced layer
    ranks: dict[str, dict[int, np.ndarray]] = {}
    if "activation" in baselines:
        ranks["activation"] = {li: v[idx].mean(0) for li, v in mags.items()}
    if "weight" in baselines and wg is not None:
        wi = target_node(wg, tc)
        ranks["weight"] = _layer_scores(t, wg, flow_share(wg, wg.node_ids[wi], "weight"))
    if "gradxact" in baselines:
        layers = sorted({li for s in sels for li in s})
        if layers:
            mean_fill = fill if value == "mean" else None
            if value == "resample":  # the expected resampled value is the mean
                mean_fill = {li: v.mean(0, keepdim=True) for li, v in fill.items()}
            ranks["gradxact"] = _grad_scores(t, x, tc, layers, mean_fill, batch_size)
    if other:
        for o in graphs:
            if o != c and targets[o] != tc:
                ranks[f"other:{o}"] = shares[o]
    names = ["circuit", *[f"random:{i}" for i in range(n_random)], *ranks]
    perms = {li: np.stack([rng.permutation(t.ug.layers[li].size) for _ in range(n_random)])
             for li in {li for s in sels for li in s}}
    K, S = len(levels), len(names)
    P = 1 + K * (1 + 2 * S)
    masks = {li: np.ones((P, t.ug.layers[li].size), dtype=np.float32) for li in perms}
    for k, sel in enumerate(sels):
        base = 1 + k * (1 + 2 * S)
        for li, us in sel.items():
            M = masks[li]
            M[base] = 0.0
            for j, name in enumerate(names):
                if name == "circuit":
                    units = us
                elif name.startswith("random:"):
                    units = perms[li][int(name.split(":")[1]), : us.size]
                else:
                    units = _top(ranks[name].get(li), us.size, M.shape[1])
                nec, suf = base + 1 + 2 * j, base + 2 + 2 * j
                M[nec, units] = 0.0
                M[suf] = 0.0
                M[suf, units] = 1.0
    rows = None
    if value == "resample":
        rows = torch.from_numpy(partners(idx, idx.size, x_all.shape[0], seed))
    logits = _run_patterns(t, x, {li: torch.from_numpy(m) for li, m in masks.items()}, P, batch_size, fill, rows)
    L = logits.double()
    if metric == "prob":
        L = torch.softmax(L, dim=-1)
    per_image = L[..., tc].cpu().numpy()  # (P, n)
    # bootstrap weights over images; row 0 is the sample itself
    n = idx.size
    W = np.full((1, n), 1.0 / n)
    if n_boot:
        W = np.vstack([W, rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n])
    means = W @ per_image.T  # (B, P)
    intact = means[:, :1]
    pat = means[:, 1:].reshape(-1, K, 1 + 2 * S)
    # the floor the signal is measured from: probability 0, or the logit with every unit of
    # the touched layers ablated (the probability floor is fixed: with mean ablation the
    # emptied model predicts one class for every image, and a floor near the intact value
    # would blow the ratios up for that class)
    empty = pat[:, :, 0] if metric == "logit" else np.zeros_like(pat[:, :, 0])
    denom = intact - empty  # (B, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.where(np.abs(denom) > 1e-12, denom, np.nan)
        nec = (intact[:, :, None] - pat[:, :, 1::2]) / denom[:, :, None]  # (B, K, S)
        suf = (pat[:, :, 2::2] - empty[:, :, None]) / denom[:, :, None]
        emptied = pat[0, :, 0] / intact[0, 0] if metric == "prob" else np.full(K, np.nan)
    nec, suf = nec.transpose(0, 2, 1), suf.transpose(0, 2, 1)  # (B, S, K)
    auc_n, auc_s = _auc(levels, nec), _auc(levels, suf)  # (B, S)
    rnd = slice(1, 1 + n_random)
    groups: dict[str, Any] = {"circuit": [0], "random": list(range(1, 1 + n_random))}
    for j, name in enumerate(names):
        if j > n_random:
            groups[name] = [j]
    others = [j for j, name in enumerate(names) if name.startswith("other:")]
    if others:
        groups["other"] = others
    order = ["circuit", "random", *[b for b in BASELINES if b in ranks], *(["other"] if others else []),
             *[nm for nm in names if nm.startswith("other:")]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        curve_n = {nm: nec[0, groups[nm]].mean(0) for nm in order}
        curve_s = {nm: suf[0, groups[nm]].mean(0) for nm in order}
        a_n = {nm: auc_n[:, groups[nm]].mean(1) for nm in order}  # (B,)
        a_s = {nm: auc_s[:, groups[nm]].mean(1) for nm in order}
        z_n = _z(float(auc_n[0, 0]), auc_n[0, rnd])
        z_s = _z(float(auc_s[0, 0]), auc_s[0, rnd])

        def ci(v: np.ndarray) -> tuple[float, float]:
            if v.size < 2 or not np.all(np.isfinite(v[1:])):
                return (math.nan, math.nan)
            lo, hi = np.percentile(v[1:], _CI)
            return (float(lo), float(hi))

        diff_ci = {nm: ci(a_n["circuit"] - a_n[nm]) for nm in ("random", *BASELINES, "other") if nm in a_n}
    beats = {"random": bool(z_n > z_min)}
    for nm, (lo, _) in diff_ci.items():
        if nm != "random":
            beats[nm] = bool(math.isfinite(lo) and lo > 0) if n_boot else bool(a_n["circuit"][0] > a_n[nm][0])
    spec = float(np.mean(auc_n[0, others] < auc_n[0, 0])) if others else math.nan
    verdict, reason = _verdict(z_n, z_s, beats, z_min)
    return CategoryFaithfulness(
        category=c, target=tc, n_images=int(n), levels=levels.copy(),
        n_units=np.array([sum(int(u.size) for u in s.values()) for s in sels], dtype=np.int64),
        necessity=curve_n, sufficiency=curve_s,
        random_necessity=nec[0, rnd].copy(), random_sufficiency=suf[0, rnd].copy(),
        auc_necessity={nm: float(v[0]) for nm, v in a_n.items()},
        auc_sufficiency={nm: float(v[0]) for nm, v in a_s.items()},
        z_necessity=float(z_n), z_sufficiency=float(z_s),
        ci_necessity=ci(a_n["circuit"]), ci_sufficiency=ci(a_s["circuit"]),
        diff_ci=diff_ci, beats=beats, specificity=spec, verdict=verdict, reason=reason,
        emptied=emptied,
    )
