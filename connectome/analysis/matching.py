"""Cross-model unit matching and the universality of circuits.

Two networks trained on the same task learn many of the same features, carried by
different units (and in a different order). :func:`match_units` pairs the units of two
models one-to-one by the correlation of their activations on shared probe images, layer by
layer, as in Li et al. (2015); the models may differ in architecture and width (a
rectangular assignment leaves the surplus units unmatched). :func:`universality` then asks
whether the circuit of a category in one model maps onto the circuit of the same category
in the other more than chance would have it (Olah et al. 2020, "universality").

References
----------
Li, Y., Yosinski, J., Clune, J., Lipson, H. & Hopcroft, J. (2015). Convergent Learning: Do
different neural networks learn the same representations? ICLR 2016 / arXiv:1511.07543.
Olah, C. et al. (2020). Zoom In: An Introduction to Circuits. Distill.
Phipson, B. & Smyth, G. K. (2010). Permutation P-values Should Never Be Zero. Stat. Appl.
Genet. Mol. Biol. 9(1).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from connectome.analysis._util import nan_to_none as _nan_to_none
from connectome.errors import ConnectomeError, EmptyGraphError, short_list
from connectome.extract.activations import unit_means
from connectome.extract.probe import IO_KINDS, Traced, load_probe, profile_node, traced
from connectome.extract.trace import run_nodes
from connectome.graph import Connectome
from connectome.kinds import KINDS

__all__ = ["match_units", "universality", "UnitMatching", "UniversalityResult", "CategoryOverlap"]

_HIDDEN_KINDS = tuple(k for k, v in KINDS.items() if v.hidden)  # connectome/kinds.py




def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3f}"


# ---------------------------------------------------------------------- matching
@dataclass(frozen=True, eq=False)
class UnitMatching:
    """A one-to-one pairing of the units of model A with those of model B, layer by layer.

    Attributes
    ----------
    layer_pairs : tuple of (str, str)
        ``(layer of A, layer of B)`` in A's layer order (graph layer names; the output
        layer is ``"logits"``).
    sizes : dict of str -> (int, int)
        Units of each paired layer in A and in B.
    modes : dict of str -> str
        Per layer of A, how profiles were built: ``"positions"`` (images x spatial
        positions) or ``"images"`` (per-image spatial means).
    matrices : dict of str -> ndarray, shape (units_a, units_b)
        Pearson correlation of every unit of A with every unit of B (constant units: 0).
    n_images : int
        Probe images.
    kinds : dict of str -> (str, str)
        Layer kinds (``conv``, ``linear``, ``residual``, ``concat``, ``output`` ...) in A and B.
    mappings : dict of str -> ndarray of int64, shape (units_a,)
        Per layer of A, the partner of each unit in B or -1 (see :meth:`mapping`).
    """

    layer_pairs: tuple[tuple[str, str], ...]
    sizes: dict[str, tuple[int, int]]
    modes: dict[str, str]
    matrices: dict[str, np.ndarray]
    n_images: int
    kinds: dict[str, tuple[str, str]]
    mappings: dict[str, np.ndarray]

    def _check(self, layer_a: str) -> None:
        if layer_a not in self.mappings:
            raise ConnectomeError(
                f"layer {layer_a!r} of model A is not matched; matched layers are "
                f"{short_list([a for a, _ in self.layer_pairs])}"
            )

    def partner_layer(self, layer_a: str) -> str:
        """The layer of B paired with ``layer_a``."""
        self._check(layer_a)
        return dict(self.layer_pairs)[layer_a]

    def mapping(self, layer_a: str) -> np.ndarray:
        """For each unit of ``layer_a``, its partner unit in B, or -1 (B has fewer units).

        Returns
        -------
        ndarray of int64, shape (units_a,)
        """
        self._check(layer_a)
        return self.mappings[layer_a].copy()

    def correlation(self, layer_a: str) -> np.ndarray:
        """Correlation of each unit of ``layer_a`` with its partner (NaN when unmatched).

        Returns
        -------
        ndarray of float64, shape (units_a,)
        """
        self._check(layer_a)
        m = self.mappings[layer_a]
        out = np.full(m.shape[0], np.nan)
        ok = m >= 0
        out[ok] = self.matrices[layer_a][np.flatnonzero(ok), m[ok]]
        return out

    def summary(self) -> dict[str, float]:
        """Mean correlation of the matched pairs, per layer of A."""
        out = {}
        for a, _ in self.layer_pairs:
            c = self.correlation(a)
            c = c[np.isfinite(c)]
            out[a] = float(c.mean()) if c.size else float("nan")
        return out

    def map_node(self, node_id_a: str) -> str | None:
        """The node id in B matched with ``node_id_a``, or None (layer not matched, or unit
        without a partner)."""
        name, sep, unit = str(node_id_a).rpartition(":")
        if not sep:
            raise ValueError(f"{node_id_a!r} is not a node id '<layer>:<unit>'")
        if name not in self.mappings:
            return None
        m = self.mappings[name]
        u = int(unit)
        if not 0 <= u < m.shape[0]:
            raise ConnectomeError(f"no node {node_id_a!r}: layer {name!r} has units 0..{m.shape[0] - 1}")
        return None if m[u] < 0 else f"{self.partner_layer(name)}:{int(m[u])}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None); correlation matrices left out."""
        return {
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "n_images": self.n_images,
            "layers": {
                a: {
                    "layer_b": b,
                    "sizes": list(self.sizes[a]),
                    "mode": self.modes[a],
                    "kinds": list(self.kinds[a]),
                    "mapping": self.mappings[a].tolist(),
                    "correlation": _nan_to_none(self.correlation(a).tolist()),
                }
                for a, b in self.layer_pairs
            },
            "summary": _nan_to_none(self.summary()),
        }

    def __repr__(self) -> str:
        s = self.summary()
        wa = max([len(a) for a, _ in self.layer_pairs] + [7])
        wb = max([len(b) for _, b in self.layer_pairs] + [7])
        lines = [f"UnitMatching({len(self.layer_pairs)} layer pairs, {self.n_images} probe images)",
                 f"  {'layer A':<{wa}}  {'layer B':<{wb}}  {'units':>11}  {'mode':<9}  mean corr"]
        for a, b in self.layer_pairs:
            ua, ub = self.sizes[a]
            lines.append(f"  {a:<{wa}}  {b:<{wb}}  {f'{ua}->{ub}':>11}  {self.modes[a]:<9}  {_fmt(s[a])}")
        return "\n".join(lines)


