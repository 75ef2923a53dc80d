"""Images in: ImageFolder paths, datasets, loaders and tensors; every bad input gets a clear error."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import connectome as cn
from connectome.errors import ConnectomeError, DataError
from connectome.extract import attribution, attribution_by_category

pytest.importorskip("torchvision")


def tiny_model(classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, classes)).double().eval()


def transform8():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(8), transforms.CenterCrop(8), transforms.ToTensor()])


def write_images(folder, n: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).save(folder / f"{k}.png")


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def run(data, model=None, **kw):
    kw.setdefault("progress", False)
    return attribution(model if model is not None else tiny_model(), data, **kw)


X = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 1, 0])


# ---------------------------------------------------------------------- folders
def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data folder .*missing.* does not exist") as info:
        run(tmp_path / "missing", transform=transform8())
    one_line(info.value)


def test_path_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file; pass an ImageFolder directory"):
        run(tmp_path / "x.png", transform=transform8())


def test_folder_without_class_subfolders(tmp_path):
    write_images(tmp_path / "flat", 2)
    with pytest.raises(DataError, match="has no class sub-folders") as info:
        run(tmp_path / "flat", transform=transform8())
    one_line(info.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "root" / "cat").mkdir(parents=True)
    (tmp_path / "root" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images with extensions"):
        run(tmp_path / "root", transform=transform8())


def test_undecodable_image_is_skipped_with_a_warning(tmp_path):
    write_images(tmp_path / "root" / "a", 2)
    write_images(tmp_path / "root" / "b", 2, seed=1)
    (tmp_path / "root" / "a" / "x.png").write_bytes(b"these are not png bytes")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) that could not be decoded: .*x\.png"):
        g = run(tmp_path / "root", transform=transform8(), batch_size=2)
    assert g.meta["skipped_images"] == 1 and g.meta["n_images"] == 4
    with pytest.warns(UserWarning, match="x.png"):
        graphs = attribution_by_category(tiny_model(), tmp_path / "root", transform=transform8(), progress=False)
    assert {k: v.meta["skipped_images"] for k, v in graphs.items()} == {"a": 1, "b": 0}
    assert {k: v.meta["n_images"] for k, v in graphs.items()} == {"a": 2, "b": 2}


def test_category_whose_images_all_fail(tmp_path):
    write_images(tmp_path / "root" / "a", 2)
    (tmp_path / "root" / "b").mkdir()
    (tmp_path / "root" / "b" / "x.png").write_bytes(b"garbage")
    (tmp_path / "root" / "b" / "y.jpg").write_bytes(b"more garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="category 'b': no images could be read: all 2 files failed to decode") as info:
            attribution_by_category(tiny_model(), tmp_path / "root", transform=transform8(), progress=False)
    one_line(info.value)


def test_all_images_fail(tmp_path):
    (tmp_path / "root" / "b").mkdir(parents=True)
    (tmp_path / "root" / "b" / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="x.png"):
        with pytest.raises(DataError, match="all 1 files failed to decode"):
            run(tmp_path / "root", transform=transform8())


# ---------------------------------------------------------------------- tensors, datasets, loaders
@pytest.mark.parametrize(
    "data, phrase",
    [
        ((torch.zeros(0, 3, 8, 8), torch.zeros(0)), "the dataset is empty"),
        (torch.zeros(0, 3, 8, 8), "the dataset is empty"),
        (TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)), "the dataset is empty"),
        (DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8))), "the DataLoader's dataset is empty"),
        ((torch.zeros(2, 3, 8, 8), torch.zeros(3)), "2 images, 3 labels"),
        (42, "cannot read images from a int"),
        ([1, 2, 3], "cannot read images from a list"),
    ],
)
def test_bad_data(data, phrase):
    with pytest.raises(DataError, match=phrase) as info:
        run(data)
    one_line(info.value)


def test_empty_iterable_dataset():
    class Nothing(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(DataError, match="the data is empty"):
        run(DataLoader(Nothing(), batch_size=2))


@pytest.mark.parametrize("labels", [torch.tensor([0, 2, 1, 0]), torch.tensor([0, -1, 1, 0])])
def test_labels_out_of_range(labels):
    with pytest.raises(DataError, match=r"labels .* are out of range of the output layer \(2 units\)") as info:
        run((X, labels))
    one_line(info.value)


@pytest.mark.parametrize("target, phrase", [(5, "target class 5 does not exist"), ("zebra", "target 'zebra'")])
def test_target_class_that_does_not_exist(target, phrase):
    with pytest.raises(DataError, match=phrase):
        run((X, Y), target=target)


def test_class_name_from_the_dataset(tmp_path):
    write_images(tmp_path / "root" / "ant", 1)
    write_images(tmp_path / "root" / "bee", 2, seed=1)
    g = run(tmp_path / "root", transform=transform8(), target="bee")
    assert g.meta["target_class"] == 1
    assert g.layer("logits").labels == ("ant", "bee")
    with pytest.raises(DataError, match=r"target 'cow' is not .*classes: \['ant', 'bee'\]"):
        run(tmp_path / "root", transform=transform8(), target="cow")


def test_images_without_labels():
    with pytest.raises(DataError, match="target='label' needs labels") as info:
        run(X)
    one_line(info.value)
    g = run(X, target=1)
    assert g.meta["n_images"] == 4 and g.meta["target_class"] == 1
    with pytest.raises(DataError, match="needs labels"):
        attribution_by_category(tiny_model(), DataLoader(TensorDataset(X)), progress=False)


def test_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConnectomeError, match="no CUDA GPU is available; use device='cpu'") as info:
        run((X, Y), device="cuda")
    one_line(info.value)


def test_bad_device():
    with pytest.raises(ConnectomeError, match="not a torch device"):
        run((X, Y), device="tpu")


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run((X, Y), batch_size=0)


def test_model_in_training_mode_warns_and_is_restored():
    m = tiny_model().train()
    with pytest.warns(UserWarning, match="Sequential is in training mode.*restores training mode"):
        g = run((X, Y), model=m)
    assert m.training and all(s.training for s in m.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: no warning at all
        g2 = run((X, Y), model=m.eval())
    np.testing.assert_array_equal(g.weight, g2.weight)


# ---------------------------------------------------------------------- every input form gives the same graph
class DictImages(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": X[i], "label": Y[i]}


@pytest.mark.parametrize(
    "make",
    [
        lambda: (X, Y),
        lambda: TensorDataset(X, Y),
        lambda: DataLoader(TensorDataset(X, Y), batch_size=3),
        lambda: DataLoader(DictImages(), batch_size=2),
    ],
    ids=["pair", "dataset", "loader", "dict-batches"],
)
def test_input_forms_agree(make):
    ref = run((X, Y), batch_size=4)
    g = run(make(), batch_size=2)
    assert g.meta["n_images"] == 4
    np.testing.assert_allclose(g.weight, ref.weight, rtol=1e-12, atol=1e-15)


def test_max_images():
    g = run((X, Y), max_images=3, batch_size=2)
    ref = run((X[:3], Y[:3]))
    assert g.meta["n_images"] == 3
    np.testing.assert_allclose(g.weight, ref.weight, rtol=1e-12, atol=1e-15)


def _folder(root, names, n=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _small(n_out):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, n_out)).eval()


def test_folders_named_after_output_classes_target_those_units(tmp_path):
    from torchvision import transforms

    root = _folder(tmp_path / "imgs", ["tabby", "tiger_cat"])
    labels = ["tench", "tiger cat", "goldfish", "Tabby", "shark"]
    graphs = cn.extract.attribution_by_category(_small(5), root, labels=labels, transform=transforms.ToTensor(),
                                                progress=False, device="cpu")
    assert graphs["tabby"].meta["target_class"] == 3 and graphs["tiger_cat"].meta["target_class"] == 1
    # the flow into the target unit is the category's logit total; other units get none
    g = graphs["tabby"]
    out = g.node_attr("attribution", layer="logits")
    assert out[3] == pytest.approx(g.meta["target_total"], rel=1e-6) and np.count_nonzero(out) == 1


def test_folders_named_by_unit_number(tmp_path):
    from torchvision import transforms

    root = _folder(tmp_path / "imgs", ["1", "3"])
    graphs = cn.extract.attribution_by_category(_small(5), root, transform=transforms.ToTensor(),
                                                progress=False, device="cpu")
    assert graphs["3"].meta["target_class"] == 3 and graphs["1"].meta["target_class"] == 1


def test_folders_not_among_output_classes(tmp_path):
    from torchvision import transforms

    root = _folder(tmp_path / "imgs", ["tabby", "zebra"])
    with pytest.raises(DataError, match="zebra"):
        cn.extract.attribution_by_category(_small(3), root, labels=["tabby", "a", "b"],
                                           transform=transforms.ToTensor(), progress=False, device="cpu")


def test_label_map_is_not_needed_for_other_targets(tmp_path):
    from torchvision import transforms

    root = _folder(tmp_path / "imgs", ["cats", "dogs"])
    g = cn.extract.attribution(_small(5), root, target=2, labels=["a", "b", "c", "d", "e"],
                               transform=transforms.ToTensor(), progress=False, device="cpu")
    assert g.meta["target_class"] == 2


def test_target_class_of_categories_restored_from_a_checkpoint(tmp_path):
    from torchvision import transforms

    root = _folder(tmp_path / "imgs", ["1", "3"])
    kw = dict(transform=transforms.ToTensor(), progress=False, device="cpu", checkpoint=tmp_path / "ck")
    first = cn.extract.attribution_by_category(_small(5), root, **kw)
    again = cn.extract.attribution_by_category(_small(5), root, **kw)  # answered by the finished checkpoints
    assert {k: g.meta["target_class"] for k, g in again.items()} == {"1": 1, "3": 3}
    assert {k: g.meta["target_class"] for k, g in first.items()} == {"1": 1, "3": 3}


# ---------------------------------------------------------------------- the data path
def _same_graph(a, b):
    np.testing.assert_array_equal(a.weight, b.weight)
    for k in a.node_attrs:
        np.testing.assert_array_equal(a.node_attr(k), b.node_attr(k), err_msg=k)
    assert a.meta["n_images"] == b.meta["n_images"]


@pytest.mark.parametrize("batch_size, max_images", [(3, None), (2, 3), (8, None)])
def test_tensors_give_the_graph_a_collating_dataloader_gives(batch_size, max_images):
    """Sliced batches are the batches a DataLoader stacks image by image: the same graph, bit for bit."""
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    fast = run((x, y), batch_size=batch_size, max_images=max_images)
    collated = run(DataLoader(TensorDataset(x, y), batch_size=batch_size), max_images=max_images)
    _same_graph(fast, collated)
    assert fast.meta["n_images"] == (max_images or 7)


def test_tensor_batches_are_views_not_copies():
    from connectome.extract.data import TensorLoader, make_loader

    x = torch.randn(7, 3, 4, 4)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    info = make_loader((x, y), batch_size=3)
    assert isinstance(info.loader, TensorLoader) and not isinstance(info.loader, DataLoader)
    batches = list(info.loader)
    assert [b[0].shape[0] for b in batches] == [3, 3, 1] and len(info.loader) == 3
    for i, (bx, by) in enumerate(batches):
        assert bx.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a slice of x
        assert bx.storage_offset() == 3 * i * 3 * 4 * 4
        assert torch.equal(by, y[3 * i : 3 * i + 3])
    images_only = list(make_loader(x, batch_size=4).loader)
    assert [b.shape[0] for b in images_only] == [4, 3]
    assert images_only[1].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_pinned_batches_come_from_a_thread_in_order(monkeypatch):
    """With pin_memory (a CUDA run) batches are pinned on a background thread, ahead, in order.
    (Pinning itself needs CUDA: here it is replaced by a copy that records its thread.)"""
    import threading

    import connectome.extract.data as data_mod

    threads = []

    def fake_pin(t):
        threads.append(threading.current_thread().name)
        return t.clone()

    monkeypatch.setattr(data_mod, "_pinned", fake_pin)
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.arange(10)
    loader = data_mod.TensorLoader(data_mod._TensorPairs(x, y), 3, pin_memory=True)
    got = list(loader)
    assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(torch.cat([b[1] for b in got]), y)
    assert len(threads) == 8 and all(name.startswith("connectome-pin") for name in threads)
    stopped = iter(data_mod.TensorLoader(data_mod._TensorPairs(x, y), 2, pin_memory=True))
    assert torch.equal(next(stopped)[0], x[:2])
    stopped.close()  # a run that stops early (max_images) leaves no thread behind
    assert not any(t.name.startswith("connectome-pin") for t in threading.enumerate())


def test_by_category_on_tensors_reads_each_category_by_slices():
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    graphs = attribution_by_category(tiny_model(), (x, y), batch_size=2, progress=False, device="cpu")
    for label, g in zip((0, 1), graphs.values()):
        _same_graph(g, run((x[y == label], y[y == label]), batch_size=2))


def test_a_tensor_dataset_is_read_by_slices_too():
    from connectome.extract.data import TensorLoader, make_loader

    assert isinstance(make_loader(TensorDataset(X, Y), batch_size=2).loader, TensorLoader)
    _same_graph(run(TensorDataset(X, Y), batch_size=3), run(DataLoader(TensorDataset(X, Y), batch_size=3)))


def test_image_folders_are_decoded_by_worker_processes(tmp_path):
    from connectome.extract.data import default_num_workers, make_loader

    root = _folder(tmp_path / "imgs", ["a", "b"], n=3)
    info = make_loader(root, batch_size=2, transform=transform8())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert info.loader.num_workers == default_num_workers(6, 2) == max(0, min(8, cpus - 1))
    if info.loader.num_workers:
        assert info.loader.prefetch_factor == 4
    assert make_loader(root, batch_size=6, transform=transform8()).loader.num_workers == 0  # one batch: nothing to overlap
    assert make_loader(root, batch_size=2, transform=transform8(), num_workers=0).loader.num_workers == 0
    with_workers = run(root, model=_small(2), batch_size=2, transform=transform8(), num_workers=1, device="cpu")
    in_process = run(root, model=_small(2), batch_size=2, transform=transform8(), num_workers=0, device="cpu")
    _same_graph(with_workers, in_process)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_num_workers_must_be_a_count(bad):
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        run((X, Y), num_workers=bad)


def test_progress_bar_shows_images_per_second(capsys):
    run((X, Y), batch_size=2, progress=True)
    assert "img/s" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("where", ["cuda", "pinned", "cpu"])
def test_tensors_on_the_gpu_or_pinned_are_accepted(where):
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    ref = run((x, y), batch_size=3, device="cpu")
    if where == "cuda":
        x, y = x.cuda(), y.cuda()
    elif where == "pinned":
        x, y = x.pin_memory(), y.pin_memory()
    g = run((x, y), batch_size=3, device="cuda")
    np.testing.assert_allclose(g.weight, ref.weight, rtol=1e-9, atol=1e-12 * np.abs(ref.weight).max())
    assert g.meta["n_images"] == 7
    by_cat = attribution_by_category(tiny_model(), (x, y), batch_size=2, progress=False, device="cuda")
    assert sum(c.meta["n_images"] for c in by_cat.values()) == 7
