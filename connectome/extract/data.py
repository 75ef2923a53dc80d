"""Images in: ImageFolder paths, datasets, loaders, tensor pairs; one loader out.

Tensors are cut into batches by slicing (views: no per-image collation, and no DataLoader in
the plain path); tensors already on the GPU stay there. When the run is on CUDA, CPU batches
are pinned by a background thread one or two batches ahead, so that the copy to the device is
asynchronous (a copy from pageable memory waits for the GPU to finish its queued work). An
ImageFolder is decoded by worker processes by default.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset, TensorDataset

from connectome.errors import DataError

__all__ = ["default_transform", "make_loader", "subset_loader", "CategoryBatches", "LoaderInfo", "TensorLoader",
           "dataset_targets", "unpack_batch", "default_num_workers", "image_samples"]

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
    """ImageFolder whose undecodable files come back as a marker instead of an exception.

    Its files are torchvision's ``ImageFolder``'s, in the same order, but each file counts
    once however many links lead to it (see :func:`image_samples`), and 16-bit grey images
    are scaled, not clipped (:func:`connectome._image.read_rgb`).
    """

    def __init__(self, root: Path, transform: Callable[[Any], Any]):
        from torchvision.datasets.folder import find_classes

        from connectome._image import read_rgb

        try:
            classes, class_to_idx = find_classes(str(root))
        except FileNotFoundError as exc:
            raise DataError(f"image folder {str(root)!r} has no class sub-folders: {exc}; expected one sub-folder of images per category") from None
        if not classes:
            raise DataError(f"image folder {str(root)!r} has no class sub-folders; expected ROOT/<category>/<image files>")
        self.loader = read_rgb
        self.transform = transform
        self.classes = list(classes)
        self.samples = image_samples(str(root), class_to_idx)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        try:
            img = self.loader(path)
            img = self.transform(img)
        except Exception as exc:  # PIL raises many kinds for a bad file
            return _Skipped(path, f"{type(exc).__name__}: {exc}"), target
        return img, target


def image_samples(root: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image file of an ImageFolder, each file once.

    The order is torchvision's ``ImageFolder``'s (by category, folder path, file name), and
    so is the result on a folder without links. Links are followed, each folder and file
    once by its real path: the category folders themselves (also when they are links) and
    the real folders under them are read first; a folder link is then followed only to a
    folder that is not already part of the data (a link back to the root, to a folder
    above it, to another category or to itself is not: torchvision follows such a loop
    about 40 times, counting each image that often). A file link to a file its category
    already holds is left out. What was not read twice is said in one warning.
    """
    seen = {os.path.realpath(root)}  # real folders read (or queued) so far
    tops = [(os.path.join(root, c), i) for c, i in sorted(class_to_idx.items())]
    seen.update(os.path.realpath(p) for p, _ in tops)
    # per folder read: (class, folder as found, its real path, image names, {link name: real target})
    folders: list[tuple[int, str, str, list[str], dict[str, str]]] = []
    links: list[tuple[str, int]] = []  # folder links, followed once every real folder is known
    repeated: list[str] = []  # folder links to a folder already read

    def scan(top: str, real_top: str, cls: int, follow: bool) -> None:
        stack = [(top, real_top)]
        while stack:
            folder, real = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:  # unreadable folder: os.walk (torchvision) skips it too
                continue
            names: list[str] = []
            file_links: dict[str, str] = {}
            subs = []
            for e in entries:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    subs.append(e)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(e.name)
                    if e.is_symlink():
                        file_links[e.name] = os.path.realpath(e.path)
            folders.append((cls, folder, real, names, file_links))
            for e in sorted(subs, key=lambda d: d.name, reverse=True):  # depth first, by name
                link = e.is_symlink()
                if link and not follow:
                    links.append((e.path, cls))
                    continue
                r = os.path.realpath(e.path) if link else os.path.join(real, e.name)
                if r in seen:
                    repeated.append(e.path)
                    continue
                seen.add(r)
                stack.append((e.path, r))

    for top, cls in tops:
        if os.path.isdir(top):
            scan(top, os.path.realpath(top), cls, follow=False)
    for link, cls in sorted(links):  # into folders that are not part of the data otherwise
        r = os.path.realpath(link)
        if r in seen:
            repeated.append(link)
            continue
        seen.add(r)
        scan(link, r, cls, follow=True)
    held: dict[str, tuple[int, set[str]]] = {}  # real folder -> its class and the files in it that are not links
    if any(f[4] for f in folders):
        held = {real: (cls, set(names) - set(fl)) for cls, _, real, names, fl in folders}
    linked: set[tuple[str, int]] = set()
    twice = 0
    out: list[tuple[str, int]] = []
    for cls, folder, _, names, file_links in sorted(folders, key=lambda f: (f[0], f[1])):
        for name in sorted(names):
            target = file_links.get(name)
            if target is not None:
                where = held.get(os.path.dirname(target))
                if (where is not None and where[0] == cls and os.path.basename(target) in where[1]) \
                        or (target, cls) in linked:
                    twice += 1
                    continue
                linked.add((target, cls))
            out.append((os.path.join(folder, name), cls))
    if repeated or twice:
        shown = ", ".join(repr(os.path.relpath(p, root)) for p in sorted(repeated)[:3])
        warnings.warn(
            f"image folder {root!r}: links are followed once per real folder and file"
            + (f"; {len(repeated)} folder link(s) lead to a folder already read (a loop, the root or another "
               f"category) and were not read again: {shown}{' ...' if len(repeated) > 3 else ''}" if repeated else "")
            + (f"; {twice} file link(s) to an image already in their category left out" if twice else ""),
            stacklevel=4,
        )
    return out


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
    if isinstance(batch, _TensorBatch):
        batch = batch.tensors if len(batch.tensors) > 1 else batch.tensors[0]
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


