"""Small graphs with answers worked out by hand, for tests, docstrings and examples.

Nothing here runs a model. ``flow_graph`` turns hand-written flows into an attribution graph
whose node attributes satisfy conservation (a unit's ``attribution`` is its total outgoing
flow, and its incoming flow plus ``bias_attribution``); the other builders use it.
``wired_mlp`` builds (does not run) a two-layer model with hand-set weights.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from connectome.graph import Connectome

__all__ = [
    "flow_graph",
    "toy_attribution",
    "toy_two_groups",
    "random_flow_graph",
    "random_layered_graph",
    "wired_mlp",
]


def wired_mlp(hidden_weight: Any, hidden_bias: Any, out_weight: Any, out_bias: Any) -> Any:
    """``input -> hidden -> ReLU -> logits`` with the given weights, in eval mode.

    The modules are named ``hidden``, ``relu`` and ``out`` (so the hidden units are
    ``hidden:0``, ``hidden:1``, ...); the sizes are those of the weights (``hidden_weight`` is
    ``(hidden, input)``, ``out_weight`` ``(classes, hidden)``), all float32.
    """
    from collections import OrderedDict

    import torch
    import torch.nn as nn

    hw, hb, ow, ob = (torch.as_tensor(v, dtype=torch.float32)
                      for v in (hidden_weight, hidden_bias, out_weight, out_bias))
    m = nn.Sequential(OrderedDict(hidden=nn.Linear(hw.shape[1], hw.shape[0]), relu=nn.ReLU(),
                                  out=nn.Linear(ow.shape[1], ow.shape[0])))
    with torch.no_grad():
        for p, v in ((m.hidden.weight, hw), (m.hidden.bias, hb), (m.out.weight, ow), (m.out.bias, ob)):
            p.copy_(v)
    return m.eval()


def flow_graph(
    layers: Iterable[Any],
    edges: Iterable[tuple[str, str, float]],
    meta: Mapping[str, Any] | None = None,
    bias: Mapping[str, float] | None = None,
) -> Connectome:
    """An attribution graph from hand-written flows, with conserved node attribution.

    ``attribution`` of a unit is the sum of its outgoing flows; for units without outgoing
    edges (the output layer) it is the sum of incoming flows plus its bias term.
    ``bias_attribution`` is ``attribution - incoming flow`` (zero for units given no bias and
    whose in- and out-flows agree).
    """
    g = Connectome.from_edges(layers, edges, meta=dict(meta or {}))
    n = g.num_nodes
    w = np.asarray(g.weight, dtype=np.float64)
    out = np.bincount(g.src, weights=w, minlength=n)
    inc = np.bincount(g.dst, weights=w, minlength=n)
    has_out = np.bincount(g.src, minlength=n) > 0
    b = np.zeros(n)
    for nid, v in (bias or {}).items():
        b[g.index_of(nid)] = v
    attribution = np.where(has_out, out, inc + b)
    bias_attr = np.where(g.node_layer == 0, 0.0, attribution - inc)
    return g.with_node_attrs(attribution=attribution, bias_attribution=bias_attr)


_CLASSES = ("cat", "dog")


def toy_attribution(category: str = "cat") -> Connectome:
    """input(3) -> h1(4) -> h2(4) -> logits(2), the attribution graph of one category.

    For ``"cat"`` (class 0, logit total 10) the flow runs mostly through ``h2:0, h2:1``,
    ``h1:0, h1:1`` and ``in:0, in:1``; ``circuit(g, mass=0.8)`` keeps exactly those units
    and ``logits:0``:

    - into ``logits:0``: h2:0 6, h2:1 3, h2:2 0.5, h2:3 0.5 -> keep h2:0, h2:1 (9 >= 8);
    - into {h2:0, h2:1}: h1:0 4.5, h1:1 3.5, h1:2 0.6, h1:3 0.4 -> keep h1:0, h1:1 (8 >= 7.2);
    - into {h1:0, h1:1}: in:1 5.0, in:0 3.5, in:2 |-0.5| -> keep in:1, in:0 (8.5 >= 7.2).

    ``"dog"`` (class 1) is the mirror image: the same flows on units ``3 - i`` of the
    hidden and input layers (input ``2 - i``) into ``logits:1``.
    """
    if category not in _CLASSES:
        raise ValueError(f"category must be one of {_CLASSES}, got {category!r}")
    layers = [
        ("in", "input", 3),
        ("h1", "linear", 4),
        ("h2", "linear", 4),
        ("logits", "output", 2, _CLASSES),
    ]
    cat_edges = [
        ("h2:0", "logits:0", 6.0),
        ("h2:1", "logits:0", 3.0),
        ("h2:2", "logits:0", 0.5),
        ("h2:3", "logits:0", 0.5),
        ("h1:0", "h2:0", 4.0),
        ("h1:1", "h2:0", 1.5),
        ("h1:2", "h2:0", 0.3),
        ("h1:3", "h2:0", 0.2),
        ("h1:0", "h2:1", 0.5),
        ("h1:1", "h2:1", 2.0),
        ("h1:2", "h2:1", 0.3),
        ("h1:3", "h2:1", 0.2),
        ("h1:2", "h2:2", 0.5),
        ("h1:3", "h2:3", 0.5),
        ("in:0", "h1:0", 3.5),
        ("in:1", "h1:0", 1.0),
        ("in:1", "h1:1", 4.0),
        ("in:2", "h1:1", -0.5),
        ("in:2", "h1:2", 1.1),
        ("in:0", "h1:3", 0.9),
    ]
    if category == "cat":
        edges = cat_edges
    else:
        def mirror(nid: str) -> str:
            layer, _, u = nid.partition(":")
            size = {"in": 3, "h1": 4, "h2": 4, "logits": 2}[layer]
            return f"{layer}:{size - 1 - int(u)}"

        edges = [(mirror(s), mirror(d), w) for s, d, w in cat_edges]
    target = _CLASSES.index(category)
    return flow_graph(
        layers,
        edges,
        meta={"model": "toy", "method": "attribution", "target": "label", "category": category,
              "target_class": target, "n_images": 1},
    )


def toy_two_groups() -> Connectome:
    """in(4) -> h1(6) -> h2(6) -> logits(1) with two obvious groups in each hidden layer.

    Units 0-2 of each hidden layer form one pathway (fed by in:0, in:1), units 3-5 the other
    (fed by in:2, in:3); the pathways meet only at ``logits:0``. Within a pathway every unit
    spreads its flow evenly, so the flow profiles of a group are identical up to scale.
    """
    layers = [("in", "input", 4), ("h1", "linear", 6), ("h2", "linear", 6), ("logits", "output", 1)]
    edges: list[tuple[str, str, float]] = []
    for group in (0, 1):
        hid = range(3 * group, 3 * group + 3)
        ins = range(2 * group, 2 * group + 2)
        scale = 1.0 + group  # different magnitudes: grouping must not be by size
        for j in hid:
            edges.append((f"h2:{j}", "logits:0", 3.0 * scale * (1 + 0.1 * (j % 3))))
        for j in hid:
            for i in hid:
                edges.append((f"h1:{i}", f"h2:{j}", scale * (1 + 0.1 * (j % 3))))
        for i in hid:
            for s in ins:
                edges.append((f"in:{s}", f"h1:{i}", scale))
    return flow_graph(layers, edges, meta={"model": "toy", "method": "attribution", "category": "only",
                                           "target_class": 0})


def random_flow_graph(
    sizes: Sequence[int],
    seed: int = 0,
    density: float = 0.6,
    skip: float = 0.0,
    negative: float = 0.2,
    total: float = 10.0,
) -> Connectome:
    """A random attribution graph with conserved flow into ``logits:0``.

    Built top-down: each unit's attribution is split over random inputs (from the previous
    layer, and with probability ``skip`` per pair from earlier ones), some of them negative.
    Layers are ``in, h1, ..., logits``; the last size is the number of classes and class 0
    is the target.
    """
    rng = np.random.default_rng(seed)
    names = ["in"] + [f"h{i}" for i in range(1, len(sizes) - 1)] + ["logits"]
    kinds = ["input"] + ["linear"] * (len(sizes) - 2) + ["output"]
    labels = tuple(f"c{i}" for i in range(sizes[-1]))
    layers = [(n, k, s) for n, k, s in zip(names[:-1], kinds[:-1], sizes[:-1])]
    layers.append((names[-1], kinds[-1], sizes[-1], labels))
    attr = {"logits:0": float(total)}
    edges: dict[tuple[str, str], float] = {}
    for li in range(len(sizes) - 1, 0, -1):
        for u in range(sizes[li]):
            nid = f"{names[li]}:{u}"
            a = attr.get(nid, 0.0)
            if a == 0.0:
                continue
            cands = [f"{names[li - 1]}:{v}" for v in range(sizes[li - 1]) if rng.random() < density]
            if not cands:
                cands = [f"{names[li - 1]}:{int(rng.integers(sizes[li - 1]))}"]
            for lj in range(li - 1):
                cands += [f"{names[lj]}:{v}" for v in range(sizes[lj]) if rng.random() < skip]
            r = rng.exponential(1.0, len(cands)) + 0.05
            r[rng.random(len(cands)) < negative] *= -1
            if r.sum() < 0.3 * np.abs(r).sum():
                r = np.abs(r)
            flows = a * r / r.sum()
            for s, f in zip(cands, flows):
                edges[(s, nid)] = edges.get((s, nid), 0.0) + float(f)
                attr[s] = attr.get(s, 0.0) + float(f)
    return flow_graph(
        layers,
        [(s, d, w) for (s, d), w in edges.items()],
        meta={"model": "random", "method": "attribution", "target": "label", "category": "c0",
              "target_class": 0},
    )


def random_layered_graph(
    sizes: Sequence[int],
    p: float = 0.3,
    seed: int = 0,
    names: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
) -> Connectome:
    """A random layered DAG: each pair of units of consecutive layers is wired with probability ``p``.

    Weights are signed, ``N(0, 1)``. Layers default to ``in, h1, ..., out``.
    """
    rng = np.random.default_rng(seed)
    n_l = len(sizes)
    names = list(names) if names is not None else ["in"] + [f"h{i}" for i in range(1, n_l - 1)] + ["out"]
    kinds = list(kinds) if kinds is not None else ["input"] + ["linear"] * (n_l - 2) + ["output"]
    offsets = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for li in range(n_l - 1):
        m = rng.random((sizes[li], sizes[li + 1])) < p
        i, j = np.nonzero(m)
        src.append(i + offsets[li])
        dst.append(j + offsets[li + 1])
    src_a = np.concatenate(src) if src else np.zeros(0, np.int64)
    dst_a = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    w = rng.normal(size=src_a.size)
    return Connectome(
        layers=tuple((n, k, s) for n, k, s in zip(names, kinds, sizes)),
        node_units=np.concatenate([np.arange(s) for s in sizes]),
        src=src_a,
        dst=dst_a,
        weight=w,
        meta={"model": "random", "method": "weights"},
    )
