"""A checkpoint is only continued by the same run: data content, labels, transform and callable targets count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import connectome as cn
from connectome import zoo
from connectome.errors import ConnectomeError, DataError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 9)).eval()


def _run(data, ckpt, target="label", **kw):
    return cn.extract.attribution(_model(), data, target, checkpoint=ckpt, checkpoint_every=1, batch_size=2,
                                  progress=False, device="cpu", **kw)


def test_generic_dataset_with_other_content_is_refused(tmp_path):
    _run(zoo.shapes(1, seed=5, size=16), tmp_path / "ck")
    with pytest.raises(ConnectomeError, match="different arguments"):
        _run(zoo.shapes(1, seed=6, size=16), tmp_path / "ck")


def test_same_dataset_is_continued(tmp_path):
    import numpy as np

    a = _run(zoo.shapes(1, seed=5, size=16), tmp_path / "ck")
    b = _run(zoo.shapes(1, seed=5, size=16), tmp_path / "ck")  # the completed checkpoint answers
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.node_attr("attribution"), b.node_attr("attribution"))


def test_other_labels_are_refused(tmp_path):
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    _run((x, y), tmp_path / "ck")
    with pytest.raises(ConnectomeError, match="different arguments"):
        _run((x, y.roll(1)), tmp_path / "ck")


def test_other_callable_target_is_refused(tmp_path):
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    _run((x, y), tmp_path / "ck", target=lambda logits: logits[:, 0])
    with pytest.raises(ConnectomeError, match="target"):
        _run((x, y), tmp_path / "ck", target=lambda logits: logits[:, 1])


def test_loader_with_its_own_sampler_is_refused(tmp_path):
    td = TensorDataset(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    loader = DataLoader(td, batch_size=2, sampler=SubsetRandomSampler([0, 1, 2]))
    with pytest.raises(DataError, match="own sampler"):
        cn.extract.attribution(_model(), loader, checkpoint=tmp_path / "ck", progress=False, device="cpu")


class _Target:
    def __init__(self, c):
        self.c = c

    def __call__(self, logits):
        return logits[:, self.c]


def test_callable_objects_and_globals_are_told_apart():
    from connectome.extract.distributed import _target_fingerprint

    assert _target_fingerprint(_Target(3)) != _target_fingerprint(_Target(5))
    assert _target_fingerprint(_Target(3)) == _target_fingerprint(_Target(3))
    helper = _Target(1)
    f = lambda logits: helper(logits)  # noqa: E731 - captures an object whose repr has an address
    g = lambda logits: helper(logits)  # noqa: E731
    assert _target_fingerprint(f) == _target_fingerprint(g)


def test_other_batchnorm_statistics_are_refused(tmp_path):
    # Same parameters, other running statistics (buffers): another model's flows.
    def model(mean: float) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 9)).eval()
        with torch.no_grad():
            m[1].running_mean.fill_(mean)
        return m

    a, b = model(0.0), model(0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    kw = dict(checkpoint=tmp_path / "ck", checkpoint_every=1, batch_size=2, progress=False, device="cpu")
    cn.extract.attribution(a, (x, y), **kw)
    with pytest.raises(ConnectomeError, match="different arguments: model weights"):
        cn.extract.attribution(b, (x, y), **kw)


def test_other_precision_is_refused(tmp_path):
    # an exact run's checkpoint must not be continued by a tf32 run (the fingerprint once kept only amp)
    _run(zoo.shapes(1, seed=5, size=16), tmp_path / "ck")
    with pytest.raises(ConnectomeError, match="different arguments: precision"):
        _run(zoo.shapes(1, seed=5, size=16), tmp_path / "ck", precision="tf32")