class _TensorBatch:
    """A batch cut from tensors (``__getitems__`` of :class:`_TensorPairs`), for DataLoaders built
    on those tensors elsewhere (sharded runs, subsets): it passes the collate function as it
    is, and pins only what can be pinned (tensors on the GPU are left where they are)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def pin_memory(self, device: Any = None) -> _TensorBatch:
        return _TensorBatch(tuple(_pinned(t) for t in self.tensors))


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


def _collate_tensors(batch: Any) -> Any:
    if isinstance(batch, _TensorBatch):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)  # a list of items (ShardedRun.example reads one this way)


class _TensorPairs(TensorDataset):
    """``(images[, labels])`` tensors; a run of consecutive indices is read as one slice."""

    def __getitems__(self, indices: list[int]) -> _TensorBatch:
        return _TensorBatch(_take(self.tensors, _as_span(indices)))


def _as_span(indices: Sequence[int]) -> Any:
    """A slice when the indices are consecutive (the usual case), else an index tensor."""
    indices = [int(i) for i in indices]
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.as_tensor(indices, dtype=torch.long)


def _take(tensors: Sequence[torch.Tensor], span: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(span, slice):
        return tuple(t[span] for t in tensors)  # views
    return tuple(t[span.to(t.device)] for t in tensors)  # one gather, not one copy per image


class TensorLoader:
    """Batches of tensors as slices, in order: what a DataLoader over them would yield, without
    collating images one by one.

    It has the attributes of a sequential DataLoader that the rest of the package reads
    (``dataset``, ``batch_size``, ``sampler``, ``drop_last``, ``num_workers``,
    ``collate_fn`` ...), so distributed and checkpointed runs can build their own shard
    loaders over the same dataset. With ``pin_memory`` a background thread pins CPU batches
    ``prefetch`` batches ahead.
    """

    num_workers = 0
    prefetch_factor = None
    drop_last = False
    worker_init_fn = None

    def __init__(self, source: _TensorPairs, batch_size: int, pin_memory: bool = False, prefetch: int = 2,
                 index: Sequence[int] | None = None):
        self.source = source
        self.index = None if index is None else torch.as_tensor(list(index), dtype=torch.long)
        # what the batches are items of (a Subset when reading one category)
        self.dataset: Any = source if index is None else Subset(source, [int(i) for i in index])
        self.batch_size = int(batch_size)
        self.pin_memory = bool(pin_memory) and any(t.device.type == "cpu" for t in source.tensors)
        self.prefetch = max(1, int(prefetch))
        self.sampler = SequentialSampler(self.dataset)
        self.collate_fn = _collate_tensors

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _batch(self, a: int, b: int) -> Any:
        if self.index is None:
            span: Any = slice(a, b)
        else:
            span = _as_span(self.index[a:b].tolist())
        ts = _take(self.source.tensors, span)
        if self.pin_memory:
            ts = tuple(_pinned(t) for t in ts)
        return ts if len(ts) > 1 else ts[0]

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)
        spans = [(a, min(a + self.batch_size, n)) for a in range(0, n, self.batch_size)]
        if not self.pin_memory:
            for a, b in spans:
                yield self._batch(a, b)
            return
        # Pinning copies the batch: done on a thread, ahead, while the GPU works on the last one.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="connectome-pin") as pool:
            queue: deque[Any] = deque()
            for a, b in spans:
                queue.append(pool.submit(self._batch, a, b))
                if len(queue) > self.prefetch:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()


def default_num_workers(n_items: int | None, batch_size: int) -> int:
    """Decoding processes for an image folder: one fewer than the CPUs (at most 8), none when
    the images fit in one batch (nothing to overlap)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_items is not None and n_items <= batch_size:
        return 0
    return max(0, min(8, cpus - 1))


