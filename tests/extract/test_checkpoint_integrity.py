"""Checkpoints that are damaged, hand-edited or resumed on changed data are refused, never used.

A flipped byte inside a checkpoint's tensor data (``torch.load`` does not check the zip
CRCs), an impossible position, or data that changed between a kill and a resume, anywhere
in the data and not only at the items the fingerprint reads, must stop the run with an
error naming the file, instead of a silently wrong graph.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from connectome.errors import BadFileError, ConnectomeError
from connectome.extract import distributed as dd
from connectome.extract.flow import attribution

BATCH = 2
N = 8  # the fingerprint has always read items 0, 4 and 7 as the model sees them


class Stop(Exception):
    """Stands for a killed process."""


def _stop_after(k: int):
    calls = {"n": 0}

    def hook(batch_index: int) -> None:
        calls["n"] += 1
        if calls["n"] == k + 1:
            raise Stop(f"stopped after batch {batch_index}")

    return hook


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).double().eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 6, 6, generator=g, dtype=torch.float64), torch.arange(N) % 2


def _run(data, **kw):
    return attribution(_model(), data, batch_size=BATCH, device="cpu", progress=False, **kw)


def _resign(payload: dict) -> dict:
    """A hand edit that also fixes the checksum: the position checks must still see it."""
    if hasattr(dd, "_payload_checksum"):
        payload["checksum"] = dd._payload_checksum(payload)
    return payload


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte of the largest tensor stored in a torch.save zip (stored, not deflated)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", bytes(data[off + 26 : off + 30]))
    start = off + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40  # a float64's exponent byte or mantissa: a wrong value
    path.write_bytes(bytes(data))


def _checkpointed(tmp_path, complete: bool):
    """Data and the checkpoint file of a run that finished, or was stopped after one batch."""
    data = _data()
    if complete:
        _run(data, checkpoint=tmp_path, checkpoint_every=1)
    else:
        with pytest.raises(Stop):
            _run(data, checkpoint=tmp_path, checkpoint_every=1, _batch_hook=_stop_after(1))
    return data, tmp_path / "rank0.pt"


# ----------------------------------------------------------------------------- damaged tensor data
@pytest.mark.parametrize("complete", [False, True])
def test_flipped_byte_in_tensor_data_is_refused(tmp_path, complete):
    data, path = _checkpointed(tmp_path, complete)
    _flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself reads the damaged file without complaint
    with pytest.raises(BadFileError, match="rank0.pt.*damaged") as exc:
        _run(data, checkpoint=tmp_path, checkpoint_every=1)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- impossible positions
def _edited(tmp_path, edit, complete: bool = False) -> None:
    data, path = _checkpointed(tmp_path, complete)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(_resign(payload), path)
    with pytest.raises(BadFileError, match="rank0.pt.*impossible position"):
        _run(data, checkpoint=tmp_path, checkpoint_every=1)


def _set(key, value):
    return lambda p: p.__setitem__(key, value)


@pytest.mark.parametrize("edit, complete", [
    (_set("batches_done", -1), False),   # resumed at sampler position -2: the last 2 images only
    (_set("batches_done", 5), False),    # 8 images in batches of 2: 4 batches at most
    (_set("batches_done", 1), False),    # 2 batches were summed
    (lambda p: p["state"].__setitem__("n_images", 3), False),
    (_set("n_skipped", 1), False),
    (_set("batches_done", 3), True),     # complete, but not at the end
], ids=["negative", "beyond-the-end", "behind-the-sums", "images-not-batches", "skipped-invented", "complete-early"])
def test_hand_edited_position_is_refused(tmp_path, edit, complete):
    _edited(tmp_path, edit, complete)


def test_sound_checkpoint_still_resumes_exactly(tmp_path):
    """The new checks accept what the code writes: a killed run resumes to the uninterrupted result."""
    data = _data()
    full = _run(data)
    with pytest.raises(Stop):
        _run(data, checkpoint=tmp_path, checkpoint_every=1, _batch_hook=_stop_after(2))
    resumed = _run(data, checkpoint=tmp_path, checkpoint_every=1)
    np.testing.assert_array_equal(resumed.weight, full.weight)
    np.testing.assert_array_equal(resumed.node_attrs["attribution"], full.node_attrs["attribution"])


# ----------------------------------------------------------------------------- changed data
def test_changed_tensor_item_between_kill_and_resume_is_refused(tmp_path):
    x, y = _data()
    with pytest.raises(Stop):
        _run((x, y), checkpoint=tmp_path, checkpoint_every=1, _batch_hook=_stop_after(0))
    x2 = x.clone()
    x2[2, 1, 3, 3] += 1e-9  # item 2: none of the items the fingerprint reads as the model sees them
    with pytest.raises(ConnectomeError, match="different arguments.*images"):
        _run((x2, y), checkpoint=tmp_path, checkpoint_every=1)
    _run((x, y), checkpoint=tmp_path, checkpoint_every=1)  # the unchanged data still resumes


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(N):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(d / f"{i // 2}.png")


def _float_model() -> nn.Module:
    return _model().float()


@pytest.mark.parametrize("change", ["edited", "touched"])
def test_changed_image_file_between_kill_and_resume_is_refused(tmp_path, change):
    from PIL import Image

    root = tmp_path / "imgs"
    _image_folder(root)
    ck = tmp_path / "ck"
    kw = dict(batch_size=BATCH, device="cpu", progress=False, checkpoint=ck, checkpoint_every=1,
              transform=lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255)
    with pytest.raises(Stop):
        attribution(_float_model(), str(root), target=0, _batch_hook=_stop_after(0), **kw)
    # ImageFolder order: c0/0 c0/1 c0/2 c0/3 c1/0 ...: the fingerprint read items 0, 4, 7; change item 2
    victim = root / "c0" / "2.png"
    if change == "edited":
        Image.fromarray(np.full((6, 6, 3), 7, np.uint8)).save(victim)
    else:  # same bytes, new modification time (a re-export, a restore from backup)
        st = os.stat(victim)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ConnectomeError, match="different arguments.*images"):
        attribution(_float_model(), str(root), target=0, **kw)


# ----------------------------------------------------------------------------- the content hash
def _digest(t, idx=None) -> str:
    import hashlib

    h = hashlib.sha256()
    dd._tensor_digest(t, idx, h)
    return h.hexdigest()


def test_tensor_digest_sees_every_value_and_every_swap():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    base = _digest(x)
    for i in range(x.numel()):  # any single value, anywhere
        y = x.clone().view(-1)
        y[i] = torch.nextafter(y[i], torch.tensor(np.inf, dtype=torch.float64))
        assert _digest(y.view_as(x)) != base, i
    z = x.clone()
    z[3, 0, 1, 1], z[3, 2, 0, 0] = x[3, 2, 0, 0], x[3, 0, 1, 1]  # two values of one item swapped
    assert _digest(z) != base
    assert _digest(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)) == base  # layout does not matter
    assert _digest(x, [0, 2]) == _digest(x[[0, 2]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool, torch.int64):
        assert _digest(x.to(dtype)) == _digest(x.to(dtype).clone())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_tensor_digest_is_the_same_on_the_gpu():
    x = torch.randn(9, 3, 32, 32)
    assert _digest(x.cuda()) == _digest(x)
    assert _digest(x.cuda(), [1, 5, 8]) == _digest(x, [1, 5, 8])


def test_checkpointed_run_with_a_category_name_at_the_file_name_limit(tmp_path):
    """A 254-byte folder name is legal; its checkpoint folder (label prefix added) must be too."""
    from PIL import Image

    from connectome.extract.flow import attribution_by_category

    rng = np.random.default_rng(0)
    names = ["é" * 127, "short"]
    for name in names:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    kw = dict(batch_size=BATCH, device="cpu", progress=False, checkpoint=tmp_path / "ck",
              transform=lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255)
    graphs = attribution_by_category(_float_model(), str(tmp_path / "imgs"), **kw)
    assert sorted(graphs) == sorted(names)
    folders = os.listdir(tmp_path / "ck")
    assert len(folders) == 2 and all(len(f.encode()) <= 120 for f in folders)
    again = attribution_by_category(_float_model(), str(tmp_path / "imgs"), **kw)  # resumes from complete checkpoints
    for name in names:
        np.testing.assert_array_equal(again[name].weight, graphs[name].weight)


@pytest.mark.parametrize("by_category", [False, True])
def test_checkpoint_under_a_file_is_one_line_error(tmp_path, by_category):
    """A checkpoint path inside a file: one line naming the file (it was NotADirectoryError
    from deep in pathlib, and the category run checked only the path itself, per category)."""
    from connectome.extract.flow import attribution_by_category

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    run = attribution_by_category if by_category else attribution
    with pytest.raises(ConnectomeError, match="is under the file .*taken.*; give a folder") as err:
        run(_model(), _data(), checkpoint=a_file / "ck", progress=False)
    assert "\n" not in str(err.value)
    assert a_file.read_text() == "x"
