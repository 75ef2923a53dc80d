"""Reading an ImageFolder: each file once however links lead to it, 16-bit grey images scaled."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from connectome.extract.data import make_loader

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _to_tensor(img):
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(img)


def _samples(root: Path) -> list[tuple[str, int]]:
    return make_loader(str(root), batch_size=4, transform=_to_tensor, num_workers=0).dataset.samples


def _torchvision(root: Path) -> list[tuple[str, int]]:
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), allow_empty=True).samples


def test_a_loop_back_to_a_parent_counts_each_image_once(tmp_path):
    root = tmp_path / "root"
    _images(root / "cat", 3)
    _images(root / "dog", 2, seed=1)
    os.symlink(root / "cat", root / "cat" / "again")  # cat/again/again/... : a loop
    os.symlink(root, root / "dog" / "up")  # dog/up/cat, dog/up/dog/up/... : a loop through the root
    assert len(_torchvision(root)) > 5 * 40  # what torchvision makes of it: each image about 41 times
    with pytest.warns(UserWarning, match=r"2 folder link\(s\) lead to a folder already read .*'cat/again'"):
        info = make_loader(str(root), batch_size=4, transform=_to_tensor, num_workers=0)
    assert sorted((Path(p).relative_to(root).as_posix(), c) for p, c in info.dataset.samples) == \
        [("cat/0.png", 0), ("cat/1.png", 0), ("cat/2.png", 0), ("dog/0.png", 1), ("dog/1.png", 1)]
    assert info.n_images == 5  # as many as there are files
    seen = torch.cat([b[0] for b in info.loader])
    assert seen.shape[0] == 5


def test_links_to_other_folders_are_followed_once(tmp_path):
    root, extra = tmp_path / "root", tmp_path / "extra"
    _images(root / "cat", 2)
    _images(root / "dog", 1, seed=1)
    _images(extra / "more", 2, seed=2)
    os.symlink(extra, root / "cat" / "a_link")  # a folder outside the data: read, once
    os.symlink(extra, root / "cat" / "b_link")  # the same folder again: not read twice
    os.symlink(root / "cat" / "0.png", root / "cat" / "z.png")  # a second name for a file: once
    os.symlink(root / "dog", root / "cat" / "dogs")  # another category: stays dog's
    os.symlink(extra, extra / "loop")  # loops outside the data end too
    os.symlink(tmp_path, extra / "up")  # holds root and extra: read, neither again
    with pytest.warns(UserWarning, match=r"folder link\(s\).*1 file link\(s\) to an image already in their category"):
        samples = _samples(root)
    rel = [(Path(p).relative_to(root).as_posix(), c) for p, c in samples]
    assert rel == [("cat/0.png", 0), ("cat/1.png", 0), ("cat/a_link/more/0.png", 0), ("cat/a_link/more/1.png", 0),
                   ("dog/0.png", 1)]


def test_file_links_count_once_per_category(tmp_path):
    root, extra = tmp_path / "root", tmp_path / "extra"
    _images(root / "cat", 1)
    _images(root / "dog", 1, seed=1)
    _images(extra, 1, seed=2)
    os.symlink(extra / "0.png", root / "cat" / "a.png")  # a file outside the data: once
    os.symlink(extra / "0.png", root / "cat" / "b.png")  # the same file again in the same category: left out
    os.symlink(root / "dog" / "0.png", root / "cat" / "dog.png")  # another category's image: cat's too
    with pytest.warns(UserWarning, match=r"; 1 file link\(s\) to an image already in their category left out$"):
        samples = _samples(root)
    rel = [(Path(p).relative_to(root).as_posix(), c) for p, c in samples]
    assert rel == [("cat/0.png", 0), ("cat/a.png", 0), ("cat/dog.png", 0), ("dog/0.png", 1)]


def test_a_category_folder_that_is_a_link_is_read(tmp_path):
    real = tmp_path / "elsewhere"
    _images(real, 2)
    (tmp_path / "root").mkdir()
    os.symlink(real, tmp_path / "root" / "cat")
    _images(tmp_path / "root" / "dog", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing read twice: nothing to say
        assert _samples(tmp_path / "root") == _torchvision(tmp_path / "root")


def test_without_links_the_order_is_torchvisions(tmp_path):
    root = tmp_path / "root"
    rng = np.random.default_rng(3)
    for c in ["b", "a", "c_c", "C"]:
        for sub in ["", "x", "x/y", "w", "X"]:
            _images(root / c / sub, int(rng.integers(0, 3)), seed=int(rng.integers(100)))
    (root / "a" / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a" / "UPPER.PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = _samples(root)
    assert ours == _torchvision(root)  # same files, same order: indices of old graphs stay valid
    assert len(ours) > 10


# ----------------------------------------------------------------------------- 16-bit images
def _gradient() -> np.ndarray:
    """A smooth grey ramp in [0, 1] that takes values between the 8-bit levels."""
    y, x = np.mgrid[0:16, 0:24]
    return (x * 16 + y) / (23 * 16 + 15)


def test_16_bit_png_is_scaled_like_its_8_bit_copy(tmp_path):
    ramp = _gradient()
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(root / "a" / "ramp.png")
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(root / "b" / "ramp.png")
    with Image.open(root / "a" / "ramp.png") as im:
        assert im.mode in ("I;16", "I")  # truly 16 bits on disk
    info = make_loader(str(root), batch_size=2, transform=_to_tensor, num_workers=0)
    x, y, skipped = next(iter(info.loader))
    assert not skipped and y.tolist() == [0, 1]
    wide, eight = x[0].double() / 255, x[1].double() / 255
    assert wide.shape == (3, 16, 24)
    assert float(wide.max()) == 1.0 and float(wide.min()) == 0.0  # not clipped to white
    assert float((wide - eight).abs().max()) <= 1 / 255 + 1e-12
    assert float((wide[0] - torch.from_numpy(ramp)).abs().max()) <= 0.5 / 255 + 1e-12


@pytest.mark.parametrize("name, mode", [("wide.png", "I;16"), ("wide.pgm", "I"), ("wide.tif", "I")])
def test_patches_read_16_bit_images_scaled(tmp_path, name, mode):
    from connectome.patches import _file_loader

    ramp = _gradient()
    wide = np.rint(ramp * 65535)
    img = Image.fromarray(wide.astype(np.int32), "I") if name.endswith(".tif") else Image.fromarray(wide.astype(np.uint16))
    img.save(tmp_path / name)
    with Image.open(tmp_path / name) as im:
        assert im.mode == mode
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(tmp_path / "eight.png")
    load = _file_loader((16, 16))
    a, b = load(str(tmp_path / name)), load(str(tmp_path / "eight.png"))
    assert a.shape == (16, 16, 3) and a.max() - a.min() > 0.5  # a ramp, not white
    assert np.abs(a - b).max() <= 1 / 255 + 1e-12