@dataclass
class LoaderInfo:
    """What :func:`make_loader` found out about the data."""

    loader: DataLoader | TensorLoader
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
    num_workers: int | None = None,
    pin_memory: bool = False,
    sampler: Any = None,
    image_size: int = 224,
) -> LoaderInfo:
    """One loader for any supported data input.

    Parameters
    ----------
    data : str, Path, Dataset, DataLoader, Tensor or (Tensor, Tensor)
        An ImageFolder directory (ROOT/<category>/<images>), a dataset or loader yielding
        ``(image, label)``, images alone, or an ``(images, labels)`` pair. Tensors may be on
        the CPU (pinned or not) or on a GPU.
    batch_size : int, default 64
    transform : callable, optional
        For ImageFolder data.
    num_workers : int, optional
        Decoding processes for an ImageFolder or a dataset; ``None``: one fewer than the
        CPUs (at most 8) for an ImageFolder of more than one batch, else 0. Tensors never
        need any.
    pin_memory : bool, default False
        Pin CPU batches (for a CUDA run); tensors on a GPU are left there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is not None and (int(num_workers) != num_workers or num_workers < 0):
        raise ValueError(f"num_workers must be an integer >= 0 or None, got {num_workers!r}")
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
        workers = default_num_workers(len(ds), batch_size) if num_workers is None else int(num_workers)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                            pin_memory=pin_memory, collate_fn=_collate, persistent_workers=False,
                            prefetch_factor=4 if workers else None)
        return LoaderInfo(loader, ds, classes, len(ds))
    if isinstance(data, DataLoader):
        ds = data.dataset
        classes = getattr(ds, "classes", None)
        n = len(ds) if hasattr(ds, "__len__") else None
        if n == 0:
            raise DataError("the DataLoader's dataset is empty; give it at least one image")
        return LoaderInfo(data, ds, list(classes) if classes is not None else None, n)
    if isinstance(data, torch.Tensor):
        data = _TensorPairs(data)
    elif type(data) is TensorDataset:
        data = _TensorPairs(*data.tensors)
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
        # Labels are few: on the CPU once, so that checking them per batch never waits for the GPU.
        data = _TensorPairs(x, y.long().cpu())
    if isinstance(data, _TensorPairs):
        if len(data) == 0:
            raise DataError("the dataset is empty; give it at least one image")
        if sampler is not None:
            loader = DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=_collate_tensors,
                                pin_memory=pin_memory and data.tensors[0].device.type == "cpu")
        else:
            loader = TensorLoader(data, batch_size, pin_memory=pin_memory)
        return LoaderInfo(loader, data, None, len(data))
    if isinstance(data, Dataset):
        n = len(data) if hasattr(data, "__len__") else None
        if n == 0:
            raise DataError("the dataset is empty; give it at least one image")
        classes = getattr(data, "classes", None)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers or 0,
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


def no_images_error(skipped: Sequence[str]) -> DataError:
    """The error of a run that read no image: all failed to decode, or the data is empty."""
    return DataError("no images could be read"
                     + (f": all {len(skipped)} files failed to decode" if len(skipped) else "; the data is empty"))


def _workers(info: LoaderInfo, num_workers: int | None) -> int:
    return (getattr(info.loader, "num_workers", 0) or 0) if num_workers is None else int(num_workers)


def subset_loader(info: LoaderInfo, indices: Sequence[int], batch_size: int, num_workers: int | None = None,
                  pin_memory: bool = False) -> LoaderInfo:
    """The items ``indices`` of ``info``'s dataset (one category), read like ``info`` reads them."""
    ds = info.dataset
    if isinstance(ds, _TensorPairs):
        loader = TensorLoader(ds, batch_size, pin_memory=pin_memory, index=indices)
        return LoaderInfo(loader, loader.dataset, info.classes, len(loader.dataset))
    subset = Subset(ds, list(indices))
    workers = _workers(info, num_workers)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=info.loader.collate_fn,
                        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None)
    return LoaderInfo(loader, subset, info.classes, len(subset))


