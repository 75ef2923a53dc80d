"""Images in: ImageFolder paths, datasets, loaders, tensor pairs; one loader out."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from connectome.errors import DataError

__all__ = ["default_transform", "make_loader", "LoaderInfo", "dataset_targets", "unpack_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def default_transform(size: int = 224) -> Callable[[Any], torch.Tensor]:
    """Resize to ``size * 8/7``, center-crop ``size``, ImageNet normalisation (torchvision's recipe)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(round(size * 256 / 224))),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass(frozen=True)
class _Skipped:
    path: str
    reason: str


class _SafeImageFolder(Dataset):
    """ImageFolder whose undecodable files come back as a marker instead of an exception."""

    def __init__(self, root: Path, transform: Callable[[Any], Any]):
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import default_loader

        try:
            self.inner = ImageFolder(str(root), transform=None, loader=default_loader, allow_empty=True)
        except FileNotFoundError as exc:
            raise DataError(f"image folder {str(root)!r} has no class sub-folders: {exc}; expected one sub-folder of images per category") from None
        if not self.inner.classes:
            raise DataError(f"image folder {str(root)!r} has no class sub-folders; expected ROOT/<category>/<image files>")
        self.transform = transform
        self.classes = list(self.inner.classes)
        self.targets = list(self.inner.targets)
        self.samples = list(self.inner.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        try:
            img = self.inner.loader(path)
            img = self.transform(img)
        except Exception as exc:  # PIL raises many kinds for a bad file
            return _Skipped(path, f"{type(exc).__name__}: {exc}"), target
        return img, target


def _collate(batch: list[tuple[Any, Any]]) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    good = [(x, y) for x, y in batch if not isinstance(x, _Skipped)]
    skipped = [x.path for x, _ in batch if isinstance(x, _Skipped)]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), skipped
    xs = torch.stack([torch.as_tensor(x) for x, _ in good])
    ys = torch.as_tensor([int(y) for _, y in good], dtype=torch.long)
    return xs, ys, skipped


def unpack_batch(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """A batch as ``(images, labels or None, skipped paths)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None, []
    if isinstance(batch, (tuple, list)):
        if len(batch) == 3 and isinstance(batch[2], list):
            return batch[0], batch[1], batch[2]
        if len(batch) >= 2:
            y = batch[1]
            if not isinstance(y, torch.Tensor):
                try:
                    y = torch.as_tensor(y)
                except (TypeError, ValueError, RuntimeError):
                    raise DataError(
                        f"labels must be integer class indices; the data gives {type(y).__name__} labels such as "
                        f"{str(y)[:40]!r}"
                    ) from None
            if y.dim() != 1 or (y.is_floating_point() and not torch.equal(y, y.round())):
                raise DataError(
                    f"labels must be integer class indices of shape (batch,), got {y.dtype} of shape {tuple(y.shape)}"
                    + (" (one-hot? map them with argmax(1))" if y.dim() == 2 else "")
                )
            return batch[0], y.long(), []
        if len(batch) == 1:
            return batch[0], None, []
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"], batch.get("label"), []
    raise DataError(
        f"a data batch is a {type(batch).__name__}; expected (images, labels) tensors as a DataLoader of an "
        "ImageFolder or TensorDataset yields"
    )


@dataclass
class LoaderInfo:
    """What :func:`make_loader` found out about the data."""

    loader: DataLoader
    dataset: Any
    classes: list[str] | None
    n_images: int | None
    skipped: list[str] = field(default_factory=list)


def dataset_targets(dataset: Any) -> list[int] | None:
    """Labels of every item without reading images, when the dataset says them."""
    if isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return [int(v) for v in dataset.tensors[1].tolist()]
    t = getattr(dataset, "targets", None)
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.tolist()]
    return [int(v) for v in t]


def make_loader(
    data: Any,
    batch_size: int = 64,
    transform: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Any = None,
    image_size: int = 224,
) -> LoaderInfo:
    """One DataLoader for any supported data input.

    Parameters
    ----------
    data : str, Path, Dataset, DataLoader, Tensor or (Tensor, Tensor)
        An ImageFolder directory (ROOT/<category>/<images>), a dataset or loader yielding
        ``(image, label)``, images alone, or an ``(images, labels)`` pair.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = None
    if isinstance(data, (str, Path)):
        root = Path(data)
        if not root.exists():
            raise DataError(f"data folder {str(root)!r} does not exist; pass an ImageFolder directory (ROOT/<category>/<images>)")
        if not root.is_dir():
            raise DataError(f"data path {str(root)!r} is a file; pass an ImageFolder directory (ROOT/<category>/<images>)")
        ds = _SafeImageFolder(root, transform or default_transform(image_size))
        if len(ds) == 0:
            raise DataError(f"image folder {str(root)!r} holds no images with extensions {IMAGE_EXTENSIONS}")
        classes = ds.classes
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                            pin_memory=pin_memory, collate_fn=_collate, persistent_workers=False)
        return LoaderInfo(loader, ds, classes, len(ds))
    if isinstance(data, DataLoader):
        ds = data.dataset
        classes = getattr(ds, "classes", None)
        n = len(ds) if hasattr(ds, "__len__") else None
        if n == 0:
            raise DataError("the DataLoader's dataset is empty; give it at least one image")
        return LoaderInfo(data, ds, list(classes) if classes is not None else None, n)
    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = data
        if x.dim() == 3:  # one image
            x = x[None]
        if y.dim() == 0:
            y = y[None]
        if y.dim() != 1:
            raise DataError(
                f"labels must be class indices of shape (N,), got a tensor of shape {tuple(y.shape)}"
                + (" (one-hot? use labels.argmax(1))" if y.dim() == 2 else "")
            )
        if x.shape[0] != y.shape[0]:
            raise DataError(f"images and labels differ in length: {x.shape[0]} images, {y.shape[0]} labels")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise DataError("labels must be integer class indices; these are fractional (probabilities?)")
        data = TensorDataset(x, y.long())
    if isinstance(data, Dataset):
        n = len(data) if hasattr(data, "__len__") else None
        if n == 0:
            raise DataError("the dataset is empty; give it at least one image")
        classes = getattr(data, "classes", None)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                            pin_memory=pin_memory)
        return LoaderInfo(loader, data, list(classes) if classes is not None else None, n)
    raise DataError(
        f"cannot read images from a {type(data).__name__}; pass an ImageFolder path, a Dataset or DataLoader "
        "of (image, label), or an (images, labels) tensor pair"
    )


def warn_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        names = ", ".join(repr(s) for s in list(skipped)[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} image(s) that could not be decoded: {names}", stacklevel=3)
