"""precision=: exact float32 by default (TF32 off for the run, the caller's switches restored,
also on error); tf32 and bf16 are stated in meta as inexact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import connectome as cn
from connectome.extract._model import _fp32_switches, _legacy_tf32, precision_mode


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).to(dtype).eval()


def _data(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (6,), generator=g)


def _switches() -> tuple[dict, dict]:
    return _legacy_tf32(), {name: holder.fp32_precision for holder, name in _fp32_switches()}


@pytest.fixture
def user_tf32():
    """The caller has TF32 on everywhere (legacy API), as many training scripts do; restored after the test."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield _switches()
    torch.backends.cuda.matmul.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[2])
    torch.backends.cudnn.allow_tf32 = before[1]


def _flags_seen(precision: str, **kw) -> dict:
    seen = {}

    def hook(_batch: int) -> None:
        seen.update(cuda_matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32,
                    matmul_precision=torch.get_float32_matmul_precision(),
                    fp32={name: h.fp32_precision for h, name in _fp32_switches()})

    cn.extract.attribution(_net(), _data(), progress=False, device="cpu", precision=precision, _batch_hook=hook, **kw)
    return seen


def test_exact_switches_tf32_off_for_the_run_and_restores_the_callers(user_tf32):
    seen = _flags_seen("exact")
    assert seen["cuda_matmul"] is False and seen["cudnn"] is False
    assert seen["matmul_precision"] == "highest"
    assert set(seen["fp32"].values()) <= {"ieee"}
    assert _switches() == user_tf32
    assert torch.backends.cudnn.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"


def test_tf32_switches_tf32_on_for_the_run_only():
    before = _switches()
    seen = _flags_seen("tf32")
    assert seen["cuda_matmul"] is True and seen["cudnn"] is True and seen["matmul_precision"] == "high"
    assert _switches() == before


def test_switches_are_restored_when_the_run_fails(user_tf32):
    def boom(_batch: int) -> None:
        assert torch.backends.cudnn.allow_tf32 is False  # inside the run
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cn.extract.attribution(_net(), _data(), progress=False, device="cpu", batch_size=2, _batch_hook=boom)
    assert _switches() == user_tf32


@pytest.mark.parametrize("setup", [
    lambda: None,
    lambda: torch.set_float32_matmul_precision("medium"),
    lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    pytest.param(lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), id="new-api-matmul"),
    pytest.param(lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee"), id="new-api-conv"),
])
@pytest.mark.parametrize("precision", ["exact", "tf32", "bf16"])
def test_precision_mode_restores_any_starting_state(setup, precision):
    """Legacy flags and (torch >= 2.9) per-operator switches, however the caller set them:
    every per-operator switch comes back, and every legacy flag that could be read before."""
    if "new-api" in str(setup) and not _fp32_switches():
        pytest.skip("torch without per-operator fp32_precision switches")
    legacy0 = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    switches0 = [(h, h.fp32_precision) for h, _ in _fp32_switches()]
    try:
        setup()
        legacy, fp32 = _switches()
        for _ in range(2):
            with pytest.raises(RuntimeError, match="inside"):
                with precision_mode(precision):
                    raise RuntimeError("inside")
            with precision_mode(precision):
                pass
        after_legacy, after_fp32 = _switches()
        assert after_fp32 == fp32
        assert {k: after_legacy[k] for k in legacy} == legacy
    finally:
        for h, v in switches0:
            h.fp32_precision = v
        torch.backends.cuda.matmul.allow_tf32 = legacy0[0]
        torch.set_float32_matmul_precision(legacy0[1])
        torch.backends.cudnn.allow_tf32 = legacy0[2]


def test_meta_says_which_precision_was_used():
    x, y = _data()
    exact = cn.extract.attribution(_net(), (x, y), progress=False, device="cpu")
    assert exact.meta["precision"] == "exact" and exact.meta["exact"] is True
    assert exact.meta["unit_roundoff"] == pytest.approx(2.0**-24) and exact.meta["expected_error"] < 1e-3
    assert exact.meta["completeness_relative"] < 1e-5
    tf32 = cn.extract.attribution(_net(), (x, y), progress=False, device="cpu", precision="tf32")
    assert tf32.meta["precision"] == "tf32" and tf32.meta["exact"] is False
    assert tf32.meta["unit_roundoff"] == pytest.approx(2.0**-11)
    assert exact.meta["expected_error"] < tf32.meta["expected_error"] < 0.05
    for kw in ({"precision": "bf16"}, {"amp": True}):
        bf16 = cn.extract.attribution(_net(), (x, y), progress=False, device="cpu", **kw)
        assert bf16.meta["precision"] == "bf16" and bf16.meta["exact"] is False
        assert bf16.meta["unit_roundoff"] == pytest.approx(2.0**-8)
        assert tf32.meta["expected_error"] < bf16.meta["expected_error"] <= 0.1
        # bfloat16 keeps ~3 significant digits: flows agree to a few percent of their scale
        assert np.abs(bf16.weight - exact.weight).max() <= 0.05 * np.abs(exact.weight).max()
        assert 0 < bf16.meta["completeness_relative"] < 0.05


def test_flows_are_as_close_to_float64_flows_as_meta_says():
    x, y = _data()
    ref = cn.extract.attribution(_net().double(), (x.double(), y), progress=False, device="cpu")
    for precision in ("exact", "bf16"):
        g = cn.extract.attribution(_net(), (x, y), progress=False, device="cpu", precision=precision)
        err = np.linalg.norm(g.weight - ref.weight) / np.linalg.norm(ref.weight)
        assert err <= g.meta["expected_error"], (precision, err)
        assert err >= g.meta["unit_roundoff"] / 100  # the arithmetic really was that precision


def test_by_category_passes_precision():
    graphs = cn.extract.attribution_by_category(_net(), _data(), progress=False, device="cpu", precision="bf16")
    assert graphs and all(g.meta["precision"] == "bf16" and g.meta["exact"] is False for g in graphs.values())


def test_float64_models_stay_float64():
    x, y = _data(torch.float64)
    exact = cn.extract.attribution(_net(torch.float64), (x, y), progress=False, device="cpu")
    with pytest.warns(UserWarning, match="does not apply to a float64 model"):
        asked = cn.extract.attribution(_net(torch.float64), (x, y), progress=False, device="cpu", precision="bf16")
    assert asked.meta["precision"] == "exact" and asked.meta["exact"] is True and asked.meta["dtype"] == "float64"
    assert asked.meta["unit_roundoff"] == pytest.approx(2.0**-53) and asked.meta["expected_error"] < 1e-9
    np.testing.assert_array_equal(asked.weight, exact.weight)
    assert exact.meta["completeness_relative"] < 1e-12


@pytest.mark.parametrize("kw, phrase", [
    ({"precision": "fp16"}, "precision must be one of"),
    ({"precision": "tf32", "amp": True}, "cannot be combined"),
])
def test_bad_precision_is_a_clear_error(kw, phrase):
    with pytest.raises(ValueError, match=phrase):
        cn.extract.attribution(_net(), _data(), progress=False, device="cpu", **kw)
