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


# the per-image columns of a graph (statistics, dataset examples) that two layouts of one model share
PER_IMAGE_COLUMNS = ("attribution", "activation_mean", "activation_std", "activation_max", "frequency",
                     "example_value_0", "example_value_1", "example_attr_value_0", "example_attr_value_1",
                     "example_index_0", "example_attr_index_0")


def _same_graph(g1: cn.Connectome, g2: cn.Connectome, columns=("attribution", "bias_attribution"),
                names: bool = True) -> None:
    """Two graphs of one function written two ways: the same layers (names, or sizes with
    ``names=False``), edges, and node ``columns`` (``"per image"``: the statistics and dataset
    examples too), to 1e-12 of their largest value."""
    if columns == "per image":
        columns = PER_IMAGE_COLUMNS
    if names:
        assert [l.name for l in g1.layers] == [l.name for l in g2.layers]
    assert [l.size for l in g1.layers] == [l.size for l in g2.layers]
    np.testing.assert_array_equal(g1.src, g2.src)
    np.testing.assert_array_equal(g1.dst, g2.dst)
    scale = max(1.0, float(np.abs(g1.weight).max()))
    np.testing.assert_allclose(g1.weight, g2.weight, rtol=0, atol=1e-12 * scale)
    for name in columns:
        a1, a2 = g1.node_attr(name), g2.node_attr(name)
        np.testing.assert_allclose(a1, a2, rtol=0, atol=1e-12 * max(1.0, float(np.abs(a2).max())), err_msg=name)


@pytest.fixture
def same_graph():
    """``same_graph(g1, g2, columns=("attribution", "bias_attribution") or "per image", names=True)``."""
    return _same_graph