class CategoryBatches:
    """The images of many categories read by one loader, category after category, each batch
    within one category: one pool of decoding processes for the whole run.

    A loader per category (:func:`subset_loader`) starts its worker processes again for every
    category; each start forks the whole process, and the copy-on-write faults that follow
    cost more than a small category's work (100 one-image categories of resnet18 at 32 px:
    36 of 75 CPU seconds were the kernel's). :meth:`category` gives each category a loader
    that takes its batches from the shared one; categories must be read in the order given.
    """

    def __init__(self, info: LoaderInfo, groups: Sequence[Sequence[int]], batch_size: int,
                 num_workers: int | None = None, pin_memory: bool = False):
        self.info, self.batch_size = info, int(batch_size)
        self.batches = [list(g[i : i + self.batch_size]) for g in groups for i in range(0, len(g), self.batch_size)]
        workers = _workers(info, num_workers)
        self.loader = DataLoader(info.dataset, batch_sampler=self.batches, collate_fn=info.loader.collate_fn,
                                 num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None)
        self._it: Iterator[Any] | None = None
        self._given = 0  # batches handed out

    def category(self, indices: Sequence[int]) -> LoaderInfo:
        """The loader of the next category, whose items are ``indices`` (the next group)."""
        view = _CategoryLoader(self, Subset(self.info.dataset, list(indices)))
        return LoaderInfo(view, view.dataset, self.info.classes, len(indices))

    def next_batch(self, expected: Sequence[int]) -> Any:
        if self._given >= len(self.batches) or list(self.batches[self._given]) != list(expected):
            raise RuntimeError("CategoryBatches: categories read out of order")  # a bug, not bad input
        if self._it is None:
            self._it = iter(self.loader)
        self._given += 1
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes."""
        self._it = None


class _CategoryLoader:
    """One category's batches from a :class:`CategoryBatches` (the attributes of a sequential
    DataLoader over that category that the package reads)."""

    drop_last = False
    worker_init_fn = None
    prefetch_factor = None

    def __init__(self, shared: CategoryBatches, subset: Subset):
        self.shared, self.dataset = shared, subset
        self.batch_size = shared.batch_size
        self.sampler = SequentialSampler(subset)
        self.collate_fn = shared.loader.collate_fn
        self.num_workers = shared.loader.num_workers
        idx = list(subset.indices)
        self._batches = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._batches:  # read once, whole (a run with max_images has loaders of its own)
            yield self.shared.next_batch(batch)
