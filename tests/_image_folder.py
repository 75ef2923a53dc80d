"""Test data for the CLI's extract tests: a tiny ImageFolder and a model file to go with it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def image_folder_model(root: Path, names: list[str], n: int = 2, outputs: int | None = None) -> str:
    """An ImageFolder ``root/imgs/<name>/`` of ``n`` images per name and a model file ``root/m.py``
    with one output per name (``outputs`` if given); returns the model spec ``m.py:build``
    (``m.py:other`` is a second, wider model)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        d = os.path.join(os.fsencode(root / "imgs"), os.fsencode(name))
        os.makedirs(d)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(os.path.join(d, b"%d.png" % i))
    (root / "m.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        f"                         nn.Flatten(), nn.Linear(4, {outputs or len(names)}))\n"
        "def other():\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        f"                         nn.Flatten(), nn.Linear(5, {outputs or len(names)}))\n"
    )
    return f"{root / 'm.py'}:build"
