"""timm models extract exactly when timm is installed (an optional extra; skipped without it)."""

from __future__ import annotations

import pytest
import torch


timm = pytest.importorskip("timm")

MODELS = [
    pytest.param("resnet18", id="resnet18"),
    pytest.param("efficientnet_lite0", id="efficientnet_lite0"),
    pytest.param("mobilenetv3_small_100", id="mobilenetv3_small_100"),
    pytest.param("regnety_002", id="regnety_002"),
    pytest.param("convnext_atto", id="convnext_atto"),
    pytest.param("vit_tiny_patch16_224", id="vit_tiny_patch16_224"),
    pytest.param("deit_tiny_distilled_patch16_224", id="deit_tiny_distilled_patch16_224", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", id="efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("densenet121", id="densenet121", marks=pytest.mark.slow),
    pytest.param("inception_v3", id="inception_v3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_extracts_exactly(name, exact_graph):
    torch.manual_seed(0)
    kw = {"img_size": 32} if name.startswith(("vit_", "deit_")) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval().double()
    size = 96 if name == "inception_v3" else 32
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 3])
    exact_graph(model, x, y)
