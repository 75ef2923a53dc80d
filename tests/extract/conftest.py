"""Shared checks of the extraction tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import connectome as cn


def no_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised Linear weights (torchvision's ViT heads) random values: zero logits
    would make every completeness check trivially true."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model


def _exact_graph(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, weights: bool = True,
                 conservation: bool = False, rtol: float = 1e-10) -> cn.Connectome:
    """Attribution of a float64 model: exact, complete, its own logits; the weight graph has the same edges."""
    no_zero_layers(model)
    g = cn.extract.attribution(model, (x, y), progress=False, device="cpu")
    with torch.no_grad():
        T = model(x).gather(1, y[:, None]).sum().item()
    assert g.meta["exact"] is True
    assert T != 0.0  # a zero target would make the checks below trivially true
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-12)
    assert g.meta["completeness_relative"] <= 1e-9
    if conservation:
        w = g.weight.astype(np.float64)
        inflow, outflow = np.bincount(g.dst, w, g.num_nodes), np.bincount(g.src, w, g.num_nodes)
        a, b = g.node_attr("attribution"), g.node_attr("bias_attribution")
        hidden = np.isin(g.node_layer, [i for i, l in enumerate(g.layers) if l.kind not in ("input", "output")])
        scale = max(1.0, np.abs(a).max())
        np.testing.assert_allclose((inflow + b)[hidden], a[hidden], rtol=0, atol=rtol * scale, err_msg="flow in")
        np.testing.assert_allclose(outflow[hidden], a[hidden], rtol=0, atol=rtol * scale, err_msg="flow out")
    if weights:
        wg = cn.extract.weights(model.float(), tuple(x.shape[1:]))
        assert [l.name for l in wg.layers] == [l.name for l in g.layers]
        assert wg.num_edges == g.num_edges
        model.double()
    return g


@pytest.fixture
def exact_graph():
    """``exact_graph(model, x, y, weights=True, conservation=False)``: the checks of an exact extraction."""
    return _exact_graph
