"""Compare the unit activations of one model on two images.

The classic first question about a network's units: which units respond differently to
these two images? Per layer, :func:`compare_activations` ranks units by the difference of
their (spatially averaged) activations and correlates the two activation vectors; the
spatial maps of the top units are kept for plotting.

References
----------
Zeiler, M. D. & Fergus, R. (2014). Visualizing and Understanding Convolutional Networks. ECCV.
Olah, C. et al. (2020). Zoom In: An Introduction to Circuits. Distill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["compare_activations", "ActivationComparison", "LayerActivationDiff"]


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3f}"


@dataclass(frozen=True, eq=False)
class LayerActivationDiff:
    """The units of one layer that differ most between image A and image B.

    Attributes
    ----------
    layer : str
    units : ndarray of int64, shape (k,)
        Unit indices, largest ``|diff|`` first (ties by unit index).
    node_ids : tuple of str
        ``"<layer>:<unit>"`` of those units.
    a, b : ndarray, shape (k,)
        Their activations (spatial means) on image A and on image B.
    diff : ndarray, shape (k,)
        ``a - b``: positive where the unit responds more to image A.
    correlation : float
        Pearson correlation of the layer's full activation vectors on A and B (1 when
        they are identical; NaN when one is constant and they differ).
    """

    layer: str
    units: np.ndarray
    node_ids: tuple[str, ...]
    a: np.ndarray
    b: np.ndarray
    diff: np.ndarray
    correlation: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "units": self.units.tolist(),
            "node_ids": list(self.node_ids),
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "diff": self.diff.tolist(),
            "correlation": self.correlation if math.isfinite(self.correlation) else None,
        }

    def __repr__(self) -> str:
        tops = ", ".join(f"{u} ({d:+.3g})" for u, d in zip(self.units[:5].tolist(), self.diff[:5].tolist()))
        more = f", ... ({self.units.size} units)" if self.units.size > 5 else ""
        return f"LayerActivationDiff({self.layer!r}: corr {_fmt(self.correlation)}; top units (a - b): {tops}{more})"


@dataclass(frozen=True, eq=False)
class ActivationComparison:
    """Per layer, the units whose activations differ most between two images.

    Behaves as a read-only mapping ``layer name -> LayerActivationDiff``.

    Attributes
    ----------
    per_layer : tuple of LayerActivationDiff
        In layer order.
    activations_a, activations_b : dict of str -> ndarray, shape (units,)
        Every unit's activation (spatial mean) on each image.
    maps : dict of str -> ndarray, shape (2, k, H, W)
        Spatial maps of the top units on image A (``[0]``) and B (``[1]``), for layers with
        spatial maps (when ``keep_maps``).
    top : int
    """

    per_layer: tuple[LayerActivationDiff, ...]
    activations_a: dict[str, np.ndarray]
    activations_b: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    top: int

    @property
    def layers(self) -> list[str]:
        return [r.layer for r in self.per_layer]

    @property
    def correlations(self) -> dict[str, float]:
        """Correlation of the two activation vectors per layer."""
        return {r.layer: r.correlation for r in self.per_layer}

    def __getitem__(self, layer: str) -> LayerActivationDiff:
        for r in self.per_layer:
            if r.layer == layer:
                return r
        raise KeyError(f"no layer {layer!r}; layers are {self.layers}")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.per_layer)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (maps and full activation vectors left out)."""
        return {"top": self.top, "layers": [r.to_dict() for r in self.per_layer]}

    def __repr__(self) -> str:
        w = max([len(l) for l in self.layers] + [5])
        lines = [f"ActivationComparison({len(self.per_layer)} layers, top={self.top}; diff = image A - image B)",
                 f"  {'layer':<{w}}  {'corr':>6}  top units (diff)"]
        for r in self.per_layer:
            tops = ", ".join(f"{u} ({d:+.3g})" for u, d in zip(r.units[:3].tolist(), r.diff[:3].tolist()))
            more = " ..." if r.units.size > 3 else ""
            lines.append(f"  {r.layer:<{w}}  {_fmt(r.correlation):>6}  {tops}{more}")
        return "\n".join(lines)


