"""Procedural "shapes" image dataset: the toolkit's embedded default data.

Nine categories are drawn so that they share parts the way natural
categories do, which gives trained networks reusable internal features worth
looking at as a connectome:

* curves: ``circle``, ``ring``, ``ellipse``
* straight edges and corners: ``square``, ``triangle``, ``cross``
* oriented texture: ``hstripes``, ``vstripes``, ``dstripes``

Every image has a random position, scale, rotation (stripes keep their class
orientation up to a small jitter), foreground/background colour pair,
illumination gradient and pixel noise.  Rendering uses signed distance
functions evaluated on coordinate grids for the whole batch at once, so no
Python code runs per pixel.

Normalisation
-------------
Images are rendered in ``[0, 1]`` and then standardised per channel with the
fixed constants :data:`MEAN` and :data:`STD` (measured on a large sample of the
generator's output), i.e. ``x = (img - MEAN) / STD``.  Channels therefore have
roughly zero mean and unit variance.  :func:`denormalize` undoes this for
plotting.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPE_CLASSES",
    "MEAN",
    "STD",
    "ShapesDataset",
    "shapes",
    "denormalize",
]

#: Class names, in label order.
SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "ring",
    "ellipse",
    "square",
    "triangle",
    "cross",
    "hstripes",
    "vstripes",
    "dstripes",
)

#: Per-channel mean of the rendered ``[0, 1]`` images (RGB).
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: Per-channel standard deviation of the rendered ``[0, 1]`` images (RGB).
STD: tuple[float, float, float] = (0.29, 0.29, 0.29)

# Rendering is done in chunks so memory stays bounded for large datasets;
# the chunk size is fixed because the noise stream depends on it.
_CHUNK = 2048


class ShapesDataset(Dataset):
    """In-memory dataset of rendered shape images.

    Parameters
    ----------
    images : torch.Tensor
        Normalised images, shape ``(N, 3, size, size)``, float32.
    targets : Sequence[int]
        Integer label of each image.
    seed : int
        Seed the images were generated from.

    Example
    -------
    >>> ds = shapes(2, seed=0)
    >>> image, label = ds[0]
    >>> tuple(image.shape), ds.classes[label] in SHAPE_CLASSES
    ((3, 32, 32), True)
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], seed: int) -> None:
        self.images = images
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(SHAPE_CLASSES)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.seed = seed
        self.size = int(images.shape[-1])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(n={len(self)}, classes={len(self.classes)}, "
            f"size={self.size}, seed={self.seed})"
        )


def shapes(n_per_class: int, seed: int = 0, size: int = 32) -> ShapesDataset:
    """Generate the procedural shapes dataset.

    Parameters
    ----------
    n_per_class : int
        Number of images of each of the ``len(SHAPE_CLASSES)`` classes.
    seed : int, optional
        Seed of the generator; the same seed always yields identical tensors.
    size : int, optional
        Height and width of the square images in pixels (at least 16).

    Returns
    -------
    ShapesDataset
        ``n_per_class * len(SHAPE_CLASSES)`` items in shuffled order; each
        item is ``(image, label)`` with ``image`` a float32 tensor of shape
        ``(3, size, size)`` normalised with :data:`MEAN` / :data:`STD`.
        ``.classes``, ``.targets`` and the stacked ``.images`` are exposed.

    Raises
    ------
    ValueError
        If ``n_per_class < 1`` or ``size < 16``.

    Example
    -------
    >>> ds = shapes(10, seed=0)
    >>> len(ds), ds.images.shape[1:], ds.classes[:3]
    (90, torch.Size([3, 32, 32]), ['circle', 'ring', 'ellipse'])
    """
    n_per_class = _as_int(n_per_class, "n_per_class")
    size = _as_int(size, "size")
    seed = _as_int(seed, "seed")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")

    rng = np.random.default_rng(seed)
    n_classes = len(SHAPE_CLASSES)
    labels = rng.permutation(np.repeat(np.arange(n_classes), n_per_class))
    params = _draw_params(rng, labels, size)
    images = np.empty((labels.size, 3, size, size), dtype=np.float32)
    for start in range(0, labels.size, _CHUNK):
        stop = min(start + _CHUNK, labels.size)
        chunk = {k: v[start:stop] for k, v in params.items()}
        images[start:stop] = _render(labels[start:stop], chunk, size, rng)
    mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(STD, dtype=np.float32)[:, None, None]
    images -= mean
    images /= std
    return ShapesDataset(torch.from_numpy(images), labels.tolist(), seed)


