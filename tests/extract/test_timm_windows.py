"""timm models whose positions are folded into the batch (windows, LeViT's flatten(0, 1)),
joined along positions (PiT's class token) or unfolded (TNT): float64, random weights, two images, exact.
Slow on a CPU (one to six minutes each): they run with ``CONNECTOME_HEAVY=1``."""

from __future__ import annotations

import os

import pytest
import torch

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.skipif(os.environ.get("CONNECTOME_HEAVY") != "1", reason="set CONNECTOME_HEAVY=1")

# the smallest model of each family that the window and join constructs let through; Swin's
# hand-written attention uses nn.Softmax, so the fused (F.scaled_dot_product_attention) form is built
MODELS = ["swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "gcvit_xxtiny", "levit_128s", "pit_ti_224",
          "tnt_s_patch16_224"]


@pytest.mark.parametrize("name", MODELS)
def test_timm_windows_extract_exactly(name, exact_graph):
    from timm.layers import config

    old = config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(True, experimental=True)
    try:
        m = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    finally:
        config._USE_FUSED_ATTN = old
    torch.manual_seed(0)
    x = torch.randn(2, *m.pretrained_cfg["input_size"], dtype=torch.float64)
    exact_graph(m, x, torch.tensor([1, 3]), weights=False)
