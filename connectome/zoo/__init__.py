"""Embedded default data and models: the procedural shapes dataset and small
CNNs trained on it, so every analysis runs offline without downloads.

Example
-------
>>> from connectome import zoo
>>> ds = zoo.shapes(10, seed=0)
>>> model = zoo.load_model("simplecnn_a")
>>> model(ds.images[:4]).shape
torch.Size([4, 9])
"""

from __future__ import annotations

from .models import SimpleCNN, SmallResNet, build_model, list_models, load_model, model_info
from .shapes import MEAN, SHAPE_CLASSES, STD, ShapesDataset, denormalize, shapes
from .train import evaluate, train_all, train_model

__all__ = [
    "shapes",
    "ShapesDataset",
    "SHAPE_CLASSES",
    "MEAN",
    "STD",
    "denormalize",
    "SimpleCNN",
    "SmallResNet",
    "list_models",
    "build_model",
    "load_model",
    "model_info",
    "train_model",
    "train_all",
    "evaluate",
]
