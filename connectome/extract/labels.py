"""Dataset categories and the model's output units: which unit a label is, and the output layer's names."""

from __future__ import annotations

from typing import Sequence

import torch

from connectome.errors import DataError

__all__ = ["label_map", "labels_for_output"]


def _norm_name(s: str) -> str:
    return " ".join(str(s).replace("_", " ").split()).lower()


def label_map(classes: Sequence[str] | None, out_labels: Sequence[str] | None, n_out: int) -> torch.Tensor | None:
    """Dataset label -> output unit, when the dataset's classes are not the output's units.

    A folder of two ImageNet classes has labels 0 and 1, which are not the model's units 0
    and 1: classes are matched to the output labels by name (case, spaces and underscores
    ignored), or read as unit numbers when they are digits ("281"). ``None``: labels are
    output units as they are.
    """
    if not classes:
        return None
    classes = [str(c) for c in classes]
    if out_labels is not None and list(out_labels) != classes:
        index = {_norm_name(s): i for i, s in enumerate(out_labels)}
        found = [index.get(_norm_name(c)) for c in classes]
        if all(i is not None for i in found):
            return torch.tensor(found, dtype=torch.long)
        if not all(c.isdigit() for c in classes):
            missing = [c for c, i in zip(classes, found) if i is None]
            raise DataError(
                f"categories {missing[:5]} are not among the model's {len(out_labels)} class names; name the folders "
                "after the output classes (or their unit numbers, e.g. '281')"
            )
    if len(classes) != n_out and all(c.isdigit() for c in classes):
        return torch.tensor([int(c) for c in classes], dtype=torch.long)
    return None


def labels_for_output(labels: Sequence[str] | None, classes: Sequence[str] | None, n_out: int) -> list[str] | None:
    if labels is not None:
        labels = [str(s) for s in labels]
        if len(labels) != n_out:
            raise ValueError(f"labels has {len(labels)} names for {n_out} output units")
        return labels
    if classes is not None and len(classes) == n_out:
        return [str(s) for s in classes]
    return None
