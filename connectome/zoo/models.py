"""Small trained models shipped with the toolkit, and how to load them.

Two architectures, both built only from ``Conv2d``, ``BatchNorm2d``,
``ReLU``, pooling, ``flatten``, ``Linear`` and residual ``+`` so that every
extractor in the toolkit can handle them and ``torch.fx.symbolic_trace``
works (there is no data-dependent control flow).  Each ReLU and pooling
position has its own module so hooks and graph nodes have unique, readable
names.

The shipped models are trained on :func:`connectome.zoo.shapes` by
:func:`connectome.zoo.train.train_all`; their weights live in
``connectome/zoo/weights/<name>.pt`` (state dicts) and their metadata in
``connectome/zoo/weights/models.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from connectome._safety import safe_torch_load

from .shapes import SHAPE_CLASSES

__all__ = [
    "SimpleCNN",
    "BasicBlock",
    "SmallResNet",
    "WEIGHTS_DIR",
    "list_models",
    "build_model",
    "load_model",
    "model_info",
]

#: Directory of the shipped weight files and ``models.json``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

_METADATA_FILE = "models.json"


class SimpleCNN(nn.Module):
    """Plain three-layer CNN with global average pooling.

    Layers: ``conv1`` (3->16, 3x3) - ``relu1`` - ``pool1`` (2x2 max) -
    ``conv2`` (16->32) - ``relu2`` - ``pool2`` - ``conv3`` (32->64) -
    ``relu3`` - ``avgpool`` (global) - flatten - ``fc`` (64->classes).

    Parameters
    ----------
    num_classes : int, optional
        Number of output logits.
    width : int, optional
        Channels of ``conv1``; ``conv2`` has twice and ``conv3`` four times
        as many.

    Example
    -------
    >>> model = SimpleCNN()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 9])
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class BasicBlock(nn.Module):
    """Residual block: two 3x3 conv-BN layers plus a skip connection.

    ``out = relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))`` where the
    shortcut is the identity, or a strided 1x1 ``shortcut_conv`` followed by
    ``shortcut_bn`` when the block changes resolution or width.

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    out_channels : int
        Channels of the output.
    stride : int, optional
        Stride of ``conv1`` (2 halves the resolution).

    Example
    -------
    >>> block = BasicBlock(16, 32, stride=2)
    >>> block(torch.zeros(1, 16, 16, 16)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut_conv: nn.Conv2d | None
        self.shortcut_bn: nn.BatchNorm2d | None
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(out_channels)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Decided by the architecture, not the data, so fx tracing is static.
        if self.shortcut_conv is not None:
            identity = self.shortcut_bn(self.shortcut_conv(x))
        else:
            identity = x
        return self.relu2(out + identity)


class SmallResNet(nn.Module):
    """Small residual network with BatchNorm and one downsampling block.

    Layers: stem ``conv1`` (3->16, 3x3) - ``bn1`` - ``relu1`` - ``pool1``
    (2x2 max) - ``layer1`` (:class:`BasicBlock` 16->16) - ``layer2``
    (16->32, stride 2, 1x1 projection shortcut) - ``layer3`` (32->32) -
    ``avgpool`` (global) - flatten - ``fc`` (32->classes).

    Parameters
    ----------
    num_classes : int, optional
        Number of output logits.
    width : int, optional
        Channels of the stem and ``layer1``; ``layer2``/``layer3`` have twice
        as many.

    Example
    -------
    >>> model = SmallResNet()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 9])
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class TinyViT(nn.Module):
    """A two-block vision transformer for 32x32 shape images (torchvision's ``VisionTransformer``).

    4x4 patches (64 tokens and a class token), width 32, two heads, MLP width 64: the same
    code as ``vit_b_16``, small enough to train on the CPU in minutes, so that the demo
    can show a transformer's circuits (attention under the attention rule, GELU, LayerNorm).
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), width: int = 32) -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=width,
                                     mlp_dim=2 * width, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "SimpleCNN": SimpleCNN,
    "SmallResNet": SmallResNet,
    "TinyViT": TinyViT,
}

# The shipped models: architecture and the seed their training starts from.
_REGISTRY: dict[str, dict[str, Any]] = {
    "simplecnn_a": {"architecture": "SimpleCNN", "seed": 0},
    "simplecnn_b": {"architecture": "SimpleCNN", "seed": 1},
    "smallresnet": {"architecture": "SmallResNet", "seed": 2},
    "tinyvit": {"architecture": "TinyViT", "seed": 3},
}


def list_models() -> list[str]:
    """Names of the shipped models.

    Returns
    -------
    list of str
        Names accepted by :func:`load_model` and :func:`model_info`.

    Example
    -------
    >>> list_models()
    ['simplecnn_a', 'simplecnn_b', 'smallresnet', 'tinyvit']
    """
    return list(_REGISTRY)


def check_name(name: str) -> dict[str, Any]:
    """The registry entry of shipped model ``name``; a ValueError listing the names if unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(name: str) -> nn.Module:
    """Create an untrained model with the architecture of a shipped model.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.

    Returns
    -------
    torch.nn.Module
        Freshly initialised model (in training mode) for the nine shape
        classes.

    Raises
    ------
    ValueError
        If ``name`` is not a shipped model.

    Example
    -------
    >>> type(build_model("smallresnet")).__name__
    'SmallResNet'
    """
    spec = check_name(name)
    return _ARCHITECTURES[spec["architecture"]](num_classes=len(SHAPE_CLASSES))


def model_info(name: str, *, weights_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Metadata of a shipped model.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.
    weights_dir : path-like, optional
        Directory holding ``models.json``; defaults to the shipped
        :data:`WEIGHTS_DIR`.

    Returns
    -------
    dict
        At least ``name``, ``architecture`` and ``seed``; once trained also
        ``accuracy`` (held-out), ``image_size``, ``classes``, ``num_params``,
        ``epochs`` and the data seeds used.  A fresh copy: editing it changes
        nothing.

    Raises
    ------
    ValueError
        If ``name`` is not a shipped model.

    Example
    -------
    >>> model_info("simplecnn_a")["architecture"]
    'SimpleCNN'
    """
    spec = check_name(name)
    info: dict[str, Any] = {"name": name, **spec}
    path = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta_path = path / _METADATA_FILE
    if meta_path.is_file():
        with open(meta_path, encoding="utf-8") as fh:
            info.update(json.load(fh).get(name, {}))
    return info


def load_model(name: str, *, weights_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load a shipped model with its trained weights, in eval mode.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.
    weights_dir : path-like, optional
        Directory holding ``<name>.pt``; defaults to the shipped
        :data:`WEIGHTS_DIR` (use it for the output of
        :func:`connectome.zoo.train_all` with ``out_dir``).

    Returns
    -------
    torch.nn.Module
        The model on the CPU, in eval mode.

    Raises
    ------
    ValueError
        If ``name`` is not a shipped model.
    FileNotFoundError
        If the weight file is missing.

    Example
    -------
    >>> model = load_model("simplecnn_a")
    >>> model.training
    False
    """
    model = build_model(name)
    path = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights for {name!r} at {path}; run connectome.zoo.train_all() to create them"
        )
    state = safe_torch_load(path, what="zoo weights")
    model.load_state_dict(state)
    model.eval()
    return model
