"""Ablation: silence units of a model and measure what the target class loses.

A unit is silenced by zeroing the value it *passes on* (after its BatchNorm and
nonlinearity: the ``out_node`` of its layer in the traced graph), so that every later
layer, and every skip connection, sees zero from it. The traced graph runs with a
per-image, per-unit mask multiplied into those values, so residual adds and concatenations
(which have no module to hook) can be silenced too, and nothing is ever attached to the
caller's model.

:func:`fidelity` asks whether a circuit found in a connectome is what the model actually
uses: ablating it should hurt the target much more than ablating random units of the same
layers, ablating everything *but* the circuit should hurt little, and removing circuit
units in order of attribution should make the target fall fast (deletion curve) while
restoring them should make it rise fast (insertion curve).

References
----------
Morcos, A. S. et al. (2018). On the importance of single directions for generalization. ICLR.
Petsiuk, V., Das, A. & Saenko, K. (2018). RISE: Randomized Input Sampling for Explanation of
Black-box Models. BMVC (deletion and insertion curves).
Olah, C. et al. (2020). Zoom In: An Introduction to Circuits. Distill.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from connectome.errors import ConnectomeError, EmptyGraphError, short_list
from connectome.extract.probe import IO_KINDS, Traced, load_probe, mask_units, traced
from connectome.extract.targets import Target, check_labels, resolve_target
from connectome.extract.trace import run_nodes
from connectome.graph import Connectome

__all__ = ["ablate", "fidelity", "AblationResult", "FidelityResult"]

# ---------------------------------------------------------------------- running patterns
def _run_patterns(
    t: Traced,
    x: torch.Tensor,
    keep: Mapping[int, torch.Tensor],
    n_patterns: int,
    batch_size: int,
    fill: Mapping[int, torch.Tensor] | None = None,
    fill_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of every image under every mask pattern: shape (n_patterns, n_images, n_classes).

    ``keep[layer]`` has shape (n_patterns, units): 1 keeps a unit's passed-on value, 0
    silences it. Rows of the (pattern, image) product run ``batch_size`` at a time, several
    patterns per forward when the probe set is small.

    ``fill[layer]`` (optional) is what a silenced unit passes on instead of zero: one value of
    the layer for every image (shape ``(1, ...)``, e.g. the mean over the data) or, with
    ``fill_rows`` (image -> row), a row per image (e.g. another image's values).
    A kept entry ``m`` passes ``m * value + (1 - m) * fill``.
    """
    ug = t.ug
    n = x.shape[0]
    rows = n_patterns * n
    masks = {ug.layers[li].out_node: m.to(t.device, dtype=t.dtype) for li, m in keep.items()}
    fills = {} if fill is None else {ug.layers[li].out_node: f for li, f in fill.items()}
    rows_of = None if fill_rows is None else fill_rows.to(t.device)
    out_name = ug.output_node
    chunks: list[torch.Tensor] = []
    step = max(1, int(batch_size))
    for start in range(0, rows, step):
        r = torch.arange(start, min(rows, start + step), device=t.device)
        pat, img = r // n, r % n
        cur = {k: m[pat] for k, m in masks.items()}

        def on_value(node: Any, v: Any, cur: dict[str, torch.Tensor] = cur, img: torch.Tensor = img) -> Any:
            m = cur.get(node.name)
            if m is None or not isinstance(v, torch.Tensor):
                return v
            d = ug.one_unit_dim(node.name, "ablation")
            f = fills.get(node.name)
            if f is None:
                return mask_units(v, m, unit_dim=d)
            f = f[rows_of[img]] if rows_of is not None else f.expand_as(v)
            return mask_units(v, m, unit_dim=d) + mask_units(f, 1.0 - m, unit_dim=d)

        _, kept = run_nodes(ug.gm, (x[img],), keep={out_name}, on_value=on_value)
        chunks.append(kept[out_name].reshape(r.shape[0], -1))
    logits = torch.cat(chunks)
    return logits.reshape(n_patterns, n, -1)


ABLATION_VALUES = ("zero", "mean", "resample")


def check_value(value: Any) -> str:
    """``value`` if it names an ablation value, else a ValueError listing them."""
    if value not in ABLATION_VALUES:
        raise ValueError(f"value must be one of {ABLATION_VALUES} (what a silenced unit passes on), got {value!r}")
    return str(value)


