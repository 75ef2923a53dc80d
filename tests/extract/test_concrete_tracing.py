"""Models symbolic fx cannot trace: Python that reads shapes, outputs that wrap the logits.

Such a model is traced again with the example's values (``connectome.extract.concrete``):
its graph must give the model's own output, and a graph that baked the batch size must be
traced again for a batch of another size (the last batch of a data set).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import connectome as cn
from connectome.errors import ExtractionError
from connectome.extract import tracer


class ShapeBranches(nn.Module):
    """Python on shapes: a resize only for other sizes, "same" padding computed from the input,
    ``len(x)`` and a loop over ``range(channels // 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 1) for _ in range(2)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, (8, 8))
        k, size = 3, x.shape[-1]
        pad = max((size - 1) + k - size, 0)  # TF "same" padding, stride 1
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        x = torch.relu(self.conv(x))
        n = len(x)  # the batch size, baked into the graph
        x = torch.cat([self.blocks[i](x[:, 4 * i: 4 * i + 4]) for i in range(x.shape[1] // 4)], 1)
        return self.fc(x.mean((2, 3)).view(n, -1))


class BatchGeneric(nn.Module):
    """Branches on the image size only: the graph serves every batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 2:
            x = x[..., :2]
        return self.fc(torch.tanh(x.reshape(x.shape[0], -1)))


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclasses.dataclass
class Fields:
    """A ModelOutput without logits (PP-LCNet's classifier puts them in last_hidden_state)."""

    last_hidden_state: torch.Tensor
    hidden_states: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.last_hidden_state, self.hidden_states) if v is not None)


class WrappedLogits(nn.Module):
    """Returns its logits in a dataclass (as Hugging Face's ModelOutput), a tuple, or the first
    field of a ModelOutput without logits."""

    def __init__(self, as_tuple: bool | str) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.fc1, self.fc2 = nn.Linear(6, 7), nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> Output | tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc1(x))
        if x.shape[0] != len(h):  # symbolic fx cannot run this; the concrete trace can
            raise ValueError("never")
        out = self.fc2(h)
        if self.as_tuple == "fields":
            return Fields(out)
        return (out, h) if self.as_tuple else Output(logits=out, hidden=h)


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on the image's contents: no one graph holds both paths
            x = x * 2
        return self.fc(x)


class StoresShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.width = 0
        self.cache: dict[str, object] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 0:  # as Swin stores its window size, LeViT its bias cache (once)
            self.width = x.shape[-1]
        if "w" not in self.cache:
            self.cache["w"] = x.shape[-1] * 2
        if self.width != 4:
            raise ValueError("never")
        return x


class HoldsStoresShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = StoresShape()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.inner(x))


def _model(cls: type[nn.Module], *args: object) -> nn.Module:
    torch.manual_seed(0)
    m = cls(*args).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _check_exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, **kw: object) -> cn.Connectome:
    g = cn.extract.attribution(model, (x, y), progress=False, device="cpu", **kw)
    T = logits.gather(1, y[:, None]).sum().item()
    assert T != 0.0
    assert g.meta["exact"] is True
    assert g.meta["target_total"] == pytest.approx(T, rel=1e-12)
    assert g.meta["completeness_relative"] <= 1e-9
    return g


def test_symbolic_fx_refuses_the_shape_branches():
    with pytest.raises(Exception):
        fx.symbolic_trace(ShapeBranches())


def test_shape_branches_extract_exactly_with_a_smaller_last_batch():
    m = _model(ShapeBranches)
    x = torch.randn(5, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        logits = m(x)
    _check_exact(m, x, y, logits, batch_size=2)  # batches of 2, 2 and 1


def test_a_graph_that_baked_the_batch_size_is_traced_again_per_batch_size():
    m = _model(ShapeBranches)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    gm = tracer.trace_graph(m, x[:2])
    assert "connectome_retrace" in gm.meta  # len(x) is in the graph as 2
    for n in (1, 3):
        other = tracer.graph_for(gm, x[:n])
        assert other is not gm and tracer.graph_for(gm, x[:n]) is other  # traced once per shape
        with torch.no_grad():
            assert torch.equal(other(x[:n]), m(x[:n]))
    assert tracer.graph_for(gm, x[:2]) is gm


def test_a_graph_that_reads_the_batch_size_serves_every_batch_size():
    m = _model(BatchGeneric)
    x = torch.randn(5, 3, 2, 4, dtype=torch.float64)
    gm = tracer.trace_graph(m, x[:2])
    assert "connectome_retrace" not in gm.meta
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))
    _check_exact(m, x, torch.tensor([0, 1, 2, 0, 1]), m(x).detach(), batch_size=2)


