"""Functional connectivity: which units fire together over images.

Structural connectivity (the weight graphs) says how units are wired, effective connectivity
(the attribution graphs) what flows through the wiring; functional connectivity says which
units' activations are correlated over a set of images. :func:`functional_connectivity`
runs the data through the model once and keeps, per layer block, streaming float64 moments
of the units' activations (each unit's activation pooled over positions, as in
:func:`connectome.extract.activations`): the count, the mean and the centred cross-product
sums ``sum (x - mean)(y - mean)``, updated batch by batch with the pairwise formulas of Chan,
Golub & LeVeque (exactly the sums of ``x`` and ``x x^T``, without their cancellation). Memory
is ``O(units_a * units_b)`` per layer pair, independent of the number of images; under
``torchrun`` every process reads its shard and the moments are all-reduced once.

:func:`coupling` compares two graphs of one model on the unit pairs they share (structural
vs functional vs effective): per layer pair, the Spearman rank correlation of the edge
weights and a seeded permutation null.

References
----------
Friston, K. J. (2011). Functional and effective connectivity: a review. Brain Connectivity 1(1).
Chan, T. F., Golub, G. H. & LeVeque, R. J. (1979). Updating formulae and a pairwise algorithm
for computing sample variances. Stanford CS report STAN-CS-79-773.
Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate. JRSS B 57(1).
Honey, C. J. et al. (2009). Predicting human resting-state functional connectivity from
structural connectivity. PNAS 106(6) (structure-function coupling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from connectome.errors import ConnectomeError, DataError, short_list
from connectome.graph import Connectome

__all__ = ["functional_connectivity", "FunctionalConnectivity", "coupling", "Coupling", "CouplingRow", "METHODS"]

#: Correlation methods of :func:`functional_connectivity`.
METHODS = ("pearson", "spearman", "partial")


# ----------------------------------------------------------------------------- streaming moments
class Moments:
    """Streaming count, means and centred cross-product sums of per-unit activations.

    ``blocks`` lists the layer pairs ``(a, b)`` whose cross products are kept (``(a, a)`` for
    every layer is always kept: the variances). :meth:`update` takes one batch ``{layer:
    (n, units) float64}``; the merge is Chan et al.'s pairwise update, so a batch of one
    image, a batch of all images and any split in between give the same moments up to
    rounding.
    """

    def __init__(self, layers: Sequence[int], pairs: Sequence[tuple[int, int]]):
        self.layers = list(layers)
        self.pairs = list(dict.fromkeys([(a, a) for a in self.layers] + [tuple(p) for p in pairs]))
        self.n = 0
        self.mean: dict[int, Any] = {}
        self.m2: dict[tuple[int, int], Any] = {}

    def update(self, xs: dict[int, Any]) -> None:
        nb = next(iter(xs.values())).shape[0]
        if nb == 0:
            return
        bm = {l: xs[l].mean(0) for l in self.layers}
        c = {l: xs[l] - bm[l] for l in self.layers}
        if self.n == 0:
            self.mean = bm
            self.m2 = {(a, b): c[a].T @ c[b] for a, b in self.pairs}
        else:
            tot = self.n + nb
            d = {l: bm[l] - self.mean[l] for l in self.layers}
            f = self.n * nb / tot
            for a, b in self.pairs:
                self.m2[(a, b)] += c[a].T @ c[b] + f * (d[a][:, None] * d[b][None, :])
            for l in self.layers:
                self.mean[l] = self.mean[l] + d[l] * (nb / tot)
        self.n += nb

    def to_numpy(self) -> None:
        """Move the moments (torch tensors on the device while streaming) to numpy arrays."""
        conv = (lambda v: v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v))
        self.mean = {l: conv(v) for l, v in self.mean.items()}
        self.m2 = {k: conv(v) for k, v in self.m2.items()}

    def all_reduce(self, comm: Any) -> None:
        """Merge the moments of every process (collective; ``torch.distributed`` initialised).

        Two reductions keep it exact: the global mean first, then each process's sums shifted
        to that mean, ``M2 + n (m - mean)(m - mean)^T``, summed."""
        import torch

        from connectome.extract.distributed import _reduce

        ops = torch.distributed.ReduceOp.SUM
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        weighted = [self.mean[l] * self.n for l in self.layers]
        _reduce([n, *weighted], ops, comm)
        total = float(n.item())
        gmean = {l: w / total for l, w in zip(self.layers, weighted)}
        shifted = []
        for a, b in self.pairs:
            da, db = self.mean[a] - gmean[a], self.mean[b] - gmean[b]
            shifted.append(self.m2[(a, b)] + self.n * (da[:, None] * db[None, :]))
        _reduce(shifted, ops, comm)
        self.m2 = dict(zip(self.pairs, shifted))
        self.mean, self.n = gmean, int(round(total))


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class FunctionalConnectivity:
    """Correlations of unit activations over images.

    A :class:`~connectome.graph.Connectome` holds edges that go forward in layer order only,
    so the correlations between units of *one* layer are kept next to it, in ``within``.

    Attributes
    ----------
    graph : Connectome
        The units of the chosen layers (node ids as in the weight and attribution graphs of
        the model) with the between-layer correlations as edges: ``weight`` is the
        correlation ``r``; edge columns ``abs_weight``, ``p`` (two-sided, Fisher z) and ``q``
        (Benjamini-Hochberg adjusted p). Node columns ``activation_mean`` and
        ``activation_std``. ``meta["kind"] == "functional"``.
    within : dict of str -> dict of str -> ndarray
        Per layer, the kept pairs ``i < j`` of its units: ``"src"``, ``"dst"`` (unit indices),
        ``"r"``, ``"p"``, ``"q"``.
    blocks : dict of (str, str) -> ndarray
        The full correlation matrix of every tested layer pair (``(a, a)`` within a layer),
        before thresholding; NaN where a unit does not vary.
    method : str
    n_images : int
    fdr : float or None
    top_k : int or None
    """

    graph: Connectome
    within: dict[str, dict[str, np.ndarray]]
    blocks: dict[tuple[str, str], np.ndarray] = field(repr=False)
    method: str
    n_images: int
    fdr: float | None
    top_k: int | None

    @property
    def n_edges(self) -> int:
        """Kept edges, between and within layers."""
        return int(self.graph.num_edges + sum(w["r"].size for w in self.within.values()))

    def matrix(self, a: str, b: str | None = None) -> np.ndarray:
        """The correlation matrix of layers ``a`` and ``b`` (default ``b = a``), all pairs."""
        b = a if b is None else b
        if (a, b) in self.blocks:
            return self.blocks[(a, b)]
        if (b, a) in self.blocks:
            return self.blocks[(b, a)].T
        raise KeyError(f"layers {a!r} and {b!r} were not tested together; tested pairs are "
                       f"{short_list([f'{x}-{y}' for x, y in self.blocks])}")

    def __repr__(self) -> str:
        n_within = sum(w["r"].size for w in self.within.values())
        thr = "all pairs" if self.fdr is None else f"FDR {self.fdr:g}"
        k = "" if self.top_k is None else f", top {self.top_k} per unit"
        return (f"FunctionalConnectivity({self.method}, {self.n_images} images, {thr}{k}: "
                f"{self.graph.num_nodes} units in {len(self.graph.layers)} layers, "
                f"{self.graph.num_edges} edges between layers, {n_within} within)")


# ----------------------------------------------------------------------------- statistics
def _corr(m2: np.ndarray, va: np.ndarray, vb: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.sqrt(np.outer(va, vb))
        r = np.where(den > 0, m2 / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def _partial(m2: dict[tuple[int, int], np.ndarray], a: int, b: int, live: dict[int, np.ndarray]) -> np.ndarray:
    """Partial correlations given every other unit of layers ``a`` and ``b``: ``-P_ij /
    sqrt(P_ii P_jj)`` of the (pseudo-)inverse ``P`` of their joint covariance. Units that do
    not vary (``live`` False) are left out of the inversion (NaN)."""
    if a == b:
        C, ok = m2[(a, a)], live[a]
    else:
        C = np.block([[m2[(a, a)], m2[(a, b)]], [m2[(a, b)].T, m2[(b, b)]]])
        ok = np.concatenate([live[a], live[b]])
    P = np.full(C.shape, np.nan)
    if ok.any():
        P[np.ix_(ok, ok)] = np.linalg.pinv(C[np.ix_(ok, ok)], hermitian=True)
    d = np.diag(P)
    with np.errstate(divide="ignore", invalid="ignore"):
        R = np.where(np.outer(d, d) > 0, -P / np.sqrt(np.abs(np.outer(d, d))), np.nan)
    R = np.clip(R, -1.0, 1.0)
    na = m2[(a, a)].shape[0]
    return R if a == b else R[:na, na:]


def _p_values(r: np.ndarray, n: int, k: int, method: str) -> np.ndarray:
    """Two-sided p of ``r = 0`` by Fisher's z: ``atanh(r) * sqrt(n - 3 - k)`` is standard normal
    (``k`` conditioning units for partial correlations; the variance 1.06 / (n - 3) for
    Spearman's, Fieller et al. 1957). NaN r (a unit that does not vary) gives p = 1."""
    from scipy.special import ndtr  # scipy.stats takes seconds to import; the normal tail is all we need

    df = n - 3 - k
    p = np.ones(r.shape)
    if df <= 0:
        return p
    scale = math.sqrt(df / 1.06) if method == "spearman" else math.sqrt(df)
    ok = np.isfinite(r)
    with np.errstate(divide="ignore"):
        z = np.arctanh(np.clip(np.abs(r[ok]), 0.0, 1.0)) * scale
    p[ok] = 2.0 * ndtr(-z)
    return p


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values): ``q_(i) = min_{j >= i} p_(j) m / j``,
    capped at 1; keeping ``q <= alpha`` controls the false discovery rate at ``alpha``
    (as ``scipy.stats.false_discovery_control(p, method="bh")``)."""
    m = p.size
    if m == 0:
        return p.copy()
    o = np.argsort(p, kind="stable")
    q = np.minimum.accumulate((p[o] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[o] = np.minimum(q, 1.0)
    return out


def _top_k(u: np.ndarray, v: np.ndarray, score: np.ndarray, k: int, n_nodes: int) -> np.ndarray:
    """Edges among the ``k`` largest ``score`` of either endpoint (ties: earlier edge first)."""
    ends = np.concatenate([u, v])  # each edge once per end: a unit's incident edges
    edge = np.concatenate([np.arange(u.size)] * 2)
    order = np.lexsort((edge, -np.concatenate([score, score]), ends))
    e = ends[order]
    rank = np.arange(e.size) - np.searchsorted(e, e, side="left")
    keep = np.zeros(u.size, dtype=bool)
    keep[edge[order[rank < k]]] = True
    return keep


# ----------------------------------------------------------------------------- the pass
def _collect(model: Any, data: Any, layers: Sequence[str] | None, between: str, device: Any, batch_size: int,
             keep_values: bool) -> tuple[Any, list[int], list[tuple[int, int]], Moments, dict[int, np.ndarray] | None,
                                         int]:
    """One pass over ``data``: the moments (and, for ranks, every image's pooled activations)."""
    import torch
    from torch.utils.data import DataLoader

    from connectome.extract._model import check_model, eval_mode, model_dtype, model_on, resolve_device
    from connectome.extract.activations import _read_node, _resolve_layers, traced_batches, unit_means
    from connectome.extract.build import graph_layers
    from connectome.extract.data import make_loader
    from connectome.extract.distributed import ShardSampler, _comm_device, agree, rank_device, rank_world
    from connectome.extract.trace import run_nodes

    check_model(model)
    rank, world = rank_world()
    dev = rank_device(resolve_device(device))
    if isinstance(data, torch.Tensor) and data.dim() == 3:
        data = data[None]
    info = make_loader(data, batch_size=batch_size)
    loader, stride = info.loader, 1
    if world > 1:
        ds = info.dataset
        if ds is not None and hasattr(ds, "__len__") and getattr(loader, "batch_size", None):
            loader = DataLoader(ds, batch_size=loader.batch_size, shuffle=False,
                                sampler=ShardSampler(len(ds), rank, world), collate_fn=loader.collate_fn,
                                num_workers=loader.num_workers)
        else:
            stride = world  # tensors: every process takes every world-th batch
    m = model_on(model, dev)
    dtype = model_dtype(m)
    ug, picks, pairs, mom, values = None, [], [], None, None
    error: BaseException | None = None
    try:
        with eval_mode(m), torch.inference_mode():
            for b, (ug, x, _) in enumerate(traced_batches(m, loader, dev, dtype, rank=rank, stride=stride)):
                if b == 0:
                    glayers = graph_layers(ug)
                    picks = sorted(dict.fromkeys(_resolve_layers(ug, layers)))
                    if len(picks) < 1:
                        raise ConnectomeError("no layers to correlate; pass layer names or None for all")
                    if between == "adjacent":
                        pairs = list(zip(picks[:-1], picks[1:]))
                    elif between == "all":
                        pairs = [(a, b) for i, a in enumerate(picks) for b in picks[i + 1:]]
                    else:
                        pairs = []
                    read = {i: _read_node(ug, i, False) for i in picks}
                    mom = Moments(picks, pairs)
                    values = {i: [] for i in picks} if keep_values else None
                _, kept = run_nodes(ug.gm, (x,), keep=set(read.values()))
                xs = {}
                for i in picks:
                    xs[i] = unit_means(ug, read[i], ug.layers[i].size, kept[read[i]]).double()
                if values is not None:
                    for i in picks:
                        values[i].append(xs[i].cpu().numpy())
                else:
                    mom.update(xs)
            if ug is None:
                raise DataError("no images to run; pass at least one image"
                                + (" per process (fewer batches than processes)" if world > 1 else ""))
    except BaseException as exc:  # noqa: BLE001 - re-raised on every rank by agree()
        error = exc
    agree(error)
    stacked = None
    if values is not None:
        stacked = {i: np.concatenate(v) for i, v in values.items()}
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, stacked)
            stacked = {i: np.concatenate([p[i] for p in parts]) for i in picks}
        n = next(iter(stacked.values())).shape[0]
    else:
        if world > 1:
            mom.all_reduce(_comm_device(dev))
        n = mom.n
        mom.to_numpy()
    return glayers, picks, pairs, mom, stacked, n


