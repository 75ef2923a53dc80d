"""Large attribution runs: dataset shards across processes, one all-reduce, resumable checkpoints.

Nothing here is cluster code: ``torch.distributed`` does the communication (launched with
``torchrun``; NCCL between GPUs, gloo between CPU processes). A run is *sharded* when a
default process group with more than one process is initialised, or when a checkpoint
folder is given:

- every process (rank) reads ``indices[rank::world_size]`` of the dataset (no padding, so
  no image is read twice and none is skipped when the count does not divide evenly) and
  accumulates its flows on its own device;
- the accumulators are summed once at the end with ``all_reduce`` (``act_max`` with MAX),
  after which every rank holds the totals and builds the same Connectome;
- with a checkpoint folder each rank saves its accumulators and its position (batches done)
  to ``rank{r}.pt`` every N batches, atomically; a run started again with the same
  arguments skips the batches already done without reading them and ends with exactly the
  result of an uninterrupted run. A checkpoint written by different arguments is refused.

:func:`connectome.extract.attribution` and
:func:`connectome.extract.attribution_by_category` use this module; it is public for
custom loops around :class:`~connectome.extract.flow.FlowAccumulator`.
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler, Subset

from connectome._safety import safe_torch_load
from connectome.errors import BadFileError, ConnectomeError, DataError, UnsafeDependencyError
from connectome.extract.topk import topk_merge

__all__ = [
    "ShardSampler",
    "SkippedNames",
    "ShardedRun",
    "Checkpoint",
    "rank_world",
    "rank_device",
    "launched",
    "agree",
    "all_reduce_accumulator",
    "fingerprint",
    "category_folder",
]

CHECKPOINT_FORMAT = "connectome.attribution-checkpoint"
CHECKPOINT_VERSION = 2  # 2: edges of every layer as lists (accumulator.state_dict), a checksum of the payload
_BUCKET = 1 << 24  # elements per all_reduce call (128 MB of float64): bounds the extra memory


# ----------------------------------------------------------------------------- process group
def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rank() -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    rank, _ = rank_world()
    return rank % max(1, torch.cuda.device_count())


def rank_device(device: torch.device) -> torch.device:
    """In a distributed run, ``cuda`` without an index means this process's GPU, ``cuda:LOCAL_RANK``."""
    _, world = rank_world()
    if world > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", _local_rank())
    return device


