"""Dense layer kinds as strategies (connectome.extract.dense): Conv1d, a Conv1d across the units
(ECA attention), ConvTranspose2d and a Linear over positions (MLP-Mixer's token mixing).

Each small model is linearised by hand (numpy loops over its formula, no autograd) and its flows
compared with the extracted ones: edges, completeness (<= 1e-9), ``target_total`` equal to the
model's own logits, ``abs_weight`` against single-image runs; weight graphs against kernel sums
by hand; receptive fields against autograd's gradient support."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import connectome as cn
from connectome import patches
from connectome.errors import ExtractionError
from connectome.extract import dense
from connectome.extract.trace import run_nodes, trace_units

TOL = 1e-12


def _block(g: cn.Connectome, src: str, dst: str, shape: tuple[int, int], attr: str = "weight") -> np.ndarray:
    """The edges ``src -> dst`` as a dense ``(dst units, src units)`` matrix (absent edges: nan)."""
    i, j, v = g.edge_block(src, dst, attr)
    out = np.full(shape, np.nan)
    out[j, i] = v
    return out


def _run(m: nn.Module, x: torch.Tensor, y: torch.Tensor, per_sample: bool = False) -> cn.Connectome:
    g = cn.extract.attribution(m, TensorDataset(x, y), progress=False, device="cpu", per_sample=per_sample)
    with torch.no_grad():
        own = float(m(x).gather(1, y[:, None]).sum())
    assert g.meta["target_total"] == pytest.approx(own, rel=1e-12, abs=1e-12)
    assert abs(g.meta["completeness_residual"]) <= 1e-9
    return g


def _abs_by_images(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """sum over images of |edge flow| from one run per image."""
    return sum(np.abs(cn.extract.attribution(m, TensorDataset(x[i:i + 1], y[i:i + 1]), progress=False,
                                             device="cpu").weight) for i in range(x.shape[0]))


def _data(shape: tuple[int, ...], n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0][:n])


# ---------------------------------------------------------------------- Conv1d
class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2)  # 7 -> 4 positions
        self.fc = nn.Linear(4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c(x)).flatten(1))


def test_conv1d_flows_equal_the_hand_linearised_model():
    torch.manual_seed(0)
    m = Conv1dNet().double().eval()
    x, y = _data((2, 7))
    g = _run(m, x, y)
    W, b = m.c.weight.detach().numpy(), m.c.bias.detach().numpy()  # (4, 1, 3)
    V = m.fc.weight.detach().numpy()
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1)))
    E = np.zeros((4, 2))
    Efc = np.zeros((2, 4))
    for n in range(2):
        for o in range(4):
            c = o // 2  # groups of 2 outputs read one input channel each
            for l in range(4):
                z = b[o] + sum(W[o, 0, k] * xp[n, c, 2 * l + k] for k in range(3))
                gz = V[y[n], o * 4 + l] * (z > 0)
                E[o, c] += sum(W[o, 0, k] * xp[n, c, 2 * l + k] for k in range(3)) * gz
                Efc[y[n], o] += V[y[n], o * 4 + l] * max(z, 0.0)
    got = _block(g, "input", "c", (4, 2))
    assert np.isnan(got[[0, 1, 2, 3], [1, 1, 0, 0]]).all()  # grouped: one input channel per output
    np.testing.assert_allclose(np.nan_to_num(got), E, rtol=0, atol=TOL)
    np.testing.assert_allclose(_block(g, "c", "logits", (2, 4)), Efc, rtol=0, atol=TOL)


def test_conv1d_abs_weight_and_weight_graph():
    torch.manual_seed(0)
    m = Conv1dNet().double().eval()
    x, y = _data((2, 7), n=3)
    g = _run(m, x, y, per_sample=True)
    np.testing.assert_allclose(g.edge_attr("abs_weight"), _abs_by_images(m, x, y), rtol=1e-10, atol=TOL)
    w = cn.extract.weights(m, (2, 7))
    ker = m.c.weight.detach().numpy().sum(-1)[:, 0]  # kernel sums, (4,)
    np.testing.assert_allclose(np.nan_to_num(_block(w, "input", "c", (4, 2))).sum(1), ker, rtol=1e-6)


# ---------------------------------------------------------------------- ConvTranspose2d
class ConvTNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 3x3 -> 6x6: (3 - 1) * 2 - 2 * 1 + 3 + 1
        self.t = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.fc = nn.Linear(4 * 36, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.t(x)).flatten(1))


def _conv_t_by_hand(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 2, 3, 3) -> per contribution: out[n, o, p, q, c] (input channel c), plus bias."""
    n_img = x.shape[0]
    out = np.zeros((n_img, 4, 6, 6, 2))
    for n in range(n_img):
        for c in range(2):
            for ol in range(2):
                o = c * 2 + ol  # input channel c feeds the two outputs of its group
                for i in range(3):
                    for j in range(3):
                        for kh in range(3):
                            for kw in range(3):
                                p, q = 2 * i - 1 + kh, 2 * j - 1 + kw
                                if 0 <= p < 6 and 0 <= q < 6:
                                    out[n, o, p, q, c] += W[c, ol, kh, kw] * x[n, c, i, j]
    return out