def unit_abs_mean(v: torch.Tensor, units: int, unit_dim: int) -> torch.Tensor:
    """Per image and unit, the mean ``|value|`` over the unit's features: shape (N, units)."""
    d = unit_dim % v.dim()
    shape = tuple(v.shape)
    blocks = v.reshape(shape[:d] + (units, shape[d] // units) + shape[d + 1 :]).abs()
    dims = [i for i in range(blocks.dim()) if i not in (0, d)]
    return blocks.mean(dim=dims) if dims else blocks


def reference_pass(
    t: Traced, x_ref: torch.Tensor, layers: Sequence[int], value: str, batch_size: int, abs_mean: bool = False
) -> tuple[dict[int, torch.Tensor] | None, dict[int, np.ndarray]]:
    """The intact model run on the reference images once.

    Returns the values a silenced unit passes on (``None`` for zero ablation): for
    ``"mean"`` each layer's mean over the reference images (shape ``(1, ...)``: per unit and
    position), for ``"resample"`` every reference image's value (``(n_ref, ...)``). With
    ``abs_mean``, also per reference image and unit the mean ``|value|`` (numpy, (n_ref, units)).
    """
    ug = t.ug
    nodes = {ug.layers[li].out_node: li for li in layers}
    sums: dict[int, torch.Tensor] = {}
    kept_all: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    mags: dict[int, list[np.ndarray]] = {li: [] for li in layers}
    n = x_ref.shape[0]
    step = max(1, int(batch_size))
    if value == "zero" and not abs_mean:
        return None, {}
    for start in range(0, n, step):
        xb = x_ref[start : start + step].to(t.device, dtype=t.dtype)
        _, kept = run_nodes(ug.gm, (xb,), keep=set(nodes))
        for name, li in nodes.items():
            v = kept[name]
            if value == "mean":
                b = v.double().sum(0, keepdim=True)
                sums[li] = b if li not in sums else sums[li] + b
            elif value == "resample":
                kept_all[li].append(v)
            if abs_mean:
                mags[li].append(unit_abs_mean(v, ug.layers[li].size, ug.one_unit_dim(name, "ablation")).double().cpu().numpy())
    mag = {li: np.concatenate(m) for li, m in mags.items()} if abs_mean else {}
    if value == "mean":
        return {li: (sm / n).to(t.dtype) for li, sm in sums.items()}, mag
    if value == "resample":
        return {li: torch.cat(v) for li, v in kept_all.items()}, mag
    return None, mag


def partners(own: np.ndarray | None, n_run: int, n_ref: int, seed: int) -> np.ndarray:
    """For each of ``n_run`` images, a random reference row to take resampled values from.

    ``own[i]`` is image ``i``'s own row among the reference images (never drawn), or None
    when the images are not among them.
    """
    rng = np.random.default_rng(seed)
    if own is None:
        return rng.integers(0, n_ref, size=n_run)
    if n_ref < 2:
        raise ConnectomeError("resample ablation needs at least two reference images (each image takes another's "
                              "values); pass more images or value='mean'")
    j = rng.integers(0, n_ref - 1, size=n_run)
    own = np.asarray(own, dtype=np.int64)
    return j + (j >= own)


def _target(target: Any, y: torch.Tensor | None, t: Traced, classes: Sequence[str] | None, caller: str) -> Target:
    """The resolved target, with labels checked now when it reads them (before any pattern runs)."""
    spec = resolve_target(target, t.n_classes, classes, allow_callable=False, caller=caller)
    if spec.kind == "label":
        check_labels(y, t.n_classes)
    return spec


def _scores(logits: torch.Tensor, target: Target, y: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Per pattern: mean target logit, mean target probability, accuracy (NaN without labels).

    Pattern 0 is the intact model: ``"predicted"`` is each image's class there.
    """
    L = logits.double()
    p, n, _ = L.shape
    tgt = target.classes(L[0], y)
    idx = tgt.to(L.device)[None, :, None].expand(p, n, 1)
    logit = L.gather(2, idx)[..., 0].mean(1)
    prob = torch.softmax(L, dim=-1).gather(2, idx)[..., 0].mean(1)
    if y is not None:
        acc = (L.argmax(-1) == y.to(L.device)[None]).double().mean(1).cpu().numpy()
    else:
        acc = np.full(p, np.nan)
    return {"logit": logit.cpu().numpy(), "prob": prob.cpu().numpy(), "acc": acc}


def _parse_id(s: str) -> tuple[str, int] | None:
    name, sep, unit = str(s).rpartition(":")
    if not sep or not name:
        return None
    try:
        return name, int(unit)
    except ValueError:
        return None


def _resolve_units(t: Traced, units: Any) -> dict[int, np.ndarray]:
    """Units to silence as ``traced layer index -> sorted unique unit indices``.

    ``units`` is a node id, a sequence of node ids, a mapping ``layer -> unit indices``, or a
    Connectome (its nodes outside input and output layers).
    """
    valid = t.hidden_names()
    pairs: list[tuple[str, int, str]] = []  # (layer name, unit, as given)
    if isinstance(units, Connectome):
        for l in units.layers:
            li = t.index(l.name)
            if l.kind in IO_KINDS or (li is not None and t.layers[li].kind in IO_KINDS):
                continue
            for u in units.node_units[units.layer_slice(l.name)].tolist():
                pairs.append((l.name, int(u), f"{l.name}:{u}"))
    elif isinstance(units, Mapping):
        for name, us in units.items():
            for u in np.atleast_1d(np.asarray(us)).tolist():
                pairs.append((str(name), int(u), f"{name}:{u}"))
    else:
        if isinstance(units, str):
            units = [units]
        for s in np.atleast_1d(np.asarray(list(units) if not isinstance(units, np.ndarray) else units,
                                          dtype=object)).tolist():
            parsed = _parse_id(str(s))
            if parsed is None:
                raise ConnectomeError(
                    f"{s!r} is not a node id; units are '<layer>:<unit>' such as "
                    f"{(valid[0] if valid else 'layer') + ':0'!r}, in layers {short_list(valid)}"
                )
            pairs.append((parsed[0], parsed[1], str(s)))
    unknown, io = [], []
    by_layer: dict[int, list[int]] = {}
    for name, u, given in pairs:
        li = t.index(name)
        if li is None or not 0 <= u < t.ug.layers[li].size:
            unknown.append(given)
            continue
        if t.layers[li].kind in IO_KINDS:
            io.append(given)
            continue
        by_layer.setdefault(li, []).append(u)
    if unknown:
        raise ConnectomeError(
            f"no unit(s) {short_list(unknown)} in the model; valid layers (with their unit counts) are "
            f"{short_list([f'{n} ({t.ug.layers[t.index(n)].size})' for n in valid])}"
        )
    if io:
        raise ConnectomeError(
            f"cannot ablate {short_list(io)}: units of the input and output layers are never ablated "
            f"(that would remove the image or the target itself); pass hidden units of {short_list(valid)}"
        )
    if not by_layer:
        raise EmptyGraphError("no hidden units to ablate; pass node ids of hidden layers or a circuit with hidden units")
    return {li: np.unique(np.asarray(us, dtype=np.int64)) for li, us in sorted(by_layer.items())}


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


# ---------------------------------------------------------------------- ablate
@dataclass(frozen=True)
class AblationResult:
    """What silencing a set of units does to the target class.

    Attributes
    ----------
    units : tuple of str
        The silenced units (node ids), in layer order.
    target : str or int
        As passed: ``"label"``, ``"predicted"``, a class name or digit string, or a class
        index.
    n_images : int
    logit_before, logit_after, logit_drop : float
        Mean target logit of the intact and the ablated model; ``drop = before - after``.
    prob_before, prob_after, prob_drop : float
        Mean softmax probability of the target class; ``drop = before - after``.
    acc_before, acc_after : float
        Accuracy against the labels (NaN when the data has no labels).
    """

    units: tuple[str, ...]
    target: Any
    n_images: int
    logit_before: float
    logit_after: float
    logit_drop: float
    prob_before: float
    prob_after: float
    prob_drop: float
    acc_before: float
    acc_after: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["units"] = list(self.units)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def __repr__(self) -> str:
        shown = ", ".join(self.units[:4]) + (f", ... ({len(self.units)} units)" if len(self.units) > 4 else "")
        return (
            f"AblationResult({len(self.units)} units silenced [{shown}], target={self.target!r}, "
            f"{self.n_images} images)\n"
            f"  target logit  {_fmt(self.logit_before):>9} -> {_fmt(self.logit_after):>9}  (drop {_fmt(self.logit_drop)})\n"
            f"  target prob   {_fmt(self.prob_before):>9} -> {_fmt(self.prob_after):>9}  (drop {_fmt(self.prob_drop)})\n"
            f"  accuracy      {_fmt(self.acc_before):>9} -> {_fmt(self.acc_after):>9}"
        )


def _ids(t: Traced, sel: Mapping[int, np.ndarray]) -> tuple[str, ...]:
    return tuple(f"{t.layers[li].name}:{u}" for li, us in sel.items() for u in us.tolist())


def ablate(
    model: nn.Module,
    units: Any,
    data: Any,
    target: Any = "label",
    device: Any = None,
    batch_size: int = 64,
    value: str = "zero",
    reference: Any = None,
    seed: int = 0,
) -> AblationResult:
    """Silence units and measure the change in the target.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable classifier. Runs in eval mode under ``torch.inference_mode``; its
        ``training`` flags are restored and nothing stays attached to it.
    units : str, sequence of str, mapping or Connectome
        Node ids (``"layer1.0.conv1:5"``), a mapping ``layer name -> unit indices``, or a
        Connectome (a circuit) whose nodes outside the input and output layers are silenced.
    data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        The probe images (held in memory at once).
    target : "label", "predicted", int or str, default "label"
        Each image's own label, the class the intact model predicts for each image, or one
        class (an index, a digit string such as ``"281"``, or a name when the data has
        classes): the same forms as :func:`~connectome.extract.attribution`, but for a
        callable, which gives no class to score.
    device : optional
        ``None``: CUDA when available, else CPU (a copy of the model runs there).
    batch_size : int, default 64
        Images per forward pass.
    value : {"zero", "mean", "resample"}, default "zero"
        What a silenced unit passes on: zero; its mean over the reference images (per unit
        and position); or its value on another reference image, drawn per image with
        ``seed`` (never the image itself when the reference is ``data``).
    reference : optional
        Images (any form ``data`` takes) for ``"mean"`` and ``"resample"``; default ``data``.
    seed : int, default 0
        Seed of the resampling.

    Returns
    -------
    AblationResult
        Mean target logit and probability, and accuracy, before and after.

    Raises
    ------
    ConnectomeError
        Units not in the model (the message names them and lists the valid layers), units of
        the input or output layer, or no units at all (:class:`EmptyGraphError`).
    DataError
        No images, ``target="label"`` without labels, a target class out of range, an
        unknown class name, a callable or another type of target (the same messages as
        :func:`~connectome.extract.attribution`).

    Examples
    --------
    >>> r = ablate(model, ["fc1:0", "fc1:1"], (images, labels))       # doctest: +SKIP
    >>> r.prob_drop                                                    # doctest: +SKIP
    0.42

    References
    ----------
    Morcos, A. S. et al. (2018). On the importance of single directions for generalization. ICLR.
    """
    check_value(value)
    x_cpu, y, classes = load_probe(data, batch_size)
    x_ref = x_cpu if reference is None else load_probe(reference, batch_size)[0]
    with traced(model, x_cpu, device) as t:
        sel = _resolve_units(t, units)
        tgt = _target(target, y, t, classes, "ablate")
        keep = {}
        for li, us in sel.items():
            m = torch.ones(2, t.ug.layers[li].size)
            m[1, torch.as_tensor(us)] = 0.0
            keep[li] = m
        fill, _ = reference_pass(t, x_ref, list(sel), value, batch_size)
        rows = None
        if value == "resample":
            own = np.arange(x_cpu.shape[0]) if reference is None else None
            rows = torch.from_numpy(partners(own, x_cpu.shape[0], x_ref.shape[0], seed))
        x = x_cpu.to(t.device, dtype=t.dtype)
        s = _scores(_run_patterns(t, x, keep, 2, batch_size, fill, rows), tgt, y)
        ids = _ids(t, sel)
    return AblationResult(
        units=ids,
        target=target if isinstance(target, str) else int(target),
        n_images=int(x_cpu.shape[0]),
        logit_before=float(s["logit"][0]),
        logit_after=float(s["logit"][1]),
        logit_drop=float(s["logit"][0] - s["logit"][1]),
        prob_before=float(s["prob"][0]),
        prob_after=float(s["prob"][1]),
        prob_drop=float(s["prob"][0] - s["prob"][1]),
        acc_before=float(s["acc"][0]),
        acc_after=float(s["acc"][1]),
    )


# ---------------------------------------------------------------------- fidelity
@dataclass(frozen=True, eq=False)
class FidelityResult:
    """Does the model use the circuit? Ablating it vs random units vs everything else.

    All drops are ``intact - ablated`` of the mean target probability (``*_logit_*``: of the
    mean target logit), so a positive drop means the ablation hurt the target.

    Attributes
    ----------
    target : str or int
    n_images : int
    sizes : dict of str -> int
        Circuit units per hidden layer (the layers the circuit touches).
    prob_before, logit_before : float
        Intact model.
    circuit_drop, circuit_logit_drop : float
        Silencing the circuit's hidden units.
    random_mean, random_std, random_logit_mean, random_logit_std : float
        Silencing random unit sets of the same size per layer (``n_random`` draws; NaN
        when ``n_random=0``).
    random_drops : ndarray, shape (n_random,)
        Probability drop of each random draw.
    complement_drop, complement_logit_drop : float
        Silencing every unit of the circuit's layers except the circuit's.
    z : float
        ``(circuit_drop - random_mean) / random_std``: large and positive when the circuit
        matters more than random units (``+-inf`` when the random drops do not vary).
    p_value : float
        ``(1 + #{random >= circuit}) / (1 + n_random)``.
    acc_before, acc_circuit, acc_complement : float
        Accuracy against the labels (NaN without labels).
    curve_x : ndarray, shape (steps + 1,) or None
        Fraction of circuit units removed (deletion) or restored (insertion), 0 to 1.
    deletion_curve, insertion_curve : ndarray, shape (steps + 1,) or None
        Mean target probability along the curves.
    deletion_auc, insertion_auc : float
        Areas under the curves over ``x`` in [0, 1] (in [0, 1]; NaN without curves). A
        faithful circuit has a small deletion AUC and a large insertion AUC.
    """

    target: Any
    n_images: int
    sizes: dict[str, int]
    prob_before: float
    logit_before: float
    circuit_drop: float
    circuit_logit_drop: float
    random_mean: float
    random_std: float
    random_logit_mean: float
    random_logit_std: float
    random_drops: np.ndarray
    complement_drop: float
    complement_logit_drop: float
    z: float
    p_value: float
    acc_before: float
    acc_circuit: float
    acc_complement: float
    curve_x: np.ndarray | None = None
    deletion_curve: np.ndarray | None = None
    insertion_curve: np.ndarray | None = None
    deletion_auc: float = float("nan")
    insertion_auc: float = float("nan")

    @property
    def n_units(self) -> int:
        return int(sum(self.sizes.values()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None, infinities as strings)."""
        def conv(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return [conv(float(a)) for a in v.tolist()]
            if isinstance(v, float):
                if math.isnan(v):
                    return None
                if math.isinf(v):
                    return "inf" if v > 0 else "-inf"
            if isinstance(v, dict):
                return {k: conv(a) for k, a in v.items()}
            return v

        d = {k: conv(getattr(self, k)) for k in self.__dataclass_fields__}
        d["n_units"] = self.n_units
        return d

    def __repr__(self) -> str:
        lines = [
            f"FidelityResult({self.n_units} circuit units in {len(self.sizes)} layers, target={self.target!r}, "
            f"{self.n_images} images)",
            f"  target prob intact     {_fmt(self.prob_before)}",
            f"  drop: circuit          {_fmt(self.circuit_drop)}   (logit {_fmt(self.circuit_logit_drop)})",
            f"        random (n={self.random_drops.size:<3})   {_fmt(self.random_mean)} +- {_fmt(self.random_std)}"
            f"   (logit {_fmt(self.random_logit_mean)} +- {_fmt(self.random_logit_std)})",
            f"        complement       {_fmt(self.complement_drop)}   (logit {_fmt(self.complement_logit_drop)})",
            f"  z = {_fmt(self.z)}, p = {_fmt(self.p_value)}",
        ]
        if self.curve_x is not None:
            lines.append(f"  deletion AUC {_fmt(self.deletion_auc)} (low is faithful), "
                         f"insertion AUC {_fmt(self.insertion_auc)} (high is faithful)")
        return "\n".join(lines)


def _unit_order(t: Traced, circuit: Any, sel: Mapping[int, np.ndarray]) -> list[tuple[int, int]]:
    """Circuit units, most important first: by |attribution| (node attribute of the circuit),
    else by degree in the circuit; ties (and plain node-id lists) keep layer-then-unit order."""
    units = [(li, int(u)) for li, us in sel.items() for u in us.tolist()]
    if not isinstance(circuit, Connectome):
        return units
    where: dict[tuple[int, int], int] = {}
    for l in circuit.layers:
        li = t.index(l.name)
        if li in sel:
            sl = circuit.layer_slice(l.name)
            for k, u in enumerate(circuit.node_units[sl].tolist()):
                where[(li, int(u))] = sl.start + k
    idx = np.array([where[key] for key in units], dtype=np.int64)
    if "attribution" in circuit.node_attrs:
        score = np.abs(np.asarray(circuit.node_attrs["attribution"], dtype=np.float64))[idx]
        score = np.where(np.isfinite(score), score, 0.0)
    else:
        deg = np.bincount(circuit.src, minlength=circuit.num_nodes) + np.bincount(circuit.dst, minlength=circuit.num_nodes)
        score = deg[idx].astype(np.float64)
    order = np.argsort(-score, kind="stable")
    return [units[i] for i in order]


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def fidelity(
    model: nn.Module,
    circuit: Any,
    data: Any,
    n_random: int = 20,
    seed: int = 0,
    target: Any = "label",
    curves: bool = True,
    steps: int = 10,
    *,
    device: Any = None,
    batch_size: int = 64,
) -> FidelityResult:
    """Test a circuit by ablation: circuit vs same-size random sets vs its complement.

    Every ablation pattern (intact, circuit, ``n_random`` random draws, complement, and the
    ``2 * (steps + 1)`` points of the curves) is a per-unit mask; the probe images are held
    in memory and all patterns run through the traced model in batches of ``batch_size``
    rows of (pattern, image).

    Parameters
    ----------
    model : nn.Module
        An fx-traceable classifier; left as found (see :func:`ablate`).
    circuit : Connectome, sequence of str or mapping
        The circuit (e.g. :func:`connectome.analysis.circuit`); its nodes outside the input
        and output layers are the units tested. Node ids must be the model's.
    data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        Probe images (held in memory).
    n_random : int, default 20
        Random unit sets drawn: per layer, as many units as the circuit has there, uniformly
        among all units of that layer (circuit units included).
    seed : int, default 0
        Seed of the random draws.
    target : "label", "predicted", int or str, default "label"
        As in :func:`ablate`.
    curves : bool, default True
        Compute deletion and insertion curves.
    steps : int, default 10
        The curves have ``steps + 1`` points, at ``x = 0, 1/steps, ..., 1``. Deletion removes
        the first ``round(x * n)`` circuit units (most important first: by |attribution|, else
        by degree in the circuit) from the intact model; insertion starts with every unit of
        the circuit's layers silenced and restores them in the same order, ending at the
        complement ablation.
    device : optional
        ``None``: CUDA when available, else CPU.
    batch_size : int, default 64
        Rows of (pattern, image) per forward pass.

    Returns
    -------
    FidelityResult

    Raises
    ------
    ConnectomeError
        Circuit units not in the model, or no hidden units (:class:`EmptyGraphError`).
    DataError
        No images, or a target :func:`ablate` refuses.

    Examples
    --------
    >>> c = connectome.analysis.circuit(g, mass=0.8)                   # doctest: +SKIP
    >>> f = fidelity(model, c, (images, labels), target=3)              # doctest: +SKIP
    >>> f.z > 3 and f.deletion_auc < f.insertion_auc                   # doctest: +SKIP
    True

    References
    ----------
    Petsiuk, V., Das, A. & Saenko, K. (2018). RISE: Randomized Input Sampling for Explanation
    of Black-box Models. BMVC.
    Olah, C. et al. (2020). Zoom In: An Introduction to Circuits. Distill.
    """
    if isinstance(n_random, bool) or int(n_random) != n_random or n_random < 0:
        raise ValueError(f"n_random must be a non-negative integer, got {n_random!r}")
    if curves and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    n_random, steps = int(n_random), int(steps)
    x_cpu, y, classes = load_probe(data, batch_size)
    with traced(model, x_cpu, device) as t:
        sel = _resolve_units(t, circuit)
        tgt = _target(target, y, t, classes, "fidelity")
        sizes = {li: t.ug.layers[li].size for li in sel}
        rng = np.random.default_rng(seed)
        n_curve = steps + 1 if curves else 0
        P = 3 + n_random + 2 * n_curve
        masks = {li: np.ones((P, s), dtype=np.float32) for li, s in sizes.items()}
        i_circ, i_rand, i_comp = 1, 2, 2 + n_random
        i_del, i_ins = 3 + n_random, 3 + n_random + n_curve
        for li, us in sel.items():
            M = masks[li]
            M[i_circ, us] = 0.0
            if n_random:
                draws = np.argsort(rng.random((n_random, sizes[li])), axis=1)[:, : us.size]
                np.put_along_axis(M[i_rand:i_comp], draws, 0.0, axis=1)
            M[i_comp] = 0.0
            M[i_comp, us] = 1.0
        xs = np.linspace(0.0, 1.0, steps + 1) if curves else None
        if curves:
            order = _unit_order(t, circuit, sel)
            n_c = len(order)
            for k, frac in enumerate(xs):
                for li in sizes:
                    masks[li][i_ins + k] = 0.0
                for li, u in order[: int(round(frac * n_c))]:
                    masks[li][i_del + k, u] = 0.0
                    masks[li][i_ins + k, u] = 1.0
        x = x_cpu.to(t.device, dtype=t.dtype)
        s = _scores(_run_patterns(t, x, {li: torch.from_numpy(m) for li, m in masks.items()}, P, batch_size), tgt, y)
        names = {li: t.layers[li].name for li in sel}
    prob, logit, acc = s["prob"], s["logit"], s["acc"]
    drops = prob[0] - prob[i_rand:i_comp]
    ldrops = logit[0] - logit[i_rand:i_comp]
    c_drop = float(prob[0] - prob[i_circ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r_mean = float(drops.mean()) if n_random else float("nan")
        r_std = float(drops.std(ddof=1)) if n_random > 1 else float("nan")
        if n_random > 1 and r_std > 1e-12 * max(1.0, abs(r_mean)):
            z = (c_drop - r_mean) / r_std
        elif n_random > 1:
            z = 0.0 if abs(c_drop - r_mean) <= 1e-12 else math.copysign(math.inf, c_drop - r_mean)
        else:
            z = float("nan")
    p_value = float((1 + np.sum(drops >= c_drop - 1e-12)) / (1 + n_random)) if n_random else float("nan")
    kw: dict[str, Any] = {}
    if curves:
        dc = prob[i_del : i_del + n_curve].copy()
        ic = prob[i_ins : i_ins + n_curve].copy()
        kw = dict(curve_x=xs, deletion_curve=dc, insertion_curve=ic, deletion_auc=_auc(xs, dc),
                  insertion_auc=_auc(xs, ic))
    return FidelityResult(
        target=target if isinstance(target, str) else int(target),
        n_images=int(x_cpu.shape[0]),
        sizes={names[li]: int(us.size) for li, us in sel.items()},
        prob_before=float(prob[0]),
        logit_before=float(logit[0]),
        circuit_drop=c_drop,
        circuit_logit_drop=float(logit[0] - logit[i_circ]),
        random_mean=r_mean,
        random_std=r_std,
        random_logit_mean=float(ldrops.mean()) if n_random else float("nan"),
        random_logit_std=float(ldrops.std(ddof=1)) if n_random > 1 else float("nan"),
        random_drops=drops.copy(),
        complement_drop=float(prob[0] - prob[i_comp]),
        complement_logit_drop=float(logit[0] - logit[i_comp]),
        z=float(z),
        p_value=p_value,
        acc_before=float(acc[0]),
        acc_circuit=float(acc[i_circ]),
        acc_complement=float(acc[i_comp]),
        **kw,
    )
