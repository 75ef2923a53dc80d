"""Torch files are read only on a torch whose weights-only loader is a safety boundary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from connectome import _safety, zoo
from connectome._safety import TORCH_FLOOR, TORCHVISION_FLOOR, check_torch, safe_torch_load
from connectome.cli import main
from connectome.errors import ConnectomeError, UnsafeDependencyError

ROOT = Path(__file__).resolve().parent.parent
OLD = "2.5.1+cu121"  # before both fixes


@pytest.fixture
def old_torch(monkeypatch):
    """torch reports an old version, and any torch.load that still happens is recorded."""
    loads: list = []
    real = torch.load
    monkeypatch.setattr(torch, "__version__", OLD)
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    return loads


def _state_file(tmp_path: Path) -> Path:
    p = tmp_path / "sd.pt"
    torch.save({"w": torch.arange(3.0)}, p)
    return p


def _assert_names_version_and_fix(message: str) -> None:
    assert "\n" not in message
    assert f"torch {OLD} is older than 2.10" in message
    assert "pip install --upgrade 'torch>=2.10' 'torchvision>=0.25'" in message
    assert "CVE-2026-24747" in message


def test_floors_are_the_ones_pyproject_declares():
    text = (ROOT / "pyproject.toml").read_text()
    declared = dict(re.findall(r'"(torch|torchvision)>=([\d.]+)"', text))
    assert declared == {"torch": _safety._dotted(TORCH_FLOOR), "torchvision": _safety._dotted(TORCHVISION_FLOOR)}


# "2.1" is below "2.10" only as numbers; an unreadable version is refused rather than trusted
@pytest.mark.parametrize("version", ["2.9.1", "2.1", "2.6.0+cpu", "1.13.1", "not-a-version"])
def test_versions_below_the_floor_are_refused(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(UnsafeDependencyError, match=re.escape(f"torch {version} is older")):
        check_torch()


@pytest.mark.parametrize("version", ["2.10.0", "2.10.0+cu128", "2.11.0a0+git1234", "2.14.1", "3.0.0", "10.1"])
def test_versions_at_or_above_the_floor_load(tmp_path, monkeypatch, version):
    # "10.1" and "2.9" would compare the other way round as text
    monkeypatch.setattr(torch, "__version__", version)
    got = safe_torch_load(_state_file(tmp_path))
    torch.testing.assert_close(got["w"], torch.arange(3.0))


def test_old_torch_is_refused_before_the_file_is_opened(tmp_path, old_torch):
    p = _state_file(tmp_path)
    with pytest.raises(UnsafeDependencyError) as info:
        safe_torch_load(p, what="weights file")
    assert old_torch == []  # torch.load never ran
    _assert_names_version_and_fix(str(info.value))
    assert str(info.value).startswith(f"refusing to read weights file {str(p)!r}: ")
    assert isinstance(info.value, ConnectomeError)  # the CLI's one-line, exit-2 path


def _weights_file(tmp_path: Path) -> None:
    from connectome.modelspec import load_model_spec

    p = tmp_path / "sq.pt"
    torch.save(nn.Linear(2, 2).state_dict(), p)
    (tmp_path / "m.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(2, 2)\n")
    load_model_spec(f"{tmp_path / 'm.py'}:build", str(p))


def _zoo_weights(tmp_path: Path) -> None:
    zoo.load_model("simplecnn_a")


def _checkpoint(tmp_path: Path) -> None:
    from connectome.extract.distributed import Checkpoint

    torch.save({"format": "anything"}, tmp_path / "rank0.pt")
    Checkpoint(tmp_path, 0, {}).load()


@pytest.mark.parametrize("load", [_weights_file, _zoo_weights, _checkpoint], ids=["weights", "zoo", "checkpoint"])
def test_every_loader_refuses_on_old_torch(tmp_path, old_torch, load):
    # the loaders turn a failed read into "damaged file"; the version error must get through as itself
    with pytest.raises(UnsafeDependencyError) as info:
        load(tmp_path)
    assert old_torch == []
    _assert_names_version_and_fix(str(info.value))


def test_no_torch_load_outside_the_guard():
    direct = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "connectome").rglob("*.py")) if p.name != "_safety.py"
        for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\btorch\.load\s*\(", line)
    ]
    assert direct == [], "read torch files with connectome._safety.safe_torch_load"


def test_cli_extract_with_weights_exits_2_with_one_line(tmp_path, capsys, old_torch):
    (tmp_path / "m.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4))\n"
    )
    sd = tmp_path / "sd.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(2, 4)).state_dict(), sd)
    out = tmp_path / "graphs"
    rc = main(["extract", f"{tmp_path / 'm.py'}:build", "zoo:shapes:1", "--weights", str(sd), "--out", str(out),
               "--image-size", "16", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("connectome extract: error: refusing to read weights file")
    _assert_names_version_and_fix(err.strip())
    assert old_torch == [] and not list(out.glob("*.npz"))
