"""Attribution flows: exact functional connectomes from one forward and one backward pass.

For a target scalar ``T`` (a class logit) and a network that is linear in its data once a
few values are held constant, the contribution of unit ``i`` to unit ``j`` through the kernel
``W[j, i]``, summed over positions and images, is ``E[j, i] = sum_k W[j,i,k] * dT/dW[j,i,k]``:
every edge of every layer comes out of one backward pass (``W * dW``, reduced over the
kernel). Identity edges (residual adds, concats) carry ``x_i * dT/dx_i`` of the operand they
copy. The batches run in :class:`~connectome.extract.accumulator.FlowAccumulator`.

Node attributes, summed over images and positions:

- ``attribution``: ``A * dT/dA``, with ``A`` the value the unit passes on (after BatchNorm
  and the nonlinearity); for the input layer ``A`` is the image;
- ``bias_attribution``: the bias (conv/linear bias + folded BatchNorm shift) times
  ``dT/db``, plus the constant part of every per-unit op (clipped activations, ``f(0)`` of
  smooth activations, the shift of a normalisation ...) times its gradient, so that
  ``sum(in E) + bias_attribution == attribution == sum(out E)`` and
  ``sum(input attribution) + sum(bias_attribution) == sum(T)``.

Ops that are not piecewise linear are linearised by the rules of
:mod:`connectome.extract.rules` (gates, smooth activations, LayerNorm/GroupNorm): the backward
pass holds a named quantity constant, the forward pass is unchanged, and the identities above
stay exact; ``meta["rules"]`` lists the rules a graph used. The completeness residual is
reported as ``meta["completeness_residual"]``, never hidden.

References
----------
Olah et al. (2020), "Zoom In: An Introduction to Circuits", Distill.
Selvaraju et al. (2017), "Grad-CAM" (gradient x activation as channel importance).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from connectome._version import versions
from connectome.extract.labels import label_map, labels_for_output
from connectome.errors import ConnectomeError, DataError
from connectome.extract._model import (check_model, eval_mode, model_dtype, model_on, no_inplace, precision_meta,
                                       precision_mode, resolve_device, resolve_precision, run_precision)
from connectome.extract.accumulator import FlowAccumulator
from connectome.extract.data import (CategoryBatches, TensorLoader, dataset_targets, make_loader, no_images_error,
                                     subset_loader, unpack_batch, warn_skipped)
from connectome.extract.targets import as_layer_names, check_labels
from connectome.extract.trace import trace_units
from connectome.graph import Connectome

__all__ = ["attribution", "attribution_by_category", "iter_attribution_by_category", "FlowAccumulator"]

# ----------------------------------------------------------------------------- targets
def _target_fn(target: Any, n_out: int, classes: Sequence[str] | None) -> tuple[Callable[..., torch.Tensor], Any]:
    """(fn(logits, labels) -> (N,), resolved class index or None)."""
    from connectome.extract.targets import resolve_target

    t = resolve_target(target, n_out, classes)
    return t.logit, t.index


# ----------------------------------------------------------------------------- public API
def attribution(
    model: nn.Module,
    data: Any,
    target: Any = "label",
    *,
    per_sample: bool = False,
    layers: Sequence[str] | None = None,
    device: Any = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    labels: Sequence[str] | None = None,
    max_images: int | None = None,
    precision: str = "exact",
    amp: bool = False,
    progress: bool = True,
    name: str | None = None,
    category: str | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    examples: int = 0,
    _batch_hook: Callable[[int], None] | None = None,
) -> Connectome:
    """The attribution-flow connectome of a model for a set of images.

    Parameters
    ----------
    model : nn.Module
        An fx-traceable classifier. Runs in eval mode (a model in training mode is switched
        for the run, with a warning, and restored); never moved: when ``device`` differs from
        the model's, a copy runs there.
    data : str, Path, Dataset, DataLoader, Tensor or (Tensor, Tensor)
        ImageFolder directory, dataset/loader of ``(image, label)``, or tensors.
    target : "label", "predicted", int, str or callable, default "label"
        Per image: the logit of its own label, of the predicted class, of a fixed class
        (index or class name), or ``callable(logits) -> (batch,)``.
    per_sample : bool, default False
        Also compute ``abs_weight`` per edge: the sum over images of ``|E|`` per image.
    layers : sequence of str, optional
        Contract the result onto these layers (module names), conserving flow.
    device : str or torch.device, optional
        ``None``: CUDA when available, else CPU.
    batch_size : int, default 64
        Images per step (ignored when ``data`` is a DataLoader).
    num_workers : int, optional
        Processes decoding an ImageFolder (or reading a Dataset); ``None``: one fewer than the
        CPUs, at most 8, for a folder of more than one batch. Tensors are sliced into batches
        (no collation, no workers); CPU tensors are pinned ahead of a CUDA run.
    transform : callable, optional
        For ImageFolder data; default resize, center crop 224, ImageNet normalisation.
    labels : sequence of str, optional
        Class names of the output units (default: the dataset's classes when they match).
        Dataset labels index the dataset's ``classes`` (the torchvision convention); with
        ``target="label"`` they are mapped to output units by class name when both lists are
        known and differ (case, spaces and underscores ignored), or by number when the
        classes are digits ("281"); otherwise label i is output unit i.
    max_images : int, optional
        Stop after this many images.
    precision : {"exact", "tf32", "bf16"}, default "exact"
        Arithmetic of a float32 model. ``"exact"``: IEEE float32 throughout; TF32 is switched
        off for the run (cuDNN uses it for float32 convolutions by default on Ampere and
        later GPUs, which breaks completeness by percents) and the caller's switches are
        restored afterwards. ``"tf32"``: TF32 matmuls and convolutions (about 1e-3 relative
        per product; faster on GPUs). ``"bf16"``: the forward pass in bfloat16 autocast
        (about 4e-3 relative per product). Either of the last two sets ``meta["exact"]`` False;
        conservation and completeness then hold only approximately
        (``meta["completeness_relative"]`` says how well). Every graph states
        ``meta["precision"]``, ``meta["expected_error"]`` (the relative distance of its flows
        to float64 flows to expect, an order of magnitude: 3e-4 exact, 1e-2 tf32, 1e-1 bf16)
        and ``meta["unit_roundoff"]``. Float64 models always run in float64. Float16 and
        bfloat16 models run in their dtype (``meta["dtype"]``): their graphs state that
        dtype's unit roundoff and expected error (1e-2 float16, 1e-1 bfloat16) and
        ``meta["exact"]`` False.
    amp : bool, default False
        Same as ``precision="bf16"`` (kept for older code).
    progress : bool, default True
        Show a progress bar (images/s) on stderr.
    name, category : str, optional
        ``meta["model"]`` and ``meta["category"]``.
    checkpoint : str or Path, optional
        Folder for resumable runs: every ``checkpoint_every`` batches each process saves its
        sums and position to ``rank{r}.pt`` (atomically). Started again with the same
        arguments, a killed run skips the batches done and ends with exactly the result of
        an uninterrupted run; a checkpoint of other arguments is refused. Kept, marked
        complete, at the end (a rerun then returns at once; delete the folder to recompute).
    checkpoint_every : int, default 50
        Batches between checkpoints.
    examples : int, default 0
        Also keep each unit's top ``examples`` images by maximum activation and by
        attribution (a streaming top-k on the device, see
        :mod:`connectome.extract.dataset_examples`): node attributes ``example_index_j``,
        ``example_value_j``, ``example_pos_j``, ``example_attr_*_j`` and ``meta["examples"]``
        (read them with :mod:`connectome.patches`).

    Returns
    -------
    Connectome
        Edge ``weight`` = flow ``E``; node attributes ``attribution``, ``bias_attribution``,
        ``activation_mean``, ``activation_std``, ``activation_max``, ``frequency``; with
        ``per_sample`` the edge column ``abs_weight``; with ``examples`` the example columns.

    Raises
    ------
    DataError
        Empty data, labels out of range, unknown target class, undecodable images only.
    ConnectomeError
        ``device="cuda"`` without a GPU; a batch that runs out of GPU memory.
    ExtractionError
        The model cannot be traced or mapped to units.
    BadFileError
        A checkpoint file that is corrupted or not a checkpoint.

    Notes
    -----
    Under ``torchrun`` (an initialised default process group with several processes) each
    process reads its shard of the data, ``range(n)[rank::world_size]``, on its own device
    (``cuda:LOCAL_RANK`` for ``device=None`` or ``"cuda"``); the sums are combined once at the
    end with ``all_reduce`` and every process returns the same Connectome. Such runs (and
    checkpointed ones) read the dataset in its own order and ``max_images`` takes its first
    items. See :mod:`connectome.extract.distributed`.
    """
    check_model(model)
    precision = resolve_precision(precision, amp)
    if max_images is not None and (int(max_images) != max_images or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}")
    if isinstance(examples, bool) or int(examples) != examples or examples < 0:
        raise ValueError(f"examples must be a number of images per unit (0: none), got {examples!r}")
    info = make_loader(data, batch_size=batch_size, num_workers=num_workers, transform=transform,
                       pin_memory=resolve_device(device).type == "cuda")
    return _attribution(model, info, target, per_sample=per_sample, layers=layers, device=device, labels=labels,
                        max_images=max_images, precision=precision, progress=progress, name=name, category=category,
                        checkpoint=checkpoint, checkpoint_every=checkpoint_every, _batch_hook=_batch_hook,
                        examples=examples)


def _attribution(model: nn.Module, info: Any, target: Any = "label", *, per_sample: bool = False,
                 layers: Sequence[str] | None = None, device: Any = None, labels: Sequence[str] | None = None,
                 max_images: int | None = None, precision: str = "exact", amp: bool = False, progress: bool = True,
                 name: str | None = None, category: str | None = None, checkpoint: Any = None,
                 checkpoint_every: int = 50, _batch_hook: Callable[[int], None] | None = None,
                 category_label: int | None = None, examples: int = 0,
                 trace_cache: dict[Any, Any] | None = None, local: bool = False) -> Connectome:
    from connectome.extract.distributed import rank_device, rank_world

    check_model(model)
    precision = resolve_precision(precision, amp)
    dev = rank_device(resolve_device(device))
    acc, t_info = _accumulate(model, info, target, dev, per_sample, precision, progress, max_images, labels,
                              batch_hook=_batch_hook, category=category, checkpoint=checkpoint,
                              checkpoint_every=checkpoint_every, category_label=category_label,
                              examples=examples, trace_cache=trace_cache, local=local)
    g = acc.to_graph(t_info["labels"], {
        "model": name or type(model).__name__,
        "target": target if isinstance(target, (str, int)) else getattr(target, "__name__", "callable"),
        "target_class": t_info["target_class"] if t_info["target_class"] is not None else t_info.get("category_unit"),
        "category": category,
        "seconds": round(t_info["seconds"], 3),
        "skipped_images": len(t_info["skipped"]),
        "versions": versions(),
    })
    # float32 flows computed in TF32 or bfloat16, and a 16-bit model's, are approximations, whatever the ops
    # (precision_meta says exact=False for those)
    arith = precision_meta(t_info["precision"], acc.dtype)
    arith["exact"] = bool(g.meta["exact"]) and arith.get("exact", True)
    g = g.with_meta(**arith)
    if examples:  # what a stored image index means: dataset order, and the files of an ImageFolder
        from connectome.patches import example_arrays

        used = np.concatenate([example_arrays(g, by)[0].ravel() for by in ("activation", "attribution")])
        g = g.with_meta(examples={**g.meta["examples"], **t_info["order"].describe(used)})
    world = 1 if local else rank_world()[1]
    if world > 1:  # every process returns the same graph: no per-process device in it
        g = g.with_meta(device=dev.type, world_size=world)
    if layers:
        if "abs_weight" in g.edge_attrs:
            warnings.warn("layers=: the contracted graph has no abs_weight (per-image |flow| does not split "
                          "through dropped layers); contract the signed flows only", stacklevel=2)
        g = g.contract([_layer_name(g, l) for l in as_layer_names(layers)])
    return g


def _layer_name(g: Connectome, name: str) -> str:
    from connectome.extract.targets import resolve_layer

    return g.layers[resolve_layer(name, g.layers, where="to contract onto")].name


def _accumulate(model, info, target, dev, per_sample, precision, progress, max_images, labels,
                batch_hook: Callable[[int], None] | None = None, category: str | None = None,
                category_label: int | None = None,
                checkpoint: Any = None, checkpoint_every: int = 50,
                examples: int = 0, trace_cache: dict[Any, Any] | None = None,
                local: bool = False) -> tuple[FlowAccumulator, dict[str, Any]]:
    from tqdm.auto import tqdm

    from connectome._text import printable
    from connectome.extract.distributed import ShardedRun, SkippedNames, rank_world

    t0 = time.perf_counter()
    m = model_on(model, dev)
    dtype = model_dtype(m)
    precision = run_precision(precision, dtype)
    amp = precision == "bf16"
    skipped = SkippedNames()  # counts every file, keeps a few names: memory does not grow with the data
    total = info.n_images if max_images is None else min(info.n_images or max_images, max_images)
    run = None  # this process's shard of a distributed run, and/or a run resumable from a checkpoint
    # local: this process runs all of the images alone (categories split across processes)
    if not local and (checkpoint is not None or rank_world()[1] > 1):
        run = ShardedRun(info, m, dev, target=target, per_sample=per_sample, amp=amp, max_images=max_images,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, category=category,
                         precision=precision, examples=examples)
        skipped, total, max_images = run.skipped, run.n, None  # the shards already stop at max_images
    scale = run.world if run is not None else 1  # rank 0's bar shows the whole job's images/s (about)
    desc = f"attribution {printable(category)}" if category else "attribution"  # a folder name on the terminal
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress or (run is not None and run.rank != 0),
               leave=False, dynamic_ncols=True, initial=run.images_done if run is not None else 0)
    acc = None
    error: BaseException | None = None
    t_info: dict[str, Any] = {"labels": None, "target_class": None, "precision": precision}

    def start(x: torch.Tensor) -> tuple[FlowAccumulator, Callable[..., torch.Tensor], int]:
        # the categories of one run share the model: trace it once (a second or more per trace)
        key = (id(m), tuple(x.shape[1:]), dtype, str(dev))
        ug = None if trace_cache is None else trace_cache.get(key)
        if ug is None:
            ug = trace_units(m, x[:1].to(dev, dtype=dtype))
            if trace_cache is not None:
                trace_cache.clear()
                trace_cache[key] = ug
        n_out = ug.layers[ug.output_layer].size
        t_info["labels"] = labels_for_output(labels, info.classes, n_out)
        fn, t_info["target_class"] = _target_fn(target, n_out, t_info["labels"] or info.classes)
        # labels index the dataset's classes (the torchvision convention); map them to output units
        t_info["label_map"] = label_map(info.classes, t_info["labels"], n_out) if target == "label" else None
        if category_label is not None and target == "label":
            lm = t_info["label_map"]
            t_info["category_unit"] = int(lm[category_label]) if lm is not None and category_label < len(lm) \
                else int(category_label)
        acc = FlowAccumulator(ug, dev, dtype, per_sample=per_sample, amp=amp, examples=examples)
        if run is not None:
            run.restore(acc)
        return acc, fn, n_out

    if examples:
        from connectome.extract.dataset_examples import ImageOrder

        t_info["order"] = ImageOrder(info.loader if run is None else run.loader, info.dataset)
    try:
        with eval_mode(m), no_inplace(m), precision_mode(precision):
            seen = 0
            for bi, batch in enumerate(info.loader if run is None else run.loader,
                                       start=0 if run is None else run.start_batch):
                x, y, sk = unpack_batch(batch)
                skipped.extend(sk)
                index = None
                if examples:
                    n_kept = 0 if x is None else x.shape[0]
                    index = t_info["order"].next(n_kept, sk, n_kept if max_images is None else
                                                 max(0, min(n_kept, max_images - seen)))
                if x is None:
                    if run is not None:
                        run.after_batch(acc, bi)
                    continue
                if max_images is not None and seen + x.shape[0] > max_images:
                    x = x[: max_images - seen]
                    y = y[: max_images - seen] if y is not None else None
                if acc is None:
                    acc, fn, n_out = start(x)
                lm = t_info.get("label_map")
                if y is not None and lm is not None:
                    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(lm)):
                        raise DataError(f"labels {int(y.min())}..{int(y.max())} do not index the dataset's {len(lm)} classes")
                    y = lm[y]
                if target == "label":
                    y = check_labels(y, n_out)  # one wording with ablate and fidelity
                yd = y.to(dev, non_blocking=True) if y is not None else None
                try:
                    acc.step(x, lambda logits: fn(logits, yd), index=index)
                except torch.OutOfMemoryError:
                    raise ConnectomeError(
                        f"a batch of {x.shape[0]} images ran out of GPU memory; try batch_size={max(1, x.shape[0] // 2)}"
                        + (" or per_sample=False" if per_sample else "")
                    ) from None
                seen += x.shape[0]
                bar.update(x.shape[0] * scale)
                if run is not None:
                    run.after_batch(acc, bi)
                if batch_hook is not None:
                    batch_hook(bi)
                if max_images is not None and seen >= max_images:
                    break
            if run is not None and acc is None:
                # This shard is empty (or was done before a resume): trace on one image anyway,
                # so that this process holds accumulators of the right shapes for all_reduce.
                example = run.example()
                if example is not None:
                    acc, _, _ = start(example)
    except BaseException as exc:
        if run is None:
            raise
        error = exc  # raised below on every process, once they all know (none waits forever)
    finally:
        bar.close()
    if run is not None:
        t_info["seconds"] = run.finish(acc, error, time.perf_counter() - t0)
    warn_skipped(skipped)
    if acc is None:
        raise no_images_error(skipped)
    t_info["skipped"] = skipped
    t_info.setdefault("seconds", time.perf_counter() - t0)
    return acc, t_info


def attribution_by_category(
    model: nn.Module,
    data: Any,
    target: Any = "label",
    *,
    categories: Sequence[str] | None = None,
    batch_size: int = 64,
    transform: Callable[[Any], Any] | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    out: str | Path | None = None,
    dtype: str = "float32",
    circuits: bool = True,
    **kwargs: Any,
) -> Any:
    """One attribution graph per image category, named by class name.

    Images are grouped by label (read from the dataset's ``targets`` without decoding
    images when available) and each group runs through :func:`attribution`; every image
    is read once.

    Parameters
    ----------
    model, data, target, batch_size, transform, progress
        As in :func:`attribution`.
    categories : sequence of str, optional
        Only these categories (class names).
    checkpoint : str or Path, optional
        Folder for a resumable run: one sub-folder per category (``<label>-<name>``), as in
        :func:`attribution`; categories finished before an interruption are not read again.
    checkpoint_every : int, default 50
        Batches between checkpoints.
    out : str or Path, optional
        Stream the graphs into a category store in this folder (see :mod:`connectome.store`)
        instead of returning them: memory holds one category's sums and the topology,
        whatever the number of categories. Each category is written when it finishes; the
        store is also the checkpoint: run again, and the categories in it are skipped.
    dtype : {"float32", "float64"}, default "float32"
        With ``out``: the on-disk dtype of the edge flows.
    circuits : bool, default True
        With ``out``: also store each category's circuit (mass 0.8), which
        ``compare_categories(store)`` overlaps.
    **kwargs
        Passed to :func:`attribution` (``per_sample``, ``device``, ``precision``, ``layers`` ...).

    Returns
    -------
    dict of str -> Connectome, or CategoryStore
        In class order; ``meta["category"]`` and ``meta["target_class"]`` set. With ``out``,
        the store (opened read-only, lazily).

    Notes
    -----
    Under ``torchrun`` every process runs the categories in the same (class) order, each
    split across the processes as in :func:`attribution`, and returns the same graphs. With
    ``out`` and at least as many categories as processes, the categories are split instead:
    each process computes its own (all their images, no communication) and writes them
    (see :func:`write_stream`); every process returns the store.
    :func:`iter_attribution_by_category` yields each graph as it finishes instead.
    """
    if out is not None:
        from functools import partial

        from connectome.store import CategoryStore, StoreWriter

        run_info = {"model": kwargs.get("name") or type(model).__name__,
                    "target": target if isinstance(target, (str, int)) else getattr(target, "__name__", "callable")}
        with _rank0_writer(out, run_info, dtype) as writer:
            run = iter_attribution_by_category(model, data, target, categories=categories, batch_size=batch_size,
                                               transform=transform, progress=progress, checkpoint=checkpoint,
                                               checkpoint_every=checkpoint_every, skip=_shared_done(writer),
                                               **kwargs)
            write_stream(run, writer, circuits=circuits, part=partial(StoreWriter, out, run_info, dtype=dtype))
        return CategoryStore(out)
    return dict(iter_attribution_by_category(model, data, target, categories=categories, batch_size=batch_size,
                                             transform=transform, progress=progress, checkpoint=checkpoint,
                                             checkpoint_every=checkpoint_every, **kwargs))


@contextmanager
def _rank0_writer(out: str | Path, run_info: dict[str, Any], dtype: str, what: str | None = None
                  ) -> Iterator[Any]:
    """On process 0, the folder's lock and a :class:`~connectome.store.StoreWriter`; None on the
    others. Every process learns of a failure (none waits forever)."""
    from connectome.extract.distributed import agree, rank_world
    from connectome.store import StoreWriter, WriterLock

    lock = writer = error = None
    if rank_world()[0] == 0:
        try:
            lock = WriterLock(out, what)
            lock.acquire()
            writer = StoreWriter(out, run_info, dtype=dtype, what=what)
        except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
            error = exc
    try:
        agree(error)
        yield writer
    finally:
        if lock is not None:
            lock.release()


def _shared_done(writer: Any) -> list[str]:
    """The categories already in the store, as process 0 sees them, on every process."""
    from connectome.extract.distributed import rank_world

    done = writer.done if writer is not None else []
    if rank_world()[1] > 1:
        import torch.distributed as dist

        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    return list(done)


def circuit_mask(g: Connectome, mass: float | None = None) -> np.ndarray | None:
    """1 for the units of ``g``'s circuit (:func:`connectome.analysis.circuit` at ``mass``), 0 else;
    None when the graph has no circuit (no target, no flow)."""
    from connectome.analysis.circuits import circuit_units
    from connectome.store import CIRCUIT_MASS

    try:
        kept = circuit_units(g, mass=CIRCUIT_MASS if mass is None else mass)
    except ConnectomeError:
        return None
    return kept.astype(np.int64)


def write_stream(run: Any, writer: Any, prepare: Callable[[str, Connectome], Connectome] | None = None,
                 written: Callable[[str, Connectome], None] | None = None, circuits: bool = True,
                 part: Callable[..., Any] | None = None) -> int:
    """Write each ``(category, graph)`` of ``run`` into ``writer`` as it comes.

    ``prepare`` may change a graph before it is written, ``written`` is told after;
    ``circuits``: also store each category's circuit (for circuit overlaps; on ResNet-50 a
    few seconds of CPU per category). Returns the number of categories written (by all
    processes).

    Under ``torchrun`` (``writer`` on process 0, None on the others): with at least as many
    categories as processes and ``part`` given (``part(part=rank)`` opens the store for
    process ``rank``), the categories are split across the processes, each computing its own
    with all their images and writing them into their rows of the store, with no
    communication per category; otherwise every process takes part in every category (its
    images split across them) and process 0 writes. Either way every process learns of a
    failure.
    """
    from connectome.extract.distributed import agree, rank_world

    rank, world = rank_world()
    if world > 1 and part is not None and len(run) >= world:
        return _write_split(run, writer, prepare, written, circuits, part)
    writer.reserve(len(run)) if writer is not None else None
    bg = _Background(lambda cname, g: _write_one(writer, cname, g, prepare, written, circuits)) \
        if writer is not None else None
    try:
        for cname, g in run:
            error = None
            if bg is not None:
                try:
                    bg.put(cname, g)
                except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
                    error = exc
            del g  # one category's graph computed while the one before is written
            agree(error)
    finally:
        error = bg.close() if bg is not None else None  # the categories finished are written, also on an error
    agree(error)
    if writer is not None:
        writer.merge_parts()  # the parts an interrupted split run left
    return bg.done if bg is not None else 0


class _Background:
    """Runs ``fn(*args)`` for each :meth:`put` on one thread, in order, while the caller computes the
    next: a category's circuit and compressed columns are made while the next category's images
    run (on the CPU that work is a large part of a small category's time). At most one call runs
    at a time and none waits in line: :meth:`put` first waits for the one before, so memory holds
    one graph being written and one being computed. The first error is raised by the next
    :meth:`put`; :meth:`close` waits for the last call and returns its error (None when all went
    well)."""

    def __init__(self, fn: Callable[..., int]):
        import queue
        import threading

        self.fn, self.done = fn, 0
        self.error: BaseException | None = None
        self._q: Any = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._work, name="connectome-store-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            args = self._q.get()
            try:
                if args is None:
                    return
                if self.error is None:
                    self.done += self.fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.error = exc
            finally:
                del args
                self._q.task_done()

    def put(self, *args: Any) -> None:
        self._q.join()  # the call before has finished
        if self.error is not None:
            raise self.error
        self._q.put(args)

    def close(self) -> BaseException | None:
        self._q.join()
        self._q.put(None)
        self._thread.join()
        return self.error


def _write_one(writer: Any, cname: str, g: Connectome, prepare: Any, written: Any, circuits: bool,
               row: int | None = None) -> int:
    if prepare is not None:
        g = prepare(cname, g)
    writer.write(cname, g, circuit=circuit_mask(g) if circuits else None, row=row)
    if written is not None:
        written(cname, g)
    return 1


def _write_split(run: Any, writer: Any, prepare: Any, written: Any, circuits: bool, part: Callable[..., Any]) -> int:
    """Categories split across the processes; see :func:`write_stream`."""
    import torch.distributed as dist

    from connectome.extract.distributed import _comm_device, agree, rank_world

    rank, world = rank_world()
    box = [writer.next_row if writer is not None else None]
    dist.broadcast_object_list(box, src=0)
    rows = {c: int(box[0]) + i for i, c in enumerate(run.categories)}  # the rows one process would give them
    error: BaseException | None = None
    n = 0
    run.split_across_processes()
    it = iter(run)
    first = None
    try:
        first = next(it, None)  # every process computes its first category
        if writer is not None:
            writer.reserve(len(run))
            if first is not None:  # process 0 writes first: the topology and every column's array
                n += _write_one(writer, *first, prepare, written, circuits, row=rows[first[0]])
                first = None
    except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
        error = exc
    agree(error)
    bg = None
    try:
        mine = writer if writer is not None else part(part=rank)
        if first is not None:
            n += _write_one(mine, *first, prepare, written, circuits, row=rows[first[0]])
            first = None
        bg = _Background(lambda cname, g: _write_one(mine, cname, g, prepare, written, circuits, row=rows[cname]))
        for cname, g in it:
            bg.put(cname, g)
            del g
    except BaseException as exc:  # noqa: BLE001 - re-raised by agree() once every process is done
        error = exc
    if bg is not None:
        late = bg.close()  # the categories finished are written, also after an error
        error = error if error is not None else late
        n += bg.done
    agree(error)
    total = torch.tensor([float(n)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    if writer is not None:
        writer.merge_parts()
    return int(total.item())


def iter_attribution_by_category(
    model: nn.Module,
    data: Any,
    target: Any = "label",
    *,
    categories: Sequence[str] | None = None,
    skip: Collection[str] = (),
    batch_size: int = 64,
    transform: Callable[[Any], Any] | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    **kwargs: Any,
) -> "CategoryRun":
    """``(category, graph)`` for each category as it finishes, in class order.

    As :func:`attribution_by_category` (same parameters), but only one category's graph
    exists at a time: write each where it belongs before asking for the next. The data and
    the category names are checked here, before any image is read; the result's
    ``categories`` lists the names it will yield.

    Parameters
    ----------
    skip : collection of str, optional
        Categories not to compute (done by an earlier run).

    Returns
    -------
    CategoryRun
        An iterable of ``(str, Connectome)``.
    """
    return CategoryRun(model, data, target, categories=categories, skip=skip, batch_size=batch_size,
                       transform=transform, progress=progress, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, **kwargs)


class CategoryRun:
    """The categories of a dataset, checked, and an iterator that computes them one at a time.

    Built by :func:`iter_attribution_by_category`. ``categories``: the names in the order they
    come (class order), without the skipped ones; ``labels``: name -> dataset label.
    """

    def __init__(self, model: nn.Module, data: Any, target: Any, *, categories: Sequence[str] | None,
                 skip: Collection[str], batch_size: int, transform: Callable[[Any], Any] | None, progress: bool,
                 checkpoint: str | Path | None, checkpoint_every: int, **kwargs: Any):
        info = make_loader(data, batch_size=batch_size, transform=transform)
        targets = dataset_targets(info.dataset)
        if targets is None:
            targets = []
            for batch in info.loader:
                _, y, _ = unpack_batch(batch)
                if y is None:
                    raise DataError("attribution_by_category needs labels; the data has images only")
                targets.extend(int(v) for v in y.tolist())
        classes = info.classes or [str(c) for c in sorted(set(targets))]
        by_label: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_label.setdefault(int(t), []).append(i)
        names = {i: (classes[i] if i < len(classes) else str(i)) for i in by_label}
        if info.classes is not None and isinstance(data, (str, Path)):
            empty = [c for i, c in enumerate(info.classes) if i not in by_label]
            if empty:
                raise DataError(
                    f"category folder(s) {empty} under {str(data)!r} hold no images; add images or remove the folders"
                )
        if categories is not None:
            unknown = [c for c in categories if c not in names.values()]
            if unknown:
                raise DataError(f"categories {unknown} are not in the data; it has {sorted(names.values())}")
        todo = [label for label in sorted(by_label) if categories is None or names[label] in categories]
        if not todo:
            raise DataError("no category had images")
        skip = set(skip)
        self.labels = {names[label]: label for label in todo if names[label] not in skip}
        self.categories = list(self.labels)
        self._by_label, self._info, self._model, self._target = by_label, info, model, target
        self._batch_size, self._progress, self._checkpoint = batch_size, progress, checkpoint
        self._checkpoint_every, self._kwargs = checkpoint_every, kwargs
        self.split = False

    def split_across_processes(self) -> list[str]:
        """Under ``torchrun``: this process computes only its categories, ``categories[rank::world]``,
        each with all its images and no communication (instead of every category's images split
        across the processes). Returns them. Checkpoint folders are not used: the categories
        done are the checkpoint."""
        from connectome.extract.distributed import rank_world

        rank, world = rank_world()
        self.split = True
        return self.categories[rank::world]

    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[tuple[str, Connectome]]:
        from connectome.extract.distributed import category_folder, rank_world

        kwargs, target = self._kwargs, self._target
        cache: dict[Any, Any] = {}
        mine = set(self.split_across_processes()) if self.split else None
        todo = [(c, label) for c, label in self.labels.items() if mine is None or c in mine]
        pin = resolve_device(kwargs.get("device")).type == "cuda"
        # one loader for every category read whole by this process (not for checkpointed or
        # image-split runs, which read each category's shard with a loader of their own, nor
        # with max_images: a category cut short would leave the rest of its images to decode)
        shared = None
        if self._checkpoint is None and (self.split or rank_world()[1] == 1) and \
                not isinstance(self._info.loader, TensorLoader) and kwargs.get("max_images") is None:
            shared = CategoryBatches(self._info, [self._by_label[label] for _, label in todo], self._batch_size,
                                     num_workers=kwargs.get("num_workers"), pin_memory=pin)
        try:
            for cname, label in todo:
                if shared is not None:
                    sub_info = shared.category(self._by_label[label])
                else:
                    sub_info = subset_loader(self._info, self._by_label[label], self._batch_size,
                                             num_workers=kwargs.get("num_workers"), pin_memory=pin)
                ck = None if self._checkpoint is None or self.split else \
                    Path(self._checkpoint) / category_folder(label, cname)
                try:
                    g = _attribution(self._model, sub_info, target, progress=self._progress and rank_world()[0] == 0,
                                     category=cname, checkpoint=ck, category_label=int(label),
                                     checkpoint_every=self._checkpoint_every, trace_cache=cache, local=self.split,
                                     **{k: v for k, v in kwargs.items() if k != "num_workers"})
                except DataError as exc:
                    raise DataError(f"category {cname!r}: {exc}") from None
                if g.meta.get("target_class") is None and target == "label":
                    g = g.with_meta(target_class=int(label))
                yield cname, g
        finally:
            if shared is not None:
                shared.close()

