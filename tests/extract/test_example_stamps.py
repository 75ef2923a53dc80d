"""Patches are cut from the files the examples were taken from: a file changed since the
extraction (size or modification time) is named in a warning; old graphs load as before."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
from PIL import Image

import connectome as cn
from connectome import patches
from connectome.cli import main


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).eval()


@pytest.fixture
def extracted(tmp_path) -> tuple[Path, cn.Connectome]:
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    g = cn.extract.examples(_model(), str(tmp_path / "imgs"), k=2, transform=transforms.ToTensor(), progress=False,
                            device="cpu")
    g.save(tmp_path / "g.npz")
    return tmp_path, cn.load(tmp_path / "g.npz")


def _cut(g: cn.Connectome) -> list[str]:
    """Cut every unit's patches; the warnings raised."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = patches.unit_patches(g, patches.image_source(g), n=2, size=8)
    assert out  # patches were cut
    return [str(x.message) for x in w]


def test_stamps_record_size_and_mtime_of_every_example_file(extracted):
    _, g = extracted
    ex = g.meta["examples"]
    assert set(ex["stamps"]) == set(ex["paths"]) and ex["paths"]
    for i, p in ex["paths"].items():
        st = os.stat(p)
        assert ex["stamps"][i] == [st.st_size, st.st_mtime_ns]


def test_unchanged_files_give_no_warning(extracted):
    _, g = extracted
    assert _cut(g) == []


def _changed(path: str, how: str) -> None:
    st = os.stat(path)
    if how == "touch":  # same bytes, a later modification time
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    else:  # other pixels (another size), the modification time put back
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(path, optimize=True)
        assert os.stat(path).st_size != st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("how", ["touch", "rewrite"])
def test_a_changed_file_is_named_in_one_warning(extracted, how):
    _, g = extracted
    paths = g.meta["examples"]["paths"]
    target = sorted(paths.values())[0]
    _changed(target, how)
    msgs = set(_cut(g))
    assert len(msgs) == 1, msgs
    (msg,) = msgs
    assert repr(target) in msg and "changed since the graph was extracted" in msg and "\n" not in msg


def test_graphs_without_stamps_load_and_cut_without_warning(extracted):
    tmp, g = extracted
    ex = {k: v for k, v in g.meta["examples"].items() if k != "stamps"}  # a graph written before the stamps
    old = g.with_meta(examples=ex)
    old.save(tmp / "old.npz")
    old = cn.load(tmp / "old.npz")
    _changed(sorted(ex["paths"].values())[0], "touch")
    assert _cut(old) == []


def test_export_says_which_file_changed(extracted, capsys):
    tmp, g = extracted
    target = sorted(g.meta["examples"]["paths"].values())[-1]
    assert main(["export", str(tmp / "g.npz"), "--out", str(tmp / "g.graphml"), "--examples", str(tmp / "ex")]) == 0
    assert "changed since" not in capsys.readouterr().err
    _changed(target, "touch")
    assert main(["export", str(tmp / "g.npz"), "--out", str(tmp / "g.graphml"), "--examples", str(tmp / "ex")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "changed since" in line]
    assert len(err) == 1 and target in err[0], err
