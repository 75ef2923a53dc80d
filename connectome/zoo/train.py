"""Reproduce the shipped zoo weights from scratch on the CPU.

Every epoch trains on a freshly generated :func:`~connectome.zoo.shapes`
sample (seeds derived from the model's seed), which acts as unlimited
augmentation for free; accuracy is measured on a held-out sample drawn with
:data:`HELDOUT_SEED`, a seed no training epoch uses.

Run ``python -m connectome.zoo.train [OUT_DIR]`` to rebuild all weights.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .models import WEIGHTS_DIR, check_name, build_model, list_models
from .shapes import SHAPE_CLASSES, shapes

__all__ = ["HELDOUT_SEED", "train_model", "evaluate", "train_all"]

#: Seed of the held-out evaluation sample (never used for training data).
HELDOUT_SEED = 7_000_001
#: Images per class in the held-out evaluation sample.
HELDOUT_PER_CLASS = 200

# Per-model training settings; chosen to clear 95% held-out accuracy in a
# few minutes on two CPU cores.
_RECIPES: dict[str, dict[str, Any]] = {
    "simplecnn_a": {"epochs": 30, "n_per_class": 500, "lr": 4e-3},
    "simplecnn_b": {"epochs": 30, "n_per_class": 500, "lr": 4e-3},
    "smallresnet": {"epochs": 15, "n_per_class": 500, "lr": 4e-3},
    "tinyvit": {"epochs": 40, "n_per_class": 500, "lr": 3e-3},
}
_BATCH_SIZE = 64
_IMAGE_SIZE = 32


def _epoch_seed(seed: int, epoch: int) -> int:
    # Disjoint from HELDOUT_SEED for any realistic seed/epoch count.
    return 1_000 * (seed + 1) + epoch


@contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    # Training should use the cores it is given but not change the caller's
    # global thread setting afterwards.
    previous = torch.get_num_threads()
    wanted = num_threads if num_threads is not None else min(4, os.cpu_count() or 1)
    torch.set_num_threads(max(1, wanted))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch_size: int = 256) -> float:
    """Classification accuracy of a model on a shapes dataset.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier; it is put in eval mode.
    dataset : ShapesDataset
        Dataset with stacked ``.images`` and ``.targets`` (see
        :func:`connectome.zoo.shapes`).
    batch_size : int, optional
        Images per forward pass.

    Returns
    -------
    float
        Fraction of correctly classified images.

    Example
    -------
    >>> from connectome.zoo import load_model, shapes
    >>> evaluate(load_model("simplecnn_a"), shapes(20, seed=5)) > 0.9
    True
    """
    model.eval()
    targets = torch.as_tensor(dataset.targets)
    correct = 0
    for start in range(0, len(targets), batch_size):
        logits = model(dataset.images[start : start + batch_size])
        correct += int((logits.argmax(1) == targets[start : start + batch_size]).sum())
    return correct / len(targets)


def train_model(
    name: str,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    n_per_class: int | None = None,
    image_size: int = _IMAGE_SIZE,
    progress: bool = True,
    num_threads: int | None = None,
    save_every: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    heldout_per_class: int = HELDOUT_PER_CLASS,
) -> tuple[nn.Module, float]:
    """Train one zoo model from scratch on the shapes dataset.

    Parameters
    ----------
    name : str
        One of :func:`~connectome.zoo.list_models`; selects architecture and
        default settings.
    epochs : int, optional
        Passes, each over a freshly generated sample; defaults to the
        model's recipe.
    seed : int, optional
        Seed for initialisation, shuffling and the training data; defaults to
        the model's registered seed.
    n_per_class : int, optional
        Training images per class per epoch; defaults to the recipe.
    image_size : int, optional
        Side of the square training and evaluation images.
    progress : bool, optional
        Show a tqdm progress bar on stderr.
    num_threads : int, optional
        Torch CPU threads during training (restored afterwards); defaults to
        ``min(4, os.cpu_count())``.
    save_every : int, optional
        Keep a checkpoint (the state dict) every this many optimizer steps, and the
        initial and final ones, as ``checkpoint_dir/step_NNNNNN.pt`` (NNNNNN the step), for
        :func:`connectome.extract.over_training`.
    checkpoint_dir : path-like, optional
        Folder for the checkpoints (created if needed); required with ``save_every``.
    heldout_per_class : int, optional
        Images per class of the held-out sample the accuracy is measured on (fewer for a
        quick run).

    Returns
    -------
    model : torch.nn.Module
        The trained model, in eval mode.
    accuracy : float
        Accuracy on the held-out sample (seed :data:`HELDOUT_SEED`,
        :data:`HELDOUT_PER_CLASS` images per class).

    Raises
    ------
    ValueError
        If ``name`` is unknown or ``epochs`` is less than 1.

    Example
    -------
    >>> model, acc = train_model("simplecnn_a", epochs=1, n_per_class=8, progress=False)
    >>> 0.0 <= acc <= 1.0
    True
    """
    from tqdm.auto import tqdm

    spec = check_name(name)
    recipe = _RECIPES[name]
    epochs = recipe["epochs"] if epochs is None else int(epochs)
    seed = spec["seed"] if seed is None else int(seed)
    n_per_class = recipe["n_per_class"] if n_per_class is None else int(n_per_class)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    save = _checkpointer(save_every, checkpoint_dir)

    with _threads(num_threads):
        torch.manual_seed(seed)
        model = build_model(name)
        generator = torch.Generator().manual_seed(seed)
        n_images = n_per_class * len(SHAPE_CLASSES)
        steps_per_epoch = (n_images + _BATCH_SIZE - 1) // _BATCH_SIZE
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
        # One-cycle warms up then anneals: fast and stable in few epochs.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe["lr"], total_steps=epochs * steps_per_epoch
        )
        loss_fn = nn.CrossEntropyLoss()
        save(model, 0)
        bar = tqdm(
            total=epochs * steps_per_epoch,
            desc=f"train {name}",
            file=sys.stderr,
            disable=not progress,
            leave=True,
        )
        try:
            for epoch in range(epochs):
                data = shapes(n_per_class, seed=_epoch_seed(seed, epoch), size=image_size)
                targets = torch.as_tensor(data.targets)
                order = torch.randperm(n_images, generator=generator)
                model.train()
                for step in range(steps_per_epoch):
                    idx = order[step * _BATCH_SIZE : (step + 1) * _BATCH_SIZE]
                    loss = loss_fn(model(data.images[idx]), targets[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    bar.update(1)
                    done = epoch * steps_per_epoch + step + 1
                    if save_every and done % save_every == 0 and done < epochs * steps_per_epoch:
                        save(model, done)
                    if step % 20 == 0:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        finally:
            bar.close()
        save(model, epochs * steps_per_epoch)
        heldout = shapes(int(heldout_per_class), seed=HELDOUT_SEED, size=image_size)
        accuracy = evaluate(model, heldout)
    model.eval()
    if progress:
        print(f"{name}: held-out accuracy {accuracy:.4f}", file=sys.stderr)
    return model, accuracy


def _checkpointer(save_every: int | None, checkpoint_dir: Any) -> Any:
    """``save(model, step)``: writes ``checkpoint_dir/step_NNNNNN.pt`` atomically, or nothing."""
    if save_every is None:
        return lambda model, step: None
    if isinstance(save_every, bool) or int(save_every) != save_every or save_every < 1:
        raise ValueError(f"save_every must be a positive number of steps, got {save_every!r}")
    if checkpoint_dir is None:
        raise ValueError("save_every needs checkpoint_dir, the folder for the checkpoints")
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)

    def save(model: nn.Module, step: int) -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _atomic_write(folder / f"step_{step:06d}.pt", lambda p, s=state: torch.save(s, p))

    return save


def _atomic_write(path: Path, write: Any) -> None:
    # Write next to the target then rename, so readers never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates owner-only files; shipped files should be readable.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def train_all(
    out_dir: str | os.PathLike[str] | None = None, progress: bool = True, save_every: int | None = None
) -> dict[str, float]:
    """Train every zoo model and write its weights and ``models.json``.

    Parameters
    ----------
    out_dir : path-like, optional
        Destination directory (created if needed); defaults to the shipped
        weights directory, overwriting the shipped files.
    progress : bool, optional
        Show progress bars on stderr.
    save_every : int, optional
        Also keep each model's checkpoints every this many optimizer steps in
        ``out_dir/checkpoints/NAME/step_NNNNNN.pt`` (see :func:`train_model`).

    Returns
    -------
    dict of str to float
        Held-out accuracy of each model.

    Example
    -------
    >>> accuracies = train_all("/tmp/zoo_weights", progress=False)  # doctest: +SKIP
    >>> sorted(accuracies)  # doctest: +SKIP
    ['simplecnn_a', 'simplecnn_b', 'smallresnet']
    """
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, dict[str, Any]] = {}
    accuracies: dict[str, float] = {}
    for name in list_models():
        start = time.perf_counter()
        ckpt = out / "checkpoints" / name if save_every else None
        model, accuracy = train_model(name, progress=progress, save_every=save_every, checkpoint_dir=ckpt)
        seconds = time.perf_counter() - start
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _atomic_write(out / f"{name}.pt", lambda p, s=state: torch.save(s, p))
        spec = check_name(name)
        recipe = _RECIPES[name]
        metadata[name] = {
            "architecture": spec["architecture"],
            "seed": spec["seed"],
            "accuracy": round(accuracy, 4),
            "image_size": _IMAGE_SIZE,
            "classes": list(SHAPE_CLASSES),
            "num_params": sum(p.numel() for p in model.parameters()),
            "epochs": recipe["epochs"],
            "train_per_class_per_epoch": recipe["n_per_class"],
            # Epoch e trains on shapes(seed=first + e); inclusive range.
            "train_data_seed_range": [
                _epoch_seed(spec["seed"], 0),
                _epoch_seed(spec["seed"], recipe["epochs"] - 1),
            ],
            "heldout_seed": HELDOUT_SEED,
            "heldout_per_class": HELDOUT_PER_CLASS,
            "train_seconds": round(seconds, 1),
            "torch_version": torch.__version__.split("+")[0],
        }
        accuracies[name] = accuracy

    def write_json(p: str) -> None:
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(metadata, fh, indent=2)
            fh.write("\n")

    _atomic_write(out / "models.json", write_json)
    return accuracies


if __name__ == "__main__":
    results = train_all(sys.argv[1] if len(sys.argv) > 1 else None)
    for model_name, acc in results.items():
        print(f"{model_name}: {acc:.4f}")
