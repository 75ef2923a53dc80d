"""The probe machinery shared by ablation, unit matching and activation comparison."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from connectome.errors import DataError, short_list
from connectome.extract.probe import load_probe, mask_units, profile_node, traced


def _hand_masked(v: torch.Tensor, m: torch.Tensor, unit_of) -> torch.Tensor:
    """Element by element: the entry at ``idx`` belongs to sample ``idx[0]`` and unit ``unit_of(idx)``."""
    out = v.clone()
    for idx in itertools.product(*(range(s) for s in v.shape)):
        out[idx] = v[idx] * m[idx[0] if m.shape[0] > 1 else 0, unit_of(idx)]
    return out


def _mask(n: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Zeros, ones and other factors, so that a unit mixed up with another shows.
    return torch.randint(0, 3, (n, c), generator=g).double() - 0.5 * torch.randint(0, 2, (n, c), generator=g).double()


@pytest.mark.parametrize(
    "shape, unit_dim, unit_of",
    [
        ((2, 3, 2, 2), 1, lambda i: i[1]),  # NCHW
        ((2, 2, 2, 3), 3, lambda i: i[3]),  # NHWC
        ((2, 2, 2, 3), -1, lambda i: i[3]),  # NHWC, counted from the end
        ((2, 4, 3), 2, lambda i: i[2]),  # (N, tokens, C)
        ((2, 3), 1, lambda i: i[1]),  # (N, C): a linear layer
        ((2, 3 * 4), 1, lambda i: i[1] // 4),  # (N, C, 2, 2) flattened: unit-major blocks of 4
        ((2, 2, 3 * 2), 2, lambda i: i[2] // 2),  # (N, tokens, C*2): blocks on the last dim
    ],
)
def test_mask_units_matches_a_hand_computation(shape, unit_dim, unit_of):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    m = _mask(shape[0], 3)
    out = mask_units(v, m, unit_dim=unit_dim)
    assert out.shape == v.shape
    torch.testing.assert_close(out, _hand_masked(v, m, unit_of), rtol=0, atol=0)


def test_mask_units_one_row_masks_every_sample():
    v = torch.randn(3, 2, 4, dtype=torch.float64)
    m = torch.tensor([[0.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(mask_units(v, m, unit_dim=2), _hand_masked(v, m, lambda i: i[2]), rtol=0, atol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_mask_units_follows_the_unit_dimension_wherever_it_moves(d):
    # Masking channels then moving them must equal moving them then masking there.
    v = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    m = _mask(2, 5, seed=2)
    torch.testing.assert_close(mask_units(v.movedim(1, d), m, unit_dim=d), mask_units(v, m).movedim(1, d),
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, mask_shape, unit_dim, phrase",
    [
        ((2, 3), (2, 3), 0, "non-batch dimension"),
        ((2, 3), (2, 3), 2, "non-batch dimension"),
        ((2, 3), (2, 3), -2, "non-batch dimension"),
        ((2, 5), (2, 3), 1, "not a multiple of the mask's 3 units"),
        ((2, 3), (3, 3), 1, r"expected \(N, units\) with N = 2"),
        ((2, 3), (3,), 1, r"expected \(N, units\)"),
    ],
)
def test_mask_units_bad_shapes_are_named(shape, mask_shape, unit_dim, phrase):
    with pytest.raises(ValueError, match=phrase):
        mask_units(torch.zeros(shape), torch.ones(mask_shape), unit_dim=unit_dim)


def test_short_list():
    assert short_list(["a", "b"]) == "['a', 'b']"
    assert short_list([str(i) for i in range(8)], n=3) == "['0', '1', '2', ... (8 in all)]"


def test_load_probe_holds_images_and_labels():
    x = torch.randn(5, 3, 4, 4)
    y = torch.arange(5)
    xs, ys, classes = load_probe((x, y), batch_size=2)
    torch.testing.assert_close(xs, x, rtol=0, atol=0)
    assert ys.tolist() == list(range(5)) and classes is None
    one, none, _ = load_probe(x[0])
    assert one.shape == (1, 3, 4, 4) and none is None
    with pytest.raises(DataError, match="empty"):
        load_probe(torch.zeros(0, 3, 4, 4))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_traced_restores_training_and_profiles_before_pooling():
    model = Net().train()
    with pytest.warns(UserWarning, match="training mode"):
        with traced(model, torch.randn(2, 3, 5, 5), device="cpu") as t:
            assert not model.training
            assert t.names == ["input", "conv", "logits"] and t.hidden_names() == ["conv"]
            assert t.n_classes == 2
            li = t.index("conv")
            # After BatchNorm and ReLU, before the mean over positions.
            assert t.ug.shapes[profile_node(t, li)][1:] == (4, 5, 5)
            assert profile_node(t, li) != t.ug.layers[li].node
            assert profile_node(t, 0) == t.ug.layers[0].node
    assert model.training and all(m.training for m in model.modules())