def functional_connectivity(
    model: Any,
    data: Any,
    layers: Sequence[str] | None = None,
    method: str = "pearson",
    *,
    between: str = "adjacent",
    fdr: float | None = 0.05,
    top_k: int | None = None,
    device: Any = None,
    batch_size: int = 64,
) -> FunctionalConnectivity:
    """Correlations of unit activations over images, as a graph on the model's units.

    Each unit's activation is the value it passes on (after BatchNorm and nonlinearity)
    averaged over positions, as in :func:`connectome.extract.activations`. Pairs are tested
    within each layer and between layers (``between``).

    Parameters
    ----------
    model : nn.Module
        An fx-traceable model; runs in eval mode under ``torch.inference_mode``, left as found.
    data : Tensor, (Tensor, Tensor), Dataset, DataLoader or ImageFolder path
        The images (labels are not used). At least 4 are needed for any p-value.
    layers : sequence of str, optional
        Graph layer names; default every layer (input and logits included).
    method : {"pearson", "spearman", "partial"}, default "pearson"
        ``"pearson"``: one pass, streaming float64 moments per layer block, memory
        ``O(sum units_a * units_b)`` whatever the number of images. ``"spearman"``: Pearson
        correlation of the images' ranks per unit (average ranks for ties). Ranks need every
        value, so this method keeps each image's pooled activations: ``8 * n_images * units``
        bytes (float64) on the CPU, then correlates the ranks with the same moments.
        ``"partial"``: correlation of two units given every other unit of their layer (of
        both layers for a between-layer pair), from the inverse of the pooled covariance
        (pseudo-inverse when singular; that needs more images than units to be meaningful).
    between : {"adjacent", "all", "none"}, default "adjacent"
        Which layer pairs are tested besides each layer with itself: consecutive ``layers``,
        every pair of them, or none.
    fdr : float or None, default 0.05
        Keep the pairs whose correlation differs from 0 at this false discovery rate
        (Fisher z test, Benjamini-Hochberg over every tested pair); ``None`` keeps every pair
        with a finite correlation.
    top_k : int, optional
        Then keep, per unit, only its ``top_k`` strongest ``|r|`` edges (an edge stays when
        it is among the top of either end).
    device : optional
        ``None``: CUDA when available. The moments stay on it.
    batch_size : int, default 64

    Returns
    -------
    FunctionalConnectivity
        ``.graph`` (a Connectome of the between-layer edges), ``.within`` (the within-layer
        pairs) and ``.blocks`` (every tested correlation matrix).

    Raises
    ------
    ConnectomeError
        An unknown method or layer, a bad ``fdr`` / ``top_k`` / ``between``.
    DataError
        No images, or fewer than 2 (no correlation).

    Notes
    -----
    Under ``torchrun`` (a default process group of several processes) every process reads
    its shard (``indices[rank::world]`` of a dataset, every world-th batch of tensors) and the
    moments are all-reduced once; ``"spearman"`` gathers the pooled activations instead. All
    processes return the same result.

    Examples
    --------
    >>> fc = functional_connectivity(model, images, method="pearson", top_k=5)   # doctest: +SKIP
    >>> fc.graph.edge_block("conv1", "conv2")                                   # doctest: +SKIP
    """
    if method not in METHODS:
        raise ConnectomeError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if between not in ("adjacent", "all", "none"):
        raise ConnectomeError(f"between must be 'adjacent', 'all' or 'none'; got {between!r}")
    if fdr is not None and (isinstance(fdr, bool) or not 0 < float(fdr) <= 1):
        raise ConnectomeError(f"fdr must be in (0, 1] or None; got {fdr!r}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ConnectomeError(f"top_k must be a positive integer or None; got {top_k!r}")
    glayers, picks, pairs, mom, stacked, n = _collect(model, data, layers, between, device, batch_size,
                                                      keep_values=method == "spearman")
    if stacked is not None:
        from scipy.stats import rankdata

        mom = Moments(picks, pairs)
        mom.update({i: rankdata(v, axis=0) for i, v in stacked.items()})
        means = {i: v.mean(0) for i, v in stacked.items()}
        stds = {i: v.std(0, ddof=1) if n > 1 else np.zeros(v.shape[1]) for i, v in stacked.items()}
    else:
        means = mom.mean
        stds = {i: np.sqrt(np.diag(mom.m2[(i, i)]) / max(n - 1, 1)) for i in picks}
    if n < 2:
        raise DataError(f"{n} image: correlations need at least 2 images (and 4 for p-values)")

    names = {i: glayers[i].name for i in picks}
    # A unit that does not vary has no correlation: its centred sum of squares is 0, or only
    # rounding noise of a constant (a dead ReLU, a constant feature) far below its mean.
    var = {i: np.diag(mom.m2[(i, i)]).copy() for i in picks}
    live = {i: var[i] > n * (1e-12 * np.abs(np.asarray(mom.mean[i]))) ** 2 for i in picks}
    var = {i: np.where(live[i], var[i], 0.0) for i in picks}
    blocks, k_cond = {}, {}
    for a, b in mom.pairs:
        if method == "partial":
            r = _partial(mom.m2, a, b, live)
            k_cond[(a, b)] = int(live[a].sum() + (live[b].sum() if a != b else 0)) - 2
        else:
            r = _corr(mom.m2[(a, b)], var[a], var[b])
            k_cond[(a, b)] = 0
        blocks[(a, b)] = r

    # every tested pair: within layers i < j, between layers all
    offsets = {}
    o = 0
    for i in picks:
        offsets[i] = o
        o += glayers[i].size
    us, vs, rs, ps, pair_of = [], [], [], [], []
    for (a, b), r in blocks.items():
        if a == b:
            ii, jj = np.triu_indices(r.shape[0], 1)
        else:
            ii, jj = np.indices(r.shape).reshape(2, -1)
        rr = r[ii, jj]
        pp = _p_values(rr, n, max(k_cond[(a, b)], 0), method)
        us.append(offsets[a] + ii)
        vs.append(offsets[b] + jj)
        rs.append(rr)
        ps.append(pp)
        pair_of.append(np.full(rr.size, len(pair_of)))
    u, v, r, p = (np.concatenate(z) if z else np.zeros(0) for z in (us, vs, rs, ps))
    u, v = u.astype(np.int64), v.astype(np.int64)
    which = np.concatenate(pair_of) if pair_of else np.zeros(0, dtype=np.int64)
    q = bh_adjust(p)
    keep = np.isfinite(r)
    if fdr is not None:
        keep &= q <= float(fdr)
    if top_k is not None and keep.any():
        sel = np.flatnonzero(keep)
        keep[sel[~_top_k(u[sel], v[sel], np.abs(r[sel]), int(top_k), o)]] = False

    pair_list = list(blocks)
    within: dict[str, dict[str, np.ndarray]] = {}
    src, dst, w, pk, qk = [], [], [], [], []
    for t, (a, b) in enumerate(pair_list):
        sel = keep & (which == t)
        if a == b:
            within[names[a]] = {"src": u[sel] - offsets[a], "dst": v[sel] - offsets[a], "r": r[sel], "p": p[sel],
                                "q": q[sel]}
        else:
            src.append(u[sel])
            dst.append(v[sel])
            w.append(r[sel])
            pk.append(p[sel])
            qk.append(q[sel])
    cat = (lambda z, dt: np.concatenate(z).astype(dt) if z else np.zeros(0, dtype=dt))
    src_a, dst_a = cat(src, np.int64), cat(dst, np.int64)
    weight = cat(w, np.float64)
    lay = [glayers[i] for i in picks]
    g = Connectome(
        layers=tuple(lay),
        node_units=np.concatenate([np.arange(l.size, dtype=np.int64) for l in lay]),
        src=src_a, dst=dst_a, weight=weight,
        edge_attrs={"abs_weight": np.abs(weight), "p": cat(pk, np.float64), "q": cat(qk, np.float64)},
        node_attrs={"activation_mean": np.concatenate([np.asarray(means[i], dtype=np.float64) for i in picks]),
                    "activation_std": np.concatenate([np.asarray(stds[i], dtype=np.float64) for i in picks])},
        meta={"kind": "functional", "method": method, "n_images": int(n), "fdr": fdr, "top_k": top_k,
              "between": between, "n_tested": int(r.size),
              "within_edges": {k: int(d["r"].size) for k, d in within.items()}},
    )
    return FunctionalConnectivity(
        graph=g, within=within, blocks={(names[a], names[b]): r for (a, b), r in blocks.items()},
        method=method, n_images=int(n), fdr=None if fdr is None else float(fdr),
        top_k=None if top_k is None else int(top_k),
    )


# ----------------------------------------------------------------------------- coupling
@dataclass(frozen=True)
class CouplingRow:
    """Coupling of two graphs on one layer pair: Spearman ``rho`` of the edge weights of the
    ``n_pairs`` unit pairs both graphs have, and its permutation ``p_value``, with the null's
    mean and standard deviation."""

    src_layer: str
    dst_layer: str
    n_pairs: int
    rho: float
    p_value: float
    null_mean: float
    null_std: float


@dataclass(frozen=True, eq=False)
class Coupling:
    """Per layer pair (and ``"all"`` pooled), how well two graphs' edge weights agree."""

    rows: tuple[CouplingRow, ...]
    overall: CouplingRow
    n_permutations: int
    absolute: bool

    def to_dict(self) -> dict[str, Any]:
        conv = (lambda d: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()})
        return {"n_permutations": self.n_permutations, "absolute": self.absolute,
                "overall": conv(self.overall.__dict__), "rows": [conv(r.__dict__) for r in self.rows]}

    def __repr__(self) -> str:
        lines = [f"Coupling({len(self.rows)} layer pairs, {self.n_permutations} permutations"
                 f"{', |weights|' if self.absolute else ''})"]
        for r in (*self.rows, self.overall):
            lines.append(f"  {r.src_layer + ' -> ' + r.dst_layer:<40} n={r.n_pairs:<7} rho={r.rho:+.3f}  "
                         f"p={r.p_value:.3g}  null {r.null_mean:+.3f} +- {r.null_std:.3f}")
        return "\n".join(lines)