def test_conv_transpose2d_flows_equal_the_hand_linearised_model():
    torch.manual_seed(0)
    m = ConvTNet().double().eval()
    x, y = _data((2, 3, 3))
    g = _run(m, x, y)
    W, b = m.t.weight.detach().numpy(), m.t.bias.detach().numpy()
    V = m.fc.weight.detach().numpy().reshape(2, 4, 6, 6)
    parts = _conv_t_by_hand(x.numpy(), W, b)
    z = parts.sum(-1) + b[None, :, None, None]
    gz = V[y.numpy()] * (z > 0)
    E = np.einsum("nopqc,nopq->oc", parts, gz)
    got = _block(g, "input", "t", (4, 2))
    assert np.isnan(got[[0, 1, 2, 3], [1, 1, 0, 0]]).all()
    np.testing.assert_allclose(np.nan_to_num(got), E, rtol=0, atol=TOL)
    bias = (b[None, :, None, None] * gz).sum((0, 2, 3))
    np.testing.assert_allclose(g.node_attr("bias_attribution", "t"), bias, rtol=0, atol=TOL)


def test_conv_transpose2d_abs_weight_and_weight_graph():
    torch.manual_seed(0)
    m = ConvTNet().double().eval()
    x, y = _data((2, 3, 3), n=3)
    g = _run(m, x, y, per_sample=True)
    np.testing.assert_allclose(g.edge_attr("abs_weight"), _abs_by_images(m, x, y), rtol=1e-10, atol=TOL)
    w = cn.extract.weights(m, (2, 3, 3))
    W = m.t.weight.detach().numpy()  # (in 2, out per group 2, 3, 3)
    expect = np.array([W[o // 2, o % 2].sum() for o in range(4)])
    np.testing.assert_allclose(np.nan_to_num(_block(w, "input", "t", (4, 2))).sum(1), expect, rtol=1e-6)


# ---------------------------------------------------------------------- Linear over positions
class TokenMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Conv2d(2, 3, 2, stride=2)  # (N, 3, 2, 2): 4 tokens of 3 channels
        self.tok = nn.Linear(4, 5)
        self.tok2 = nn.Linear(5, 4)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).flatten(2)  # (N, channels, tokens): the Linears mix the tokens of each channel
        h = h + self.tok2(torch.relu(self.tok(h)))
        return self.head(h.mean(2))


def test_linear_over_positions_is_a_per_unit_op_with_hand_flows():
    torch.manual_seed(0)
    m = TokenMix().double().eval()
    x, y = _data((2, 4, 4))
    g = _run(m, x, y)
    assert [lay.name for lay in g.layers] == ["input", "emb", "add", "logits"]
    e = m.emb(x).flatten(2).detach().numpy()  # (N, 3, 4)
    A1, a1 = m.tok.weight.detach().numpy(), m.tok.bias.detach().numpy()
    A2, a2 = m.tok2.weight.detach().numpy(), m.tok2.bias.detach().numpy()
    H = m.head.weight.detach().numpy()
    u = e @ A1.T + a1
    h = e + np.maximum(u, 0) @ A2.T + a2
    g_add = np.broadcast_to(H[y.numpy()][:, :, None] / 4, h.shape)  # dT/dh: the mean over tokens
    # both operands of the add come from emb: parallel identity edges, merged
    np.testing.assert_allclose(np.diag(_block(g, "emb", "add", (3, 3))), (h * g_add).sum((0, 2)), rtol=0, atol=TOL)
    # emb's constant parts past its branch point: the token Linears' biases
    g_u = (g_add @ A2) * (u > 0)
    const = (a2 * g_add).sum((0, 2)) + (a1 * g_u).sum((0, 2))
    ge = g_add + g_u @ A1
    conv_bias = m.emb.bias.detach().numpy()[None, :, None] * ge
    np.testing.assert_allclose(g.node_attr("bias_attribution", "emb"), conv_bias.sum((0, 2)) + const, rtol=0,
                               atol=TOL)
    w = cn.extract.weights(m, (2, 4, 4))  # token mixing has no per-unit weight: identity edges
    np.testing.assert_allclose(np.diag(_block(w, "emb", "add", (3, 3))), 2.0)


# ---------------------------------------------------------------------- Conv1d across the units (ECA)
class AcrossUnits(nn.Module):
    """A Conv1d across the channels of a pooled map, carrying the signal (not a gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 5, 3, padding=1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.relu(self.c(x)).mean((2, 3))
        z = self.eca(p.view(p.shape[0], 1, -1)).view(p.shape[0], -1)
        return self.fc(torch.relu(z))


def _banded(w: np.ndarray, n: int) -> np.ndarray:
    """The (n, n) matrix of a 3-tap conv with padding 1: unit j reads units j-1, j, j+1."""
    M = np.zeros((n, n))
    for j in range(n):
        for t in range(3):
            if 0 <= j + t - 1 < n:
                M[j, j + t - 1] = w[t]
    return M


def test_conv1d_across_units_is_a_banded_dense_layer():
    torch.manual_seed(0)
    m = AcrossUnits().double().eval()
    x, y = _data((2, 4, 4), n=3)
    g = _run(m, x, y, per_sample=True)
    assert g.layer("eca").kind == "conv" and g.layer("eca").size == 5
    M = _banded(m.eca.weight.detach().numpy()[0, 0], 5)
    p = torch.relu(m.c(x)).mean((2, 3)).detach().numpy()  # (N, 5)
    z = p @ M.T + m.eca.bias.item()
    gz = m.fc.weight.detach().numpy()[y.numpy()] * (z > 0)  # (N, 5)
    np.testing.assert_allclose(_block(g, "c", "eca", (5, 5)), M * (gz.T @ p), rtol=0, atol=TOL)
    np.testing.assert_allclose(_block(g, "c", "eca", (5, 5), "abs_weight"), np.abs(M) * (np.abs(gz).T @ np.abs(p)),
                               rtol=0, atol=TOL)
    np.testing.assert_allclose(g.node_attr("bias_attribution", "eca"), m.eca.bias.item() * gz.sum(0), rtol=0,
                               atol=TOL)
    np.testing.assert_allclose(g.edge_attr("abs_weight"), _abs_by_images(m, x, y), rtol=1e-10, atol=TOL)
    w = cn.extract.weights(m, (2, 4, 4))
    np.testing.assert_allclose(_block(w, "c", "eca", (5, 5)), M, rtol=1e-6)  # zeros outside the band


def test_conv1d_across_several_channels_is_refused():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(2, 5, 3, padding=1)
            self.eca = nn.Conv1d(1, 2, 3, padding=1)  # two output channels: no units left to name
            self.fc = nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.c(x).mean((2, 3))[:, None, :]
            return self.fc(self.eca(p).flatten(1))

    with pytest.raises(ExtractionError, match="across units"):
        trace_units(Two().double().eval(), torch.zeros(1, 2, 4, 4, dtype=torch.float64))


def test_timm_eca_gate_is_exact():
    timm_eca = pytest.importorskip("timm.layers.eca")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(2, 6, 3, padding=1)
            self.attn = timm_eca.EcaModule(channels=6, kernel_size=3)
            self.c2 = nn.Conv2d(6, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 25, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.c2(torch.relu(self.attn(self.c(x)))).flatten(1))

    torch.manual_seed(0)
    m = Net().double().eval()
    x, y = _data((2, 5, 5))
    g = _run(m, x, y)
    # the gate is held constant (signal takes all): the conv across the channels carries no flow
    assert g.layer("attn.conv").size == 6
    assert np.all(_block(g, "c", "attn.conv", (6, 6)) == 0)
    fields = cn.extract.examples(m, x, k=1, progress=False).meta["examples"]["fields"]
    assert fields["attn.conv"] is None  # the gate depends on the whole image
    # and, held constant, it is context: the signal's crops go on through x * y.expand_as(x)
    assert fields["c"] == [1, -1, 3, 1, -1, 3, 5, 5] and fields["c2"] == [1, -2, 5, 1, -2, 5, 5, 5]


def test_ecaresnet_and_mixer_extract_exactly():
    timm = pytest.importorskip("timm")
    for name, kw in (("ecaresnet26t", {}), ("mixer_s32_224", {"img_size": 64})):
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, num_classes=10, **kw).double().eval()
        x, _ = _data((3, 64, 64))
        _run(m, x, torch.tensor([1, 7]))


if not __import__("os").environ.get("CONNECTOME_HEAVY"):
    test_ecaresnet_and_mixer_extract_exactly = pytest.mark.skip(reason="set CONNECTOME_HEAVY=1")(
        test_ecaresnet_and_mixer_extract_exactly)


# ---------------------------------------------------------------------- receptive fields
class ConvTStride1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3)  # 12 -> 10
        self.t = nn.ConvTranspose2d(3, 2, 3, padding=(1, 0), dilation=(1, 2))  # 10 -> (10, 14)
        self.fc = nn.Linear(2 * 10 * 14, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.t(torch.relu(self.c(x))).flatten(1))


def test_conv_transpose2d_crop_is_the_bounding_box_of_the_gradient_support():
    torch.manual_seed(0)
    m = ConvTStride1().double().eval()
    x = torch.randn(2, 2, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ex = cn.extract.examples(m, x, k=1, progress=False)
    ug = trace_units(m, x[:1])
    node = ug.layers[ug.layer_index("t")].out_node
    xg = x.clone().requires_grad_(True)
    tight = 0
    with torch.enable_grad():
        _, kept = run_nodes(ug.gm, (xg,), keep={node})
        v = kept[node]
        for pos in range(0, v.shape[2] * v.shape[3], 7):
            r, c = divmod(pos, v.shape[3])
            (gx,) = torch.autograd.grad(v[:, 1, r, c].sum(), xg, retain_graph=True)
            sup = (gx.abs().sum((0, 1)) > 0).numpy()
            rows, cols = np.flatnonzero(sup.any(1)), np.flatnonzero(sup.any(0))
            support = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
            y0, y1, x0, x1 = crop = patches.crop_box(ex, "t:1", pos)
            inside = np.zeros_like(sup)
            inside[y0:y1, x0:x1] = True
            assert not (sup & ~inside).any(), f"position {pos}: support {support} outside the crop {crop}"
            if 0 < y0 and y1 < sup.shape[0] and 0 < x0 and x1 < sup.shape[1]:
                assert crop == support, f"position {pos}"
                tight += 1
    assert tight >= 4


def test_strided_conv_transpose2d_has_no_crop():
    # a strided transposed conv reads a window that changes with the output's phase: no box
    fields = cn.extract.examples(ConvTNet().double().eval(), _data((2, 3, 3))[0], k=1,
                                 progress=False).meta["examples"]["fields"]
    assert fields["t"] is None


# ---------------------------------------------------------------------- the strategies themselves
@pytest.mark.parametrize("name", sorted(dense.STRATEGIES))
def test_every_strategy_names_a_dense_kind(name):
    from connectome.kinds import DENSE, KINDS

    d = dense.STRATEGIES[name]
    assert d.name == name and KINDS[d.kind].edges == DENSE
    for m in d.modules:
        assert dense.of_module(m.__new__(m)) is d  # a bare instance: its stock forward
    for f in d.functions:
        assert dense.of_function(f) is d


def test_unsupported_conv_kinds_are_refused_by_name():
    class T1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = nn.ConvTranspose1d(2, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.t(x).flatten(1)

    with pytest.raises(ExtractionError, match="ConvTranspose1d layers are not supported"):
        trace_units(T1().double().eval(), torch.zeros(1, 2, 5, dtype=torch.float64))