def denormalize(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Map normalised images back to displayable ``[0, 1]`` HWC arrays.

    Parameters
    ----------
    images : torch.Tensor or numpy.ndarray
        One image ``(3, H, W)`` or a batch ``(N, 3, H, W)`` as produced by
        :func:`shapes`.

    Returns
    -------
    numpy.ndarray
        Float32 array of shape ``(H, W, 3)`` or ``(N, H, W, 3)`` clipped to
        ``[0, 1]``, ready for ``matplotlib.pyplot.imshow``.

    Example
    -------
    >>> ds = shapes(1, seed=0)
    >>> denormalize(ds[0][0]).shape
    (32, 32, 3)
    """
    if isinstance(images, torch.Tensor):
        arr = images.detach().cpu().numpy()
    else:
        arr = np.asarray(images)
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (N, 3, H, W) images, got shape {arr.shape}")
    mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(STD, dtype=np.float32)[:, None, None]
    out = np.clip(arr.astype(np.float32) * std + mean, 0.0, 1.0)
    return np.moveaxis(out, -3, -1)


# Attach the constants to the function too: ``connectome.zoo.shapes`` is the
# function (the package re-exports it over the submodule), and plotting code
# written as ``zoo.shapes.MEAN`` should still work.
shapes.MEAN = MEAN  # type: ignore[attr-defined]
shapes.STD = STD  # type: ignore[attr-defined]
shapes.CLASSES = SHAPE_CLASSES  # type: ignore[attr-defined]
shapes.denormalize = denormalize  # type: ignore[attr-defined]


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _draw_params(rng: np.random.Generator, labels: np.ndarray, size: int) -> dict[str, np.ndarray]:
    # Every parameter is drawn for every image, whatever its class, so the
    # random stream (and thus each image) does not depend on the class mix.
    n = labels.size
    s = float(size)
    radius = rng.uniform(0.22, 0.40, n) * s
    p: dict[str, np.ndarray] = {
        "radius": radius,
        "cx": rng.uniform(radius, s - radius),
        "cy": rng.uniform(radius, s - radius),
        "theta": rng.uniform(0.0, 2.0 * np.pi, n),
        "aspect": rng.uniform(0.40, 0.62, n),
        "ring_width": rng.uniform(0.30, 0.50, n),
        "cross_width": rng.uniform(0.26, 0.38, n),
        "period": rng.uniform(0.13, 0.21, n) * s,
        "phase": rng.uniform(0.0, 1.0, n),
        "jitter": np.deg2rad(rng.uniform(-10.0, 10.0, n)),
        "disc_patch": rng.random(n) < 0.5,
        "fg": rng.random((n, 3)),
        # A per-channel offset of 0.3..0.7 (mod 1) guarantees at least 0.3
        # contrast in every channel between figure and ground.
        "bg_offset": rng.uniform(0.3, 0.7, (n, 3)),
        "grad_amp": rng.uniform(0.0, 0.2, n),
        "grad_dir": rng.uniform(0.0, 2.0 * np.pi, n),
        "noise": rng.uniform(0.02, 0.10, n),
    }
    return p


def _box(u: np.ndarray, v: np.ndarray, hu: np.ndarray, hv: np.ndarray) -> np.ndarray:
    qu = np.abs(u) - hu
    qv = np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    inside = np.minimum(np.maximum(qu, qv), 0.0)
    return outside + inside


def _sdf_circle(u, v, p):
    return np.hypot(u, v) - p["radius"]


def _sdf_ring(u, v, p):
    r = p["radius"]
    # Keep the band at least ~2 px wide so it survives at small sizes.
    width = np.maximum(r * p["ring_width"], 2.0)
    return np.abs(np.hypot(u, v) - (r - width / 2.0)) - width / 2.0


def _sdf_ellipse(u, v, p):
    a = p["radius"]
    b = a * p["aspect"]
    # First-order distance estimate k0 (k0 - 1) / k1: exact enough for the
    # one-pixel anti-aliasing band and cheap to vectorise.
    k0 = np.hypot(u / a, v / b)
    k1 = np.hypot(u / (a * a), v / (b * b))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _sdf_square(u, v, p):
    half = 0.75 * p["radius"]
    return _box(u, v, half, half)


def _sdf_triangle(u, v, p):
    # Equilateral triangle with circumradius ``radius``: intersection of three
    # half-planes whose normals are 120 degrees apart, at the inradius r/2.
    r = p["radius"]
    d = None
    for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        plane = np.cos(ang) * u + np.sin(ang) * v - r / 2.0
        d = plane if d is None else np.maximum(d, plane)
    return d


def _sdf_cross(u, v, p):
    arm = 0.95 * p["radius"]
    width = np.maximum(p["radius"] * p["cross_width"], 1.5)
    return np.minimum(_box(u, v, arm, width), _box(u, v, width, arm))


def _stripes(normal_angle: float) -> Callable:
    def sdf(u, v, p, dx, dy):
        r = p["radius"]
        patch = np.where(p["disc_patch"], np.hypot(u, v) - r, _box(u, v, 0.8 * r, 0.8 * r))
        # Stripe direction is in image coordinates (not the rotated frame):
        # orientation is what defines these classes.
        ang = normal_angle + p["jitter"]
        s = dx * np.cos(ang) + dy * np.sin(ang)
        t = np.mod(s / p["period"] + p["phase"], 1.0)
        band = (np.abs(t - 0.5) - 0.25) * p["period"]
        # Intersection of the stripe set with the patch.
        return np.maximum(band, patch)

    return sdf


_SHAPE_SDF: dict[int, Callable] = {
    0: _sdf_circle,
    1: _sdf_ring,
    2: _sdf_ellipse,
    3: _sdf_square,
    4: _sdf_triangle,
    5: _sdf_cross,
}
# Image y grows downwards, so a normal along +y gives horizontal stripes.
_STRIPE_SDF: dict[int, Callable] = {
    6: _stripes(np.pi / 2),
    7: _stripes(0.0),
    8: _stripes(np.pi / 4),
}


def _render(labels: np.ndarray, p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    n = labels.size
    grid = np.arange(size, dtype=np.float32) + 0.5
    col = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]  # noqa: E731
    dx = grid[None, None, :] - col(p["cx"])
    dy = grid[None, :, None] - col(p["cy"])
    cos_t, sin_t = col(np.cos(p["theta"])), col(np.sin(p["theta"]))
    u = cos_t * dx + sin_t * dy
    v = -sin_t * dx + cos_t * dy

    mask = np.zeros((n, size, size), dtype=np.float32)
    for label in range(len(SHAPE_CLASSES)):
        idx = np.flatnonzero(labels == label)
        if idx.size == 0:
            continue
        sub = {k: (col(val[idx]) if val.ndim == 1 else val[idx]) for k, val in p.items()}
        ui, vi = u[idx], v[idx]
        if label in _SHAPE_SDF:
            dist = _SHAPE_SDF[label](ui, vi, sub)
        else:
            dist = _STRIPE_SDF[label](ui, vi, sub, dx[idx], dy[idx])
        # Coverage of a 1-px wide band around the boundary: cheap anti-aliasing.
        mask[idx] = np.clip(0.5 - dist, 0.0, 1.0)

    fg = p["fg"].astype(np.float32)
    bg = np.mod(p["fg"] + p["bg_offset"], 1.0).astype(np.float32)
    m = mask[:, None]
    img = bg[:, :, None, None] * (1.0 - m) + fg[:, :, None, None] * m
    centred_x = (grid[None, None, :] - size / 2.0) / size
    centred_y = (grid[None, :, None] - size / 2.0) / size
    gradient = col(p["grad_amp"]) * (
        col(np.cos(p["grad_dir"])) * centred_x + col(np.sin(p["grad_dir"])) * centred_y
    )
    img += gradient[:, None]
    noise = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    img += noise * np.asarray(p["noise"], dtype=np.float32)[:, None, None, None]
    return np.clip(img, 0.0, 1.0)