def _graph_of(g: Any, which: str) -> Connectome:
    if isinstance(g, FunctionalConnectivity):
        return g.graph
    if not isinstance(g, Connectome):
        raise ConnectomeError(f"{which} must be a Connectome or a FunctionalConnectivity; got {type(g).__name__}")
    return g


def _rank_corr_with_null(x: np.ndarray, y: np.ndarray, n_perm: int, rng: np.random.Generator
                         ) -> tuple[float, float, float, float]:
    from scipy.stats import rankdata

    n = x.size
    if n < 3:
        return float("nan"), float("nan"), float("nan"), float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if den == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    rho = float(rx @ ry) / den
    if n_perm == 0:
        return rho, float("nan"), float("nan"), float("nan")
    null = np.empty(n_perm)
    chunk = max(1, (1 << 22) // n)
    for s in range(0, n_perm, chunk):
        m = min(chunk, n_perm - s)
        perm = rng.permuted(np.broadcast_to(ry, (m, n)), axis=1)
        null[s:s + m] = perm @ rx / den
    p = (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + n_perm)
    return rho, float(p), float(null.mean()), float(null.std(ddof=1)) if n_perm > 1 else float("nan")


def coupling(a: Any, b: Any, *, absolute: bool = False, n_permutations: int = 1000, seed: int = 0) -> Coupling:
    """Compare two graphs of one model on the unit pairs both have, per layer pair.

    Structural (weights), effective (attribution) and functional graphs share node ids;
    for every layer pair with edges in both, the edges present in both (same source and
    target node id) are paired, and their weights compared by the Spearman rank correlation.
    The null shuffles one graph's weights among those pairs (``n_permutations`` times,
    seeded); ``p_value = (1 + #{|rho_null| >= |rho|}) / (1 + n_permutations)`` (two-sided).

    Parameters
    ----------
    a, b : Connectome or FunctionalConnectivity
        For a FunctionalConnectivity its ``.graph`` (between-layer edges) is used; pass one
        computed with ``fdr=None`` to compare on every pair.
    absolute : bool, default False
        Compare ``|weight|`` instead of signed weights.
    n_permutations : int, default 1000
    seed : int, default 0

    Returns
    -------
    Coupling
        ``.rows`` per layer pair (in ``a``'s layer order), ``.overall`` on all shared pairs.

    Raises
    ------
    ConnectomeError
        Not graphs, or no unit pair in common.

    Examples
    --------
    >>> c = coupling(cn.extract.weights(model), functional_connectivity(model, x, fdr=None))  # doctest: +SKIP
    >>> c.overall.rho                                                                         # doctest: +SKIP
    """
    ga, gb = _graph_of(a, "a"), _graph_of(b, "b")
    if isinstance(n_permutations, bool) or int(n_permutations) != n_permutations or n_permutations < 0:
        raise ConnectomeError(f"n_permutations must be a non-negative integer; got {n_permutations!r}")
    n_permutations = int(n_permutations)
    ids_a, ids_b = ga.node_ids, gb.node_ids
    key_a = np.char.add(np.char.add(ids_a[ga.src].astype(str), "\t"), ids_a[ga.dst].astype(str))
    key_b = np.char.add(np.char.add(ids_b[gb.src].astype(str), "\t"), ids_b[gb.dst].astype(str))
    common, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    if common.size == 0:
        raise ConnectomeError("the two graphs share no unit pair (edge between the same two node ids); "
                              "pass graphs of one model, with a functional graph computed with fdr=None")
    wa, wb = ga.weight[ia].astype(np.float64), gb.weight[ib].astype(np.float64)
    if absolute:
        wa, wb = np.abs(wa), np.abs(wb)
    la, lb = ga.node_layer[ga.src[ia]], ga.node_layer[ga.dst[ia]]
    rng = np.random.default_rng(seed)
    rows = []
    names = ga.layer_names
    for s, d in sorted(set(zip(la.tolist(), lb.tolist()))):
        sel = (la == s) & (lb == d)
        rho, p, mu, sd = _rank_corr_with_null(wa[sel], wb[sel], n_permutations, rng)
        rows.append(CouplingRow(names[s], names[d], int(sel.sum()), rho, p, mu, sd))
    rho, p, mu, sd = _rank_corr_with_null(wa, wb, n_permutations, rng)
    overall = CouplingRow("all", "all", int(wa.size), rho, p, mu, sd)
    return Coupling(rows=tuple(rows), overall=overall, n_permutations=n_permutations, absolute=bool(absolute))
