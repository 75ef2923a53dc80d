"""connectome: trained neural networks as connectomes.

>>> import connectome as cn
>>> g = cn.extract.weights(model, input_shape=(3, 224, 224))   # doctest: +SKIP
>>> g.save("g.npz"); g2 = cn.load("g.npz")                      # doctest: +SKIP

Subpackages load on first use (``cn.extract`` and the model-running parts of
``cn.analysis`` import torch; ``cn.load`` and graph analysis do not).
"""

from __future__ import annotations

import importlib
from typing import Any

from connectome.errors import (
    BadFileError,
    ConnectomeError,
    DataError,
    EmptyGraphError,
    ExportError,
    ExtractionError,
)
from connectome.graph import Connectome, Layer
from connectome._version import __version__
from connectome.io import load


__all__ = [
    "Connectome",
    "Layer",
    "load",
    "io",
    "gephi",
    "extract",
    "analysis",
    "viz",
    "zoo",
    "patches",
    "ConnectomeError",
    "ExtractionError",
    "EmptyGraphError",
    "ExportError",
    "BadFileError",
    "DataError",
    "__version__",
]

_LAZY = {"extract", "analysis", "viz", "zoo", "io", "gephi", "cli", "patches"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"connectome.{name}")
    raise AttributeError(f"module 'connectome' has no attribute {name!r}")