@contextmanager
def launched(device: Any = None) -> Iterator[tuple[int, int]]:
    """Initialise the default process group when started by ``torchrun``; destroy it at the end.

    Does something only when ``WORLD_SIZE`` > 1 and no group exists yet: then the backend
    is NCCL (each process on ``cuda:LOCAL_RANK``) when CUDA is present and ``device`` is not
    a CPU, else gloo. Yields ``(rank, world_size)``.
    """
    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and not str(device or "cuda").startswith("cpu")
        if cuda:
            torch.cuda.set_device(_local_rank())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    try:
        yield rank_world()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _comm_device(like: torch.device | None = None) -> torch.device:
    """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
    if "nccl" in str(dist.get_backend()).lower():
        if like is not None and like.type == "cuda":
            return like
        return torch.device("cuda", _local_rank())  # not current_device(): it may be GPU 0 on every process
    return torch.device("cpu")


def agree(error: BaseException | None) -> None:
    """Collective: when any rank failed, raise on every rank (none waits forever in a later collective).

    The failing rank re-raises its own error; the others raise a :class:`ConnectomeError`
    that points at it. Without a process group this only re-raises ``error``.
    """
    rank, world = rank_world()
    if world > 1:
        flag = torch.tensor([0.0 if error is None else float(rank + 1)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item())
    else:
        failed = 0
    if error is not None:
        raise error
    if failed:
        raise ConnectomeError(f"process {failed - 1} of the distributed run failed; its error message says why")


# ----------------------------------------------------------------------------- sampling
class ShardSampler(Sampler[int]):
    """The indices of one rank's shard: ``range(n)[rank::world_size]``, from position ``start`` on.

    Unlike ``DistributedSampler`` nothing is padded or dropped: over all ranks every index
    ``0 .. n-1`` comes exactly once, and shards differ in size by at most one. ``start``
    (a count of this rank's indices already done) resumes a run without reading them.

    Example
    -------
    >>> [list(ShardSampler(7, r, 3)) for r in range(3)]
    [[0, 3, 6], [1, 4], [2, 5]]
    >>> list(ShardSampler(7, 0, 3, start=1))
    [3, 6]
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.indices = range(n)[rank::world_size][start:]  # a range: no memory per image

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkippedNames:
    """Undecodable files: counts every one, keeps the first ``cap`` names (memory stays bounded).

    ``len()`` is the count; iterating gives the names kept.
    """

    def __init__(self, names: Sequence[str] = (), count: int | None = None, cap: int = 100):
        self.cap = cap
        self.names = [str(s) for s in list(names)[:cap]]
        self.count = len(names) if count is None else int(count)

    def extend(self, names: Sequence[str]) -> None:
        self.count += len(names)
        room = self.cap - len(self.names)
        if room > 0:
            self.names.extend(str(s) for s in list(names)[:room])

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


# ----------------------------------------------------------------------------- all-reduce
def _reduce(tensors: list[torch.Tensor], op: Any, comm: torch.device) -> None:
    """In-place all_reduce of float64 tensors, flattened into a few large buffers (few calls)."""
    i = 0
    while i < len(tensors):
        j, size = i, 0
        while j < len(tensors) and (j == i or size + tensors[j].numel() <= _BUCKET):
            size += tensors[j].numel()
            j += 1
        flat = torch.cat([t.reshape(-1).to(comm, torch.float64) for t in tensors[i:j]])
        dist.all_reduce(flat, op=op)
        o = 0
        for t in tensors[i:j]:
            t.copy_(flat[o : o + t.numel()].view(t.shape))
            o += t.numel()
        i = j


def _merge_topk(tensors: list[torch.Tensor], comm: torch.device, world: int) -> None:
    """Top-k lists ``(rows, k, 3)`` of every rank merged in place: one all_gather, then the k best."""
    flat = torch.cat([t.reshape(-1).to(comm, torch.float64) for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    o = 0
    for t in tensors:
        cand = torch.cat([p[o : o + t.numel()].view(t.shape) for p in parts], 1)
        t.copy_(topk_merge(cand, t.shape[1]))
        o += t.numel()


def all_reduce_accumulator(acc: Any, extra_sum: Sequence[float] = (), extra_max: Sequence[float] = ()
                           ) -> tuple[list[float], list[float]]:
    """Combine the accumulators of all ranks in place: SUM for sums and counts, MAX for ``act_max``,
    a top-k merge (all_gather) for the dataset examples.

    Every rank must call it (it is a collective) with an accumulator of the same traced
    model; afterwards every rank holds the totals. ``extra_sum`` / ``extra_max`` are plain
    numbers reduced alongside (counts, seconds) and returned reduced.

    Raises
    ------
    ConnectomeError
        The ranks hold accumulators of different shapes (different models or layers).
    """
    _, world = rank_world()
    if world == 1:
        return list(extra_sum), list(extra_max)
    comm = _comm_device(acc.device)
    sums = acc.tensors("sum")  # the accumulator declares its fields and how they combine
    maxes = acc.tensors("max")
    topk = acc.tensors("topk")  # dataset examples, when asked for
    n = sum(t.numel() for t in sums) + sum(t.numel() for t in maxes) + sum(t.numel() for t in topk)
    # Different shapes would make all_reduce hang or mix numbers: check the sizes agree first.
    check = torch.tensor([float(n), -float(n), float(len(sums))], dtype=torch.float64, device=comm)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if check[0].item() != -check[1].item():
        raise ConnectomeError(
            f"the processes hold accumulators of different sizes ({int(-check[1].item())} to {int(check[0].item())} "
            "numbers); every process must run the same model on the same layers"
        )
    counts = torch.tensor([float(acc.n_images), *map(float, extra_sum)], dtype=torch.float64, device=acc.device)
    _reduce(sums + [counts], dist.ReduceOp.SUM, comm)
    tops = torch.tensor([float(v) for v in extra_max] or [0.0], dtype=torch.float64, device=acc.device)
    _reduce(maxes + [tops], dist.ReduceOp.MAX, comm)
    if topk:
        _merge_topk(topk, comm, world)
    acc.n_images = int(counts[0].item())
    return counts[1:].tolist(), tops[: len(extra_max)].tolist()


# ----------------------------------------------------------------------------- fingerprints
def _model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    named = list(model.named_parameters()) + list(model.named_buffers())
    structure = hashlib.sha256()
    values = hashlib.sha256()
    sums = []
    with torch.no_grad():
        for name, t in named:
            structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            # A strided sample of the exact values (device independent) plus sums that
            # catch changes anywhere (compared with a tolerance: reduction order varies by device).
            idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 32), device=flat.device).long()
            values.update(flat[idx].detach().to("cpu", torch.float64).numpy().tobytes())
            f = flat.double()
            sums.append(torch.stack([f.sum(), f.abs().sum()]))
    total = torch.stack(sums).sum(0).cpu().tolist() if sums else [0.0, 0.0]
    return {"model": structure.hexdigest()[:20], "model_values": values.hexdigest()[:20], "model_checksum": total}


def _item_hash(ds: Any, i: int) -> str:
    """A hash of dataset item ``i`` as the model sees it (after the transform) and of its label."""
    h = hashlib.sha256()
    try:
        item = ds[i]
    except Exception as exc:  # an undecodable file still has a stable identity: its error
        h.update(f"error:{type(exc).__name__}".encode())
        return h.hexdigest()[:20]
    parts = item if isinstance(item, (tuple, list)) else (item,)
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(getattr(p, "path", p)).encode())
    return h.hexdigest()[:20]


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
_DIGEST_CHUNK = 1 << 22  # elements per block of items: bounds the extra memory of the content hash
_SAMPLES_PER_ITEM = 16