def _as_image(x: Any, which: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"image_{which} must be a tensor (C, H, W) or (1, C, H, W), got {type(x).__name__}")
    if x.dim() >= 2 and x.shape[0] == 1 and x.dim() in (2, 4):
        return x.detach()
    if x.dim() in (1, 3):
        return x.detach()[None]
    raise ValueError(f"image_{which} must have shape (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return float("nan")
    if np.array_equal(a, b):
        return 1.0
    ca, cb = a - a.mean(), b - b.mean()
    den = math.sqrt(float((ca * ca).sum()) * float((cb * cb).sum()))
    if den <= 0:
        return float("nan")
    return float(np.clip((ca * cb).sum() / den, -1.0, 1.0))


def compare_activations(
    model: nn.Module,
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    layers: Sequence[str] | None = None,
    top: int = 10,
    device: Any = None,
    *,
    keep_maps: bool = True,
) -> ActivationComparison:
    """The units whose activations differ most between two images, per layer.

    A unit's activation is its map after BatchNorm and nonlinearity, before any pooling or
    flattening, averaged over spatial positions. Each image runs alone, so two identical
    images give exactly zero differences.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable model; runs in eval mode under ``torch.inference_mode`` and is
        left as found.
    image_a, image_b : Tensor, shape (C, H, W) or (1, C, H, W)
        The two images (preprocessed as the model expects), of one shape.
    layers : sequence of str, optional
        Graph layer names; default every layer but the input.
    top : int, default 10
        Units kept per layer (all of them when a layer has fewer).
    device : optional
        ``None``: CUDA when available, else CPU.
    keep_maps : bool, default True
        Keep the spatial maps of the top units in ``.maps``.

    Returns
    -------
    ActivationComparison

    Raises
    ------
    ConnectomeError
        A layer that is not in the model.
    ValueError
        Images of different shapes, or not single images.

    Examples
    --------
    >>> c = compare_activations(model, img_cat, img_dog, top=5)        # doctest: +SKIP
    >>> c["conv2"].node_ids[:2], c["conv2"].diff[:2]                    # doctest: +SKIP
    (('conv2:7', 'conv2:3'), array([ 1.9, -1.2]))

    References
    ----------
    Zeiler, M. D. & Fergus, R. (2014). Visualizing and Understanding Convolutional Networks. ECCV.
    """
    from connectome.extract.probe import profile_node, traced
    from connectome.extract.trace import run_nodes
    from connectome.extract.targets import as_layer_names

    if isinstance(top, bool) or int(top) != top or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    top = int(top)
    a, b = _as_image(image_a, "a"), _as_image(image_b, "b")
    if a.shape != b.shape:
        raise ValueError(f"the two images differ in shape: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}; "
                         "preprocess both to the model's input size")
    if layers is not None:
        layers = as_layer_names(layers)
        if not layers:
            raise ValueError("layers is empty; pass layer names or None for all")
    with traced(model, a, device) as t:
        if layers is None:
            picks = [i for i, l in enumerate(t.layers) if l.kind != "input"]
        else:
            picks = []
            for name in layers:
                picks.append(t.resolve(name, where="in the model's unit graph"))
        nodes: dict[str, list[int]] = {}
        for i in picks:
            nodes.setdefault(profile_node(t, i), []).append(i)
        values: dict[int, list[np.ndarray]] = {i: [] for i in picks}

        def on_value(node: Any, v: Any) -> Any:
            # Copied when produced: a later in-place op (``out += identity``) may overwrite v.
            for i in nodes.get(node.name, ()):
                values[i].append(v.detach().reshape(1, t.ug.layers[i].size, *v.shape[2:]).double().cpu().numpy().copy())
            return v

        # One image per forward: identical images then give bit-identical activations.
        for img in (a, b):
            run_nodes(t.ug.gm, (img.to(t.device, dtype=t.dtype),), on_value=on_value)
        glayers = [t.layers[i] for i in picks]
    per_layer, maps, va, vb = [], {}, {}, {}
    for i, layer in zip(picks, glayers):
        v = np.concatenate(values[i])  # (2, units[, H, W])
        means = v.reshape(2, v.shape[1], -1).mean(-1)
        d = means[0] - means[1]
        order = np.lexsort((np.arange(d.size), -np.abs(d)))[:top]
        per_layer.append(LayerActivationDiff(
            layer=layer.name,
            units=order.astype(np.int64),
            node_ids=tuple(f"{layer.name}:{u}" for u in order.tolist()),
            a=means[0, order],
            b=means[1, order],
            diff=d[order],
            correlation=_pearson(means[0], means[1]),
        ))
        va[layer.name], vb[layer.name] = means[0], means[1]
        if keep_maps and v.ndim == 4:
            maps[layer.name] = v[:, order].astype(np.float32)
    return ActivationComparison(per_layer=tuple(per_layer), activations_a=va, activations_b=vb, maps=maps, top=top)
