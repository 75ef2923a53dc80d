"""Every torchvision classification builder extracts exactly, transformers included.

In float64 on small inputs: ``weights()`` builds, ``attribution()`` says it is exact, its
completeness residual is at float precision, and its ``target_total`` is the model's own sum
of target logits. One builder per family runs in the default suite; the rest are ``heavy``
(run them with ``CONNECTOME_HEAVY=1``).
"""

from __future__ import annotations

import os

import pytest
import torch


torchvision = pytest.importorskip("torchvision")

TRANSFORMERS = ("vit_", "maxvit_")  # fixed input sizes (224)
DEFAULT = {"efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf", "shufflenet_v2_x0_5",
           "mnasnet0_5", "convnext_tiny"}
heavy = pytest.mark.skipif(os.environ.get("CONNECTOME_HEAVY") != "1", reason="heavy builder: set CONNECTOME_HEAVY=1")


def _builders() -> list:
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        marks = [] if name in DEFAULT else [pytest.mark.slow, heavy]
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def _small_convnext():
    # the family's own code with a small configuration: the blocks of convnext_tiny, fewer and narrower
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 2)], num_classes=10)


@pytest.mark.parametrize("name", _builders())
def test_builder_extracts_exactly(name, exact_graph):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name == "convnext_tiny":
        model = _small_convnext()
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    model = model.eval().double()
    size = 96 if name == "inception_v3" else (64 if name.startswith(("alexnet", "vgg")) else 32)
    if name.startswith(TRANSFORMERS):
        size = 224
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 7])
    exact_graph(model, x, y)