def _depths(t: Traced) -> list[float]:
    n = len(t.layers)
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _default_pairs(ta: Traced, tb: Traced) -> list[tuple[int, int]]:
    """Each hidden layer of A with B's hidden layer of the same kind at the nearest relative
    depth (any hidden kind when B has none of that kind); the outputs with each other."""
    da, db = _depths(ta), _depths(tb)
    hb = [j for j, l in enumerate(tb.layers) if l.kind in _HIDDEN_KINDS]
    pairs = []
    for i, l in enumerate(ta.layers):
        if l.kind not in _HIDDEN_KINDS:
            continue
        cands = [j for j in hb if tb.layers[j].kind == l.kind] or hb
        if not cands:
            continue
        # Nearest depth; ties (up to float error) go to the earlier layer.
        j = min(cands, key=lambda j: (round(abs(db[j] - da[i]), 9), j))
        pairs.append((i, j))
    pairs.append((ta.ug.output_layer, tb.ug.output_layer))
    return pairs


def _given_pairs(ta: Traced, tb: Traced, layer_pairs: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    out = []
    seen = set()
    for p in layer_pairs:
        if isinstance(p, str) or len(p) != 2:
            raise ValueError(f"layer_pairs holds (layer_a, layer_b) tuples, got {p!r}")
        a, b = p
        i, j = ta.resolve(a, where="in model A"), tb.resolve(b, where="in model B")
        if ta.layers[i].name in seen:
            raise ValueError(f"layer {a!r} of model A appears twice in layer_pairs; pair each layer of A once")
        seen.add(ta.layers[i].name)
        out.append((i, j))
    if not out:
        raise ValueError("layer_pairs is empty; pass at least one (layer_a, layer_b) pair or None")
    return out


def _spatial(t: Traced, li: int) -> tuple[int, ...] | None:
    shape = t.ug.shapes.get(profile_node(t, li), ())
    return tuple(shape[2:]) if len(shape) > 2 else None


def _profiles(t: Traced, x: torch.Tensor, needs: Mapping[int, set[str]], batch_size: int) -> dict[tuple[int, str], torch.Tensor]:
    """Activation profiles, shape (samples, units), for each ``(layer, mode)`` asked for.

    Profiles are taken when a value is produced: an in-place op further on (``out +=
    identity``) would otherwise overwrite it.
    """
    by_node: dict[str, list[int]] = {}
    for li in needs:
        by_node.setdefault(profile_node(t, li), []).append(li)
    parts: dict[tuple[int, str], list[torch.Tensor]] = {}

    def on_value(node: Any, v: Any) -> Any:
        for li in by_node.get(node.name, ()):
            units = t.ug.layers[li].size
            for mode in needs[li]:
                if mode == "positions" and v.dim() > 2:
                    # units first (a channels-last value keeps them on its last dim)
                    d = t.ug.one_unit_dim(node.name, "matching over positions")
                    p = v.movedim(d, 1).reshape(v.shape[0], units, -1).transpose(1, 2).reshape(-1, units)
                else:
                    p = unit_means(t.ug, node.name, units, v)
                parts.setdefault((li, mode), []).append(p.to(torch.float64, copy=True))
        return v

    step = max(1, int(batch_size))
    for start in range(0, x.shape[0], step):
        run_nodes(t.ug.gm, (x[start : start + step].to(t.device, dtype=t.dtype),), on_value=on_value)
    return {k: torch.cat(v) for k, v in parts.items()}


def _zscore(p: torch.Tensor) -> torch.Tensor:
    mu = p.mean(0, keepdim=True)
    c = p - mu
    sd = c.pow(2).mean(0, keepdim=True).sqrt()
    # A unit that does not vary has no correlation with anything: give it 0.
    const = sd <= 1e-12 * torch.clamp(mu.abs(), min=1.0)
    return torch.where(const, torch.zeros_like(c), c / torch.where(const, torch.ones_like(sd), sd))


def _correlate(pa: torch.Tensor, pb: torch.Tensor) -> np.ndarray:
    """Pearson correlation of every column of ``pa`` with every column of ``pb``."""
    za, zb = _zscore(pa), _zscore(pb)
    c = (za.T @ zb) / max(1, pa.shape[0])
    return np.clip(c.cpu().numpy(), -1.0, 1.0)


def _assign(corr: np.ndarray) -> np.ndarray:
    """One-to-one assignment maximising total correlation; -1 for rows left over."""
    from scipy.optimize import linear_sum_assignment

    m = np.full(corr.shape[0], -1, dtype=np.int64)
    if corr.size:
        rows, cols = linear_sum_assignment(np.nan_to_num(corr, nan=0.0), maximize=True)
        m[rows] = cols
    return m


def match_units(
    model_a: nn.Module,
    model_b: nn.Module,
    probe_data: Any,
    layer_pairs: Sequence[tuple[str, str]] | None = None,
    device: Any = None,
    batch_size: int = 64,
    spatial: bool = True,
) -> UnitMatching:
    """Pair the units of two models one-to-one by activation correlation, layer by layer.

    For each pair of layers, every unit's activation profile over the probe images is
    correlated (Pearson) with every unit of the other layer, and a one-to-one assignment
    maximising the summed correlation is solved (``scipy.optimize.linear_sum_assignment``,
    rectangular when the layers differ in width: the surplus units of A get -1).

    Parameters
    ----------
    model_a, model_b : nn.Module
        fx-traceable models taking the same inputs; any architectures and widths. Each runs
        in eval mode under ``torch.inference_mode`` and is left as found.
    probe_data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        Probe images, shared by both models (held in memory).
    layer_pairs : sequence of (str, str), optional
        ``(layer of A, layer of B)`` graph layer names (``"logits"`` for the output). Default:
        each conv/linear/residual/concat layer of A with the layer of B of the same kind
        (any hidden kind when B has none of that kind) at the nearest relative depth
        ``position / (n_layers - 1)``, plus ``("logits", "logits")``.
    device : optional
        ``None``: CUDA when available, else CPU.
    batch_size : int, default 64
        Images per forward pass.
    spatial : bool, default True
        When both layers have maps of the same spatial size, use every (image, position)
        as a sample; otherwise (or with ``False``) use per-image spatial means.

    Returns
    -------
    UnitMatching

    Raises
    ------
    ConnectomeError
        A layer in ``layer_pairs`` that is not in its model.
    DataError
        No probe images.

    Examples
    --------
    >>> m = match_units(model_a, model_b, images)                       # doctest: +SKIP
    >>> m.map_node("conv1:3")                                            # doctest: +SKIP
    'conv1:11'
    >>> m.summary()["conv1"]                                             # doctest: +SKIP
    0.87

    References
    ----------
    Li, Y., Yosinski, J., Clune, J., Lipson, H. & Hopcroft, J. (2015). Convergent Learning:
    Do different neural networks learn the same representations? arXiv:1511.07543.
    """
    x, _, _ = load_probe(probe_data, batch_size)
    with contextlib.ExitStack() as stack:
        ta = stack.enter_context(traced(model_a, x, device))
        tb = stack.enter_context(traced(model_b, x, device))
        pairs = _default_pairs(ta, tb) if layer_pairs is None else _given_pairs(ta, tb, layer_pairs)
        modes: dict[int, str] = {}
        need_a: dict[int, set[str]] = {}
        need_b: dict[int, set[str]] = {}
        for i, j in pairs:
            sa, sb = _spatial(ta, i), _spatial(tb, j)
            mode = "positions" if spatial and sa is not None and sa == sb else "images"
            modes[i] = mode
            need_a.setdefault(i, set()).add(mode)
            need_b.setdefault(j, set()).add(mode)
        prof_a = _profiles(ta, x, need_a, batch_size)
        prof_b = _profiles(tb, x, need_b, batch_size)
        matrices, mappings, sizes, mode_names, kinds = {}, {}, {}, {}, {}
        for i, j in pairs:
            a = ta.layers[i].name
            corr = _correlate(prof_a[(i, modes[i])], prof_b[(j, modes[i])])
            mp = _assign(corr)
            corr.setflags(write=False)
            mp.setflags(write=False)
            matrices[a] = corr
            mappings[a] = mp
            sizes[a] = (int(ta.layers[i].size), int(tb.layers[j].size))
            mode_names[a] = modes[i]
            kinds[a] = (ta.layers[i].kind, tb.layers[j].kind)
        named = tuple((ta.layers[i].name, tb.layers[j].name) for i, j in pairs)
    return UnitMatching(
        layer_pairs=named,
        sizes=sizes,
        modes=mode_names,
        matrices=matrices,
        n_images=int(x.shape[0]),
        kinds=kinds,
        mappings=mappings,
    )


# ---------------------------------------------------------------------- universality
@dataclass(frozen=True, eq=False)
class CategoryOverlap:
    """How one category's circuit in A lands on its circuit in B.

    Attributes
    ----------
    category : str
    overlap : float
        Fraction of A's circuit units (with a partner in B) whose partner is in B's circuit.
    n_units : int
        A's circuit units in matched hidden layers.
    n_mapped : int
        Of those, units with a partner in B.
    n_hits : int
        Of those, units whose partner is in B's circuit.
    random_mean, random_std : float
        Overlap of same-size random unit sets of A (per layer), mapped the same way.
    z : float
        ``(overlap - random_mean) / random_std``.
    p_value : float
        ``(1 + #{random >= overlap}) / (1 + n_random)``.
    per_layer : dict of str -> dict
        Per layer of A: ``overlap``, ``n_units``, ``n_mapped``, ``n_hits``, ``random_mean``.
    """

    category: str
    overlap: float
    n_units: int
    n_mapped: int
    n_hits: int
    random_mean: float
    random_std: float
    z: float
    p_value: float
    per_layer: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return _nan_to_none({k: getattr(self, k) for k in self.__dataclass_fields__})

    def __repr__(self) -> str:
        return (f"CategoryOverlap({self.category!r}: overlap {_fmt(self.overlap)} ({self.n_hits}/{self.n_mapped} "
                f"mapped units), chance {_fmt(self.random_mean)} +- {_fmt(self.random_std)}, z={_fmt(self.z)}, "
                f"p={_fmt(self.p_value)})")


@dataclass(frozen=True, eq=False)
class UniversalityResult:
    """Do the circuits of the same categories in two models map onto each other?

    Attributes
    ----------
    models : (str, str)
        Names of model A (the matching's source) and model B.
    mass : float
        Circuit mass used.
    n_random : int
    per_category : tuple of CategoryOverlap
        One row per shared category.
    overlap, random_mean : float
        Means over categories.
    """

    models: tuple[str, str]
    mass: float
    n_random: int
    per_category: tuple[CategoryOverlap, ...]

    @property
    def categories(self) -> list[str]:
        return [c.category for c in self.per_category]

    @property
    def overlap(self) -> float:
        v = [c.overlap for c in self.per_category if math.isfinite(c.overlap)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def random_mean(self) -> float:
        v = [c.random_mean for c in self.per_category if math.isfinite(c.random_mean)]
        return float(np.mean(v)) if v else float("nan")

    def __getitem__(self, category: str) -> CategoryOverlap:
        for c in self.per_category:
            if c.category == category:
                return c
        raise KeyError(f"no category {category!r}; categories are {self.categories}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as None)."""
        return _nan_to_none({
            "models": list(self.models),
            "mass": self.mass,
            "n_random": self.n_random,
            "overlap": self.overlap,
            "random_mean": self.random_mean,
            "per_category": [c.to_dict() for c in self.per_category],
        })

    def __repr__(self) -> str:
        w = max([len(c) for c in self.categories] + [8])
        lines = [
            f"UniversalityResult({self.models[0]!r} -> {self.models[1]!r}: {len(self.per_category)} categories, "
            f"mass={self.mass}, n_random={self.n_random})",
            f"  {'category':<{w}}  {'units':>6}  {'overlap':>8}  {'chance':>15}  {'z':>7}  {'p':>6}",
        ]
        for c in self.per_category:
            chance = f"{_fmt(c.random_mean)} +- {_fmt(c.random_std)}"
            lines.append(f"  {c.category:<{w}}  {c.n_units:>6}  {_fmt(c.overlap):>8}  {chance:>15}  "
                         f"{_fmt(c.z):>7}  {_fmt(c.p_value):>6}")
        lines.append(f"  mean overlap {_fmt(self.overlap)} vs chance {_fmt(self.random_mean)}")
        return "\n".join(lines)


def _circuit_of(g: Any, category: str, mass: float) -> Connectome | Any:
    if not isinstance(g, Connectome):
        raise TypeError(f"graphs_by_model values map categories to Connectomes, got {type(g).__name__}")
    from connectome.analysis.circuits import circuit

    try:
        return circuit(g, mass=mass)
    except EmptyGraphError:
        raise
    except ConnectomeError:
        # No default target in meta: the category may still name an output label.
        return circuit(g, target=category, mass=mass)


def _units_by_layer(c: Any) -> dict[str, set[int]]:
    """Circuit units per layer, from a Connectome or an iterable of node ids."""
    out: dict[str, set[int]] = {}
    if isinstance(c, Connectome):
        for l in c.layers:
            out[l.name] = set(c.node_units[c.layer_slice(l.name)].tolist())
        return out
    for s in ([c] if isinstance(c, str) else list(c)):
        name, sep, unit = str(s).rpartition(":")
        if not sep:
            raise ValueError(f"{s!r} is not a node id '<layer>:<unit>'")
        out.setdefault(name, set()).add(int(unit))
    return out


def universality(
    graphs_by_model: Mapping[str, Mapping[str, Connectome]],
    matching: UnitMatching,
    mass: float = 0.8,
    n_random: int = 200,
    seed: int = 0,
    *,
    circuits: Mapping[str, Mapping[str, Any]] | None = None,
) -> UniversalityResult:
    """Overlap of matched circuits across two models, against chance.

    For each category both models have, the circuit of each model's graph is taken
    (:func:`connectome.analysis.circuit` with ``mass``), A's circuit units in the matched
    hidden layers are mapped to B through ``matching``, and the fraction landing in B's
    circuit is compared with the same fraction for random unit sets of A (as many units per
    layer as A's circuit has, uniformly within the layer, mapped the same way).

    Parameters
    ----------
    graphs_by_model : dict of str -> dict of str -> Connectome
        Exactly two models, ``{model_a: {category: graph}, model_b: {...}}``; the first is
        the source of ``matching``. Node ids are the models' graph node ids.
    matching : UnitMatching
        From :func:`match_units` (``model_a`` -> ``model_b``).
    mass : float, default 0.8
        Circuit mass (see :func:`connectome.analysis.circuit`).
    n_random : int, default 200
        Random draws for chance.
    seed : int, default 0
    circuits : dict of str -> dict of str -> Connectome or node ids, optional
        Precomputed circuits ``{model: {category: circuit}}``, used instead of computing them.

    Returns
    -------
    UniversalityResult
        Per category: overlap, chance mean and std, z-score and permutation p-value
        ``(1 + #{random >= observed}) / (1 + n_random)`` (Phipson & Smyth 2010).

    Raises
    ------
    ValueError
        Not exactly two models, no shared category, bad ``n_random``.

    Examples
    --------
    >>> m = match_units(model_a, model_b, probe)                           # doctest: +SKIP
    >>> u = universality({"a": graphs_a, "b": graphs_b}, m)               # doctest: +SKIP
    >>> u["circle"].overlap, u["circle"].random_mean                      # doctest: +SKIP
    (0.61, 0.18)

    References
    ----------
    Olah, C. et al. (2020). Zoom In: An Introduction to Circuits. Distill (universality).
    Li, Y. et al. (2015). Convergent Learning. arXiv:1511.07543.
    """
    if not isinstance(matching, UnitMatching):
        raise TypeError(f"matching must be a UnitMatching (from match_units), got {type(matching).__name__}")
    names = list(graphs_by_model)
    if len(names) != 2:
        raise ValueError(f"graphs_by_model must hold exactly two models (A, then B), got {len(names)}: {names}")
    if isinstance(n_random, bool) or int(n_random) != n_random or n_random < 1:
        raise ValueError(f"n_random must be a positive integer, got {n_random!r}")
    n_random = int(n_random)
    ga, gb = graphs_by_model[names[0]], graphs_by_model[names[1]]
    cats = [c for c in ga if c in gb]
    if not cats:
        raise ValueError(f"the two models share no category: {sorted(ga)} vs {sorted(gb)}")
    rng = np.random.default_rng(seed)
    # Hidden layers only: the output layer is matched too, but the target logit is in
    # both circuits by construction.
    skip = IO_KINDS
    pairs = [(a, b) for a, b in matching.layer_pairs if not set(matching.kinds[a]) & set(skip)]
    rows = []
    for cat in cats:
        if circuits is not None and cat in circuits.get(names[0], {}) and cat in circuits.get(names[1], {}):
            ca, cb = circuits[names[0]][cat], circuits[names[1]][cat]
        else:
            ca, cb = _circuit_of(ga[cat], cat, mass), _circuit_of(gb[cat], cat, mass)
        ua, ub = _units_by_layer(ca), _units_by_layer(cb)
        if isinstance(ca, Connectome):
            ua = {l.name: ua[l.name] for l in ca.layers if l.kind not in IO_KINDS}
        known = {a for a, _ in matching.layer_pairs}
        unmatched = sorted(l for l, us in ua.items() if us and l not in known and l != "input")
        if unmatched:
            warnings.warn(
                f"category {cat!r}: circuit units of {names[0]!r} in layers {unmatched} are left out: those "
                "layers are not in the matching (pass layer_pairs to match_units to include them)",
                stacklevel=2,
            )
        per_layer: dict[str, dict[str, Any]] = {}
        tot_units = tot_mapped = tot_hits = 0
        r_hits = np.zeros(n_random)
        r_mapped = np.zeros(n_random)
        for a, b in pairs:
            units = np.array(sorted(ua.get(a, ())), dtype=np.int64)
            if units.size == 0:
                continue
            mp = matching.mapping(a)
            if units.max() >= mp.shape[0]:
                raise ConnectomeError(
                    f"circuit of {names[0]!r}/{cat!r} has unit {a}:{int(units.max())} but the matching's layer "
                    f"{a!r} has {mp.shape[0]} units; use graphs of the matched models"
                )
            in_b = np.zeros(matching.sizes[a][1], dtype=bool)
            ib = np.array(sorted(ub.get(b, ())), dtype=np.int64)
            in_b[ib[(ib >= 0) & (ib < in_b.size)]] = True
            partners = mp[units]
            ok = partners >= 0
            hits = int(in_b[partners[ok]].sum())
            # Random same-size sets of A's layer, all draws at once.
            draws = np.argsort(rng.random((n_random, mp.shape[0])), axis=1)[:, : units.size]
            rp = mp[draws]
            rok = rp >= 0
            rh = (in_b[np.where(rok, rp, 0)] & rok).sum(1)
            rm = rok.sum(1)
            r_hits += rh
            r_mapped += rm
            per_layer[a] = {
                "layer_b": b,
                "n_units": int(units.size),
                "n_mapped": int(ok.sum()),
                "n_hits": hits,
                "overlap": hits / int(ok.sum()) if ok.any() else float("nan"),
                "random_mean": float(np.mean(rh / np.maximum(rm, 1))),
            }
            tot_units += int(units.size)
            tot_mapped += int(ok.sum())
            tot_hits += hits
        obs = tot_hits / tot_mapped if tot_mapped else float("nan")
        rand = r_hits / np.maximum(r_mapped, 1)
        r_mean = float(rand.mean()) if tot_mapped else float("nan")
        r_std = float(rand.std(ddof=1)) if tot_mapped and n_random > 1 else float("nan")
        if not math.isfinite(obs) or not math.isfinite(r_std):
            z = float("nan")
        elif r_std > 1e-12:
            z = (obs - r_mean) / r_std
        else:
            z = 0.0 if abs(obs - r_mean) <= 1e-12 else math.copysign(math.inf, obs - r_mean)
        p = float((1 + np.sum(rand >= obs - 1e-12)) / (1 + n_random)) if math.isfinite(obs) else float("nan")
        rows.append(CategoryOverlap(
            category=str(cat), overlap=float(obs), n_units=tot_units, n_mapped=tot_mapped, n_hits=tot_hits,
            random_mean=r_mean, random_std=r_std, z=float(z), p_value=p, per_layer=per_layer,
        ))
    return UniversalityResult(models=(str(names[0]), str(names[1])), mass=float(mass), n_random=n_random,
                              per_category=tuple(rows))