def _tensor_digest(t: torch.Tensor, idx: Sequence[int] | None, h: Any) -> None:
    """Add every item (row) of ``t`` to ``h``: per item the sum and the position-weighted sum of
    its values' bit patterns as integers (exact, and the same on every device and in any
    reduction order: integer sums wrap the same everywhere), plus a strided sample of exact values.

    Any change to one value changes the item's sums; swapping values changes the weighted sum.
    One pass over the data, on the tensor's own device, a bounded block of items at a time.
    """
    h.update(f"{t.dtype}{tuple(t.shape[1:])};".encode())
    n = t.shape[0] if t.dim() else 1
    rows_of = (lambda a, b: t[a:b]) if idx is None else (
        lambda a, b: t.index_select(0, torch.as_tensor(list(idx[a:b]), dtype=torch.long, device=t.device)))
    count = n if idx is None else len(idx)
    per = max(1, t[0].numel() if t.dim() and n else 1)
    block = max(1, _DIGEST_CHUNK // per)
    as_int = _INT_OF_SIZE.get(t.element_size())
    for a in range(0, count, block):
        b = min(count, a + block)
        rows = (t.reshape(1, -1) if not t.dim() else rows_of(a, b)).reshape(b - a, -1).contiguous()
        if rows.dtype == torch.bool:
            rows = rows.to(torch.uint8)
        words = rows.view(as_int).to(torch.int64) if as_int is not None else rows.to(torch.float64)
        pos = torch.arange(1, words.shape[1] + 1, dtype=torch.int64, device=words.device)
        sums = torch.stack([words.sum(1), (words * pos).sum(1)], 1)
        step = max(1, rows.shape[1] // _SAMPLES_PER_ITEM)
        h.update(sums.cpu().numpy().tobytes())
        h.update(rows[:, ::step].cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _file_digest(paths: Sequence[str], h: Any) -> None:
    """Name (category/file), size and modification time of every file: one ``stat`` each,
    no image decoded. Copying files to another machine without keeping their times (``cp -p``,
    ``rsync -t``) counts as a change."""
    for path in paths:
        p = Path(str(path))
        try:
            st = os.stat(p)
            h.update(f"{'/'.join(p.parts[-2:])}|{st.st_size}|{st.st_mtime_ns};".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{'/'.join(p.parts[-2:])}|missing;".encode("utf-8", "surrogateescape"))


def _data_fingerprint(ds: Any, n_images: int) -> str | None:
    """Which images, with which content and labels, transformed how: every item, cheaply.

    - an ImageFolder (anything with ``samples``): the name (category/file), size and
      modification time of every file;
    - tensors (a ``TensorDataset`` or anything with ``tensors``): the content of every item
      (see :func:`_tensor_digest`);
    - every label, when the dataset lists them;
    - for every dataset, the first, middle and last items as the model receives them (so the
      transform and image size count). A dataset of another kind is identified by these
      three items, its labels and its length only.
    """
    from connectome.extract.data import dataset_targets

    if n_images <= 0:
        return None
    h = hashlib.sha256()
    base, idx = ds, None
    if isinstance(ds, Subset):
        base, idx = ds.dataset, [int(i) for i in ds.indices]
    if idx is None and n_images < len(ds):
        idx = list(range(n_images))
    elif idx is not None:
        idx = idx[:n_images]
    samples = getattr(base, "samples", None)
    tensors = getattr(base, "tensors", None)
    if samples is not None:
        rows = samples if idx is None else [samples[i] for i in idx]
        _file_digest([r[0] if isinstance(r, (tuple, list)) else r for r in rows], h)
    elif isinstance(tensors, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in tensors):
        with torch.no_grad():
            for t in tensors:
                _tensor_digest(t, idx, h)
    targets = dataset_targets(ds)
    if targets is not None:
        h.update(",".join(map(str, targets[:n_images])).encode())
    for i in sorted({0, n_images // 2, n_images - 1}):
        h.update(_item_hash(ds, i).encode())
    return h.hexdigest()[:20]


def _stable_repr(v: Any) -> str:
    """repr without memory addresses (they differ between processes and runs)."""
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))


def _code_hash(fn: Any, h: Any) -> bool:
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    h.update(code.co_code)
    h.update(_stable_repr(code.co_consts).encode())
    h.update(_stable_repr(getattr(fn, "__defaults__", None)).encode())
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            h.update(_stable_repr(cell.cell_contents).encode())
        except ValueError:  # an empty cell
            pass
    # module-level values the function reads (`cls = 3` ... `lambda l: l[:, cls]`)
    glb = getattr(fn, "__globals__", {})
    for name in code.co_names:
        v = glb.get(name)
        if isinstance(v, (int, float, str, bool, tuple, list, dict)):
            h.update(f"{name}={_stable_repr(v)}".encode())
    return True


def _target_fingerprint(target: Any) -> Any:
    """Plain targets as they are; a callable by its code, constants, defaults, captured and
    global values it reads, and (for callable objects) their attributes."""
    if isinstance(target, (str, int)) or not callable(target):
        return target if isinstance(target, (str, int)) else repr(target)
    import functools

    if isinstance(target, functools.partial):
        inner = _target_fingerprint(target.func)
        return f"partial({inner},{_stable_repr(target.args)},{_stable_repr(sorted(target.keywords.items()))})"
    h = hashlib.sha256()
    if not _code_hash(target, h):
        call = getattr(type(target), "__call__", None)
        _code_hash(call, h)
        h.update(_stable_repr(sorted(vars(target).items()) if hasattr(target, "__dict__") else target).encode())
    name = getattr(target, "__qualname__", type(target).__qualname__)
    return f"{name}:{h.hexdigest()[:16]}"


def fingerprint(model: torch.nn.Module, dataset: Any, n_images: int, classes: Sequence[str] | None, *,
                target: Any, per_sample: bool, amp: bool, batch_size: int, world_size: int,
                category: str | None = None, precision: str | None = None, examples: int = 0) -> dict[str, Any]:
    """What must match for a checkpoint to be continued: plain values only (saved with the checkpoint).

    Model: a hash of parameter/buffer names, shapes and dtypes, a hash of a strided sample
    of the values and their sums. Data: the number of images, the class list and every
    item (see :func:`_data_fingerprint`: file names, sizes and modification times of an
    ImageFolder, the content of tensors, every label, and the first, middle and last items
    as the model sees them). The target (a callable by its code and captured values),
    options, batch size and number of processes.
    """
    fp = _model_fingerprint(model)
    fp.update({
        "n_images": int(n_images),
        "classes": hashlib.sha256("\n".join(map(str, classes)).encode()).hexdigest()[:20] if classes else None,
        "sample_ids": _data_fingerprint(dataset, n_images),
        "target": _target_fingerprint(target),
        "category": category,
        "per_sample": bool(per_sample),
        "amp": bool(amp),
        "precision": precision or ("bf16" if amp else "exact"),  # a tf32 run must not continue an exact one
        "batch_size": int(batch_size),
        "world_size": int(world_size),
        "examples": int(examples),
    })
    return fp


_WHAT = {
    "model": "model architecture (parameter names/shapes)",
    "precision": "precision (exact, tf32 or bf16)",
    "model_values": "model weights",
    "model_checksum": "model weights",
    "n_images": "number of images",
    "classes": "class list",
    "sample_ids": "images (file names, sizes or modification times; tensor contents; labels; the transform)",
    "target": "target",
    "category": "category",
    "per_sample": "per_sample",
    "amp": "amp",
    "batch_size": "batch size",
    "world_size": "number of processes",
    "examples": "examples (images kept per unit, --examples)",
}

#: fingerprint entries added later, with the value a checkpoint written before them had
_DEFAULTS = {"examples": 0}


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in now:
        a, b = saved.get(key, _DEFAULTS.get(key)), now[key]
        if key == "model_checksum" and isinstance(a, list) and len(a) == len(b):
            same = all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))
        else:
            same = a == b
        if not same:
            what = _WHAT.get(key, key)
            if key in ("model", "model_values", "model_checksum", "classes", "sample_ids"):
                text = what
            else:
                text = f"{what} (checkpoint {_short(a)}, now {_short(b)})"
            if text not in out:
                out.append(text)
    return out


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ----------------------------------------------------------------------------- checkpoints
def _digest_into(v: Any, h: Any) -> None:
    """Feed a checkpoint payload (tensors, dicts, lists and plain values) to ``h`` canonically."""
    if isinstance(v, torch.Tensor):
        t = v.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(v, dict):
        h.update(b"{")
        for k in sorted(v, key=repr):
            _digest_into(k, h)
            _digest_into(v[k], h)
        h.update(b"}")
    elif isinstance(v, (list, tuple)):
        h.update(b"[")
        for x in v:
            _digest_into(x, h)
        h.update(b"]")
    else:  # str, int, float, bool, None: repr tells them apart and is exact
        h.update(f"{type(v).__name__}:{v!r};".encode("utf-8", "surrogatepass"))


def _payload_checksum(payload: dict[str, Any]) -> str:
    """SHA-256 of everything in a checkpoint payload but the checksum itself."""
    h = hashlib.sha256()
    _digest_into({k: v for k, v in payload.items() if k != "checksum"}, h)
    return h.hexdigest()


class Checkpoint:
    """One rank's checkpoint file ``FOLDER/rank{r}.pt``: accumulators, position, fingerprint.

    Saved with ``torch.save`` (tensors and plain types only) to a temporary file that is
    renamed over the old one, so a process killed at any moment leaves the previous or the
    new checkpoint, never a mix; loaded with ``weights_only=True``. When the run finishes
    the file is kept, marked ``complete``: running again with the same arguments returns
    the result without reading images; delete the folder to compute afresh.
    """

    def __init__(self, folder: str | os.PathLike[str], rank: int, fingerprint: dict[str, Any]):
        self.folder = Path(folder)
        for p in (self.folder, *self.folder.parents):  # the folder, or one above it, may be a file
            if p.exists() and not p.is_dir():
                where = "is a file" if p == self.folder else f"is under the file {str(p)!r}"
                raise ConnectomeError(f"checkpoint {str(self.folder)!r} {where}; give a folder (it is created if missing)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConnectomeError(f"cannot create the checkpoint folder {str(self.folder)!r} "
                                  f"({exc.strerror or exc}); give a folder that can be written") from None
        self.rank = rank
        self.path = self.folder / f"rank{rank}.pt"
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        """The saved payload, or None when there is none; refuses a corrupted or foreign one."""
        if not self.path.exists():
            return None
        try:
            payload = safe_torch_load(self.path, what="checkpoint")
        except UnsafeDependencyError:
            raise
        except Exception as exc:  # zip, pickle and EOF errors: all mean a damaged file
            raise BadFileError(
                f"checkpoint {str(self.path)!r} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                "it is corrupted or truncated: delete it to redo this process's images, or delete the folder to start over"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise BadFileError(f"{str(self.path)!r} is not a connectome attribution checkpoint; "
                               "use an empty folder for --checkpoint")
        if payload.get("version") != CHECKPOINT_VERSION:
            raise BadFileError(f"checkpoint {str(self.path)!r} has version {payload.get('version')!r}; this "
                               f"connectome reads version {CHECKPOINT_VERSION}: delete it to start over")
        # torch.load does not check the zip's CRCs: a flipped byte in a tensor would resume silently
        if payload.get("checksum") != _payload_checksum(payload):
            raise BadFileError(
                f"checkpoint {str(self.path)!r} is damaged (its contents do not match their checksum); delete it to "
                "redo this process's images, or delete the folder to start over"
            )
        diff = _differences(payload.get("fingerprint") or {}, self.fingerprint)
        if diff:
            raise ConnectomeError(
                f"checkpoint {str(self.path)!r} was written by a run with different arguments: "
                + "; ".join(diff) + ". Resume with the same arguments, or use another checkpoint folder "
                "(or delete this one) to start over"
            )
        state = payload.get("state")
        if payload.get("rank") != self.rank or not isinstance(payload.get("batches_done"), int) \
                or not isinstance(state, dict) or not isinstance(state.get("n_images"), int):
            raise BadFileError(f"checkpoint {str(self.path)!r} is malformed (rank, position or sums); delete it to start over")
        self._check_position(payload)
        return payload

    def _check_position(self, payload: dict[str, Any]) -> None:
        """The saved position must be one this run can reach: batches done within this rank's
        shard, and the images summed plus those skipped exactly the images of those batches."""
        fp = self.fingerprint
        shard = len(range(int(fp["n_images"]))[self.rank :: int(fp["world_size"])])
        bs = int(fp["batch_size"])
        total = -(-shard // bs)
        done, n_img, n_skip = payload["batches_done"], payload["state"]["n_images"], payload.get("n_skipped", 0)
        problem = None
        if not 0 <= done <= total:
            problem = f"batches_done={done}, outside 0..{total} for {shard} images in batches of {bs}"
        elif not isinstance(n_skip, int) or n_skip < 0 or n_img < 0 or n_img + n_skip != min(done * bs, shard):
            problem = (f"{n_img} images summed and {n_skip!r} skipped after {done} batches of {bs}, "
                       f"which hold {min(done * bs, shard)}")
        elif payload.get("complete") and done != total:
            problem = f"marked complete after {done} of {total} batches"
        if problem:
            raise BadFileError(f"checkpoint {str(self.path)!r} holds an impossible position ({problem}); "
                               "delete it to start over")

    def save(self, acc: Any, batches_done: int, skipped: SkippedNames, complete: bool = False) -> None:
        from connectome.io import atomic_write

        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "rank": self.rank,
            "batches_done": int(batches_done),
            "complete": bool(complete),
            "state": acc.state_dict(),
            "skipped": list(skipped.names),
            "n_skipped": int(skipped.count),
        }
        payload["checksum"] = _payload_checksum(payload)
        with atomic_write(self.path, "wb") as fh:
            torch.save(payload, fh)


# ----------------------------------------------------------------------------- one sharded run
class ShardedRun:
    """The loop-side state of a sharded (distributed and/or checkpointed) attribution run.

    Built by every rank before the batch loop: opens (and checks) this rank's checkpoint,
    and makes a DataLoader over this rank's shard that starts after the batches already
    done. The loop calls :meth:`restore` on the fresh accumulator, :meth:`after_batch`
    after each batch, and :meth:`finish` at the end (save, agree, all-reduce).
    """

    def __init__(self, info: Any, model: torch.nn.Module, device: torch.device, *, target: Any,
                 per_sample: bool, amp: bool, max_images: int | None, checkpoint: Any = None,
                 checkpoint_every: int = 50, category: str | None = None, precision: str | None = None,
                 examples: int = 0):
        self.rank, self.world = rank_world()
        self.info = info
        self.every = int(checkpoint_every)
        self.skipped = SkippedNames()
        self.start_batch = 0
        self.batches_done = 0
        self.images_done = 0
        self.ckpt: Checkpoint | None = None
        self._state: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            if checkpoint is not None and self.every < 1:
                raise ValueError(f"checkpoint_every must be >= 1 batch, got {checkpoint_every}")
            ds, loader = info.dataset, info.loader
            if ds is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
                raise DataError("distributed or checkpointed runs need a map-style dataset with a length "
                                "(an ImageFolder path, a Dataset or a DataLoader of one); got an iterable dataset")
            if loader.batch_size is None:
                raise DataError("distributed or checkpointed runs need a DataLoader with a batch_size "
                                "(not a custom batch_sampler)")
            from torch.utils.data import SequentialSampler

            if not isinstance(loader.sampler, SequentialSampler) or loader.drop_last:
                # the shard sampler replaces the loader's own: refuse rather than read other images
                raise DataError(
                    "distributed or checkpointed runs read every item of the dataset in order; this DataLoader "
                    "has its own sampler or drop_last=True. Pass the dataset (or a torch.utils.data.Subset of "
                    "the items you want) instead of the loader"
                )
            self.batch_size = int(loader.batch_size)
            self.n = len(ds) if max_images is None else min(len(ds), int(max_images))
            if checkpoint is not None:
                fp = fingerprint(model, ds, self.n, info.classes, target=target, per_sample=per_sample, amp=amp,
                                 batch_size=self.batch_size, world_size=self.world, category=category,
                                 precision=precision, examples=examples)
                self.ckpt = Checkpoint(checkpoint, self.rank, fp)
                payload = self.ckpt.load()
                if payload is not None:
                    self.start_batch = self.batches_done = payload["batches_done"]
                    self._state = payload["state"]
                    self.skipped = SkippedNames(payload.get("skipped", []), payload.get("n_skipped", 0))
                    self.images_done = int(self._state["n_images"]) * self.world  # for the progress bar
        except BaseException as exc:  # noqa: BLE001 - re-raised by agree() on every rank
            error = exc
        agree(error)
        if self.world > 1 and device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # one GPU per process: pinned memory and NCCL go to this one
        workers = loader.num_workers
        extra: dict[str, Any] = {"prefetch_factor": max(loader.prefetch_factor or 2, 4)} if workers > 0 else {}
        self.loader = DataLoader(
            ds, batch_size=self.batch_size, shuffle=False,
            sampler=ShardSampler(self.n, self.rank, self.world, start=self.start_batch * self.batch_size),
            num_workers=workers, collate_fn=loader.collate_fn, pin_memory=device.type == "cuda",
            worker_init_fn=loader.worker_init_fn, **extra,
        )

    def example(self) -> torch.Tensor | None:
        """One image to trace the model on a rank whose shard is empty or done before a resume.

        Zeros of the checkpointed input shape when there is one (tracing needs only the
        shape), else the first decodable image of the dataset.
        """
        from connectome.extract.data import unpack_batch

        shape = (self._state or {}).get("input_shape")
        if isinstance(shape, list) and len(shape) > 1 and all(isinstance(v, int) and v > 0 for v in shape):
            return torch.zeros([1, *shape[1:]])
        ds, collate = self.info.dataset, self.info.loader.collate_fn
        for i in range(min(len(ds), 64)):
            x, _, _ = unpack_batch(collate([ds[i]]))
            if x is not None:
                return x
        return None

    def restore(self, acc: Any) -> None:
        """Put the checkpointed sums into a freshly built accumulator."""
        if self._state is not None:
            acc.load_state_dict(self._state, self.ckpt.path if self.ckpt else Path("?"))

    def after_batch(self, acc: Any, batch_index: int) -> None:
        """Record the position; every ``checkpoint_every`` batches save (before any test hook runs)."""
        self.batches_done = batch_index + 1
        if self.ckpt is not None and acc is not None and self.batches_done % self.every == 0:
            self.ckpt.save(acc, self.batches_done, self.skipped)

    def finish(self, acc: Any, error: BaseException | None, seconds: float) -> float:
        """End of the loop on every rank: mark the checkpoint complete, agree, all-reduce.

        Returns the longest time any rank took. Raises on every rank if any rank failed.
        """
        from connectome.extract.data import no_images_error

        if error is None and acc is None:
            error = no_images_error(self.skipped)
        if error is None and self.ckpt is not None:
            try:
                self.ckpt.save(acc, self.batches_done, self.skipped, complete=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
                error = exc
        agree(error)
        (n_skipped,), (seconds,) = all_reduce_accumulator(acc, [len(self.skipped)], [seconds])
        self.skipped.count = int(n_skipped)
        return seconds


def category_folder(label: int, name: str) -> str:
    """The checkpoint sub-folder of one category: ``<label>-<name>`` with unsafe characters replaced
    (a name over 100 bytes cut there, with a hash of the whole name)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))
    raw = safe.encode("utf-8")
    if len(raw) > 100:  # a file name holds at most 255 bytes: cut, and keep long names apart by a hash
        digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{raw[:100].decode('utf-8', 'ignore')}-{digest}"
    return f"{int(label)}-{safe}"