@pytest.mark.parametrize("as_tuple", [False, True, "fields"], ids=["dataclass", "tuple", "fields"])
def test_logits_wrapped_in_a_dataclass_or_a_tuple(as_tuple):
    m = _model(WrappedLogits, as_tuple)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = m(x)
    logits = out[0] if as_tuple is True else out.last_hidden_state if as_tuple else out.logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tuple: "takes the first as the logits"
        _check_exact(m, x, torch.tensor([0, 1, 3]), logits, batch_size=2)


def test_a_branch_on_the_input_values_is_refused():
    m = _model(ValueBranch)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ExtractionError, match="input's contents"):
        tracer.trace_graph(m, x)
    with pytest.raises(ExtractionError, match="input's contents"):
        cn.extract.attribution(m, (x, torch.tensor([0, 1])), progress=False, device="cpu")


def test_the_callers_model_keeps_its_attributes():
    m = _model(HoldsStoresShape)
    x = torch.randn(2, 4, dtype=torch.float64)
    gm = tracer.trace_graph(m, x)  # symbolic fx fails on the branch, after it stored a proxy
    assert m.inner.width in (0, 4) and type(m.inner.width) is int  # as before, or as the model itself set it
    assert m.inner.cache in ({}, {"w": 8}) and all(type(v) is int for v in m.inner.cache.values())
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))


# ----------------------------------------------------------------------------- timm and transformers, as they are
def test_timm_twins_svt_extracts_exactly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("twins_svt_small", pretrained=False, num_classes=5, img_size=32, embed_dims=(8, 16, 16, 16),
                          num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1), wss=(2, 2, 2, 2)).double().eval()
    with pytest.raises(Exception):
        fx.symbolic_trace(m)  # reads the feature map's size in Python
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(x)
    _check_exact(m, x, torch.tensor([0, 1, 4]), logits, batch_size=2)


def _hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "vit":  # sdpa: F.scaled_dot_product_attention is the attention rule's
        cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                     image_size=32, patch_size=8, num_labels=5)
        m = transformers.AutoModelForImageClassification.from_config(cfg, attn_implementation="sdpa")
    else:
        cfg = transformers.PoolFormerConfig(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], num_labels=5)
        m = transformers.AutoModelForImageClassification.from_config(cfg)
    return m.double().eval()


@pytest.mark.parametrize("name", ["vit", "poolformer"])
def test_hugging_face_classifier_extracts_exactly_as_it_is(name):
    m = _hf(name)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(x)  # pixel_values positionally; a ModelOutput with .logits
    _check_exact(m, x, torch.tensor([0, 1, 4]), out.logits, batch_size=2)


class SamePoolInf(nn.Module):
    """timm's MaxPool2dSame: "same" padding computed from the input's size, filled with -inf (the
    pool never picks it). Under the value tracer the pad amounts are nodes of the graph; the
    registry read them as they were (a TypeError inside torch), and -inf times a zero gradient
    made completeness NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.shape[-1] % 2:  # a branch on the shape: symbolic fx refuses it
            x = x * 1.0
        ih, iw = x.shape[-2:]
        ph, pw = max((-(ih // -2) - 1) * 2 + 3 - ih, 0), max((-(iw // -2) - 1) * 2 + 3 - iw, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-float("inf"))
        x = F.max_pool2d(x, 3, 2)
        return self.fc(x.mean((2, 3)))


def test_same_padding_from_the_input_size_with_minus_inf_extracts_exactly():
    m = _model(SamePoolInf)
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        logits = m(x)
    _check_exact(m, x, y, logits, batch_size=2)


class NumpySizes(nn.Module):
    """Perceiver's Python: ``np.prod`` of a traced shape, and an ``nn.Softmax`` made while
    forward runs (not a submodule of the model); traced with the example's values (symbolic fx
    records ``.prod()`` of a size, which does not run)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.q, self.k, self.v = nn.Conv2d(3, 4, 1), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 4:  # symbolic fx cannot run this
            raise ValueError("4x4 images")
        h = self.embed(x).permute(0, 2, 3, 1)
        t = torch.reshape(h, [h.shape[0], np.prod(h.shape[1:-1]), h.shape[-1]])
        a = nn.Softmax(dim=-1)(self.q(t) @ self.k(t).transpose(1, 2))
        return self.fc((a @ self.v(t)).mean(1))


def test_numpy_sizes_and_modules_made_in_forward_extract_exactly():
    m = _model(NumpySizes)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = m(x)
    g = _check_exact(m, x, torch.tensor([0, 1, 2]), logits, batch_size=2)
    assert any(r.startswith("attention") for r in g.meta["rules"])
