"""Tests for the embedded default: shapes dataset and shipped zoo models."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.fx

from connectome import zoo
from connectome.zoo import models as zoo_models
from connectome.zoo import train as zoo_train

# Fresh evaluation seed: disjoint from every training seed and the held-out
# seed used when the shipped accuracies were measured.
FRESH_SEED = 424_242
ACCURACY_MARGIN = 0.03


# --- dataset ---------------------------------------------------------------


def test_classes_exported():
    assert zoo.SHAPE_CLASSES == zoo.shapes.CLASSES
    assert len(zoo.SHAPE_CLASSES) == 9
    assert len(set(zoo.SHAPE_CLASSES)) == 9
    assert {"circle", "ring", "square", "triangle", "hstripes"} <= set(zoo.SHAPE_CLASSES)


def test_items_shapes_dtypes_and_labels():
    ds = zoo.shapes(5, seed=0)
    assert len(ds) == 5 * len(zoo.SHAPE_CLASSES)
    assert ds.classes == list(zoo.SHAPE_CLASSES)
    assert len(ds.targets) == len(ds)
    image, label = ds[3]
    assert isinstance(image, torch.Tensor)
    assert image.dtype == torch.float32
    assert image.shape == (3, 32, 32)
    assert isinstance(label, int)
    assert label == ds.targets[3]
    assert ds.images.shape == (len(ds), 3, 32, 32)
    assert torch.isfinite(ds.images).all()


def test_every_class_present_n_per_class_times():
    ds = zoo.shapes(7, seed=3)
    counts = Counter(ds.targets)
    assert counts == {k: 7 for k in range(len(zoo.SHAPE_CLASSES))}


def test_labels_are_shuffled():
    # A prefix of the dataset should already mix classes.
    ds = zoo.shapes(20, seed=0)
    assert len(set(ds.targets[:30])) > 3


def test_same_seed_identical_different_seed_differs():
    a = zoo.shapes(4, seed=11)
    b = zoo.shapes(4, seed=11)
    c = zoo.shapes(4, seed=12)
    assert torch.equal(a.images, b.images)
    assert a.targets == b.targets
    assert not torch.equal(a.images, c.images)


def test_custom_size():
    ds = zoo.shapes(2, seed=0, size=48)
    assert ds.images.shape == (2 * len(zoo.SHAPE_CLASSES), 3, 48, 48)
    assert ds.size == 48


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_per_class": 0}, "n_per_class"),
        ({"n_per_class": -3}, "n_per_class"),
        ({"n_per_class": 2, "size": 15}, "size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.shapes(**kwargs)


def test_normalisation_and_denormalize():
    ds = zoo.shapes(30, seed=5)
    per_channel_mean = ds.images.mean(dim=(0, 2, 3))
    per_channel_std = ds.images.std(dim=(0, 2, 3))
    assert per_channel_mean.abs().max() < 0.15
    assert ((per_channel_std > 0.7) & (per_channel_std < 1.3)).all()

    single = zoo.denormalize(ds[0][0])
    batch = zoo.shapes.denormalize(ds.images[:4])
    assert single.shape == (32, 32, 3)
    assert batch.shape == (4, 32, 32, 3)
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    # Rendered pixels lie in [0, 1], so the round trip is exact up to float error.
    expected = ds.images[0].numpy() * np.array(zoo.STD)[:, None, None] + np.array(zoo.MEAN)[:, None, None]
    np.testing.assert_allclose(single, np.moveaxis(expected, 0, -1), atol=1e-5)


# --- shipped models --------------------------------------------------------


def test_list_models():
    names = zoo.list_models()
    assert names == ["simplecnn_a", "simplecnn_b", "smallresnet", "tinyvit"]
    names.append("mutated")
    assert "mutated" not in zoo.list_models()


def test_shipped_weights_are_small():
    sizes = [(zoo_models.WEIGHTS_DIR / f"{name}.pt").stat().st_size for name in zoo.list_models()]
    assert all(size < 400_000 for size in sizes)
    assert sum(sizes) < 3_000_000


@pytest.fixture(scope="module")
def fresh_sample():
    return zoo.shapes(50, seed=FRESH_SEED)


@pytest.mark.parametrize("name", ["simplecnn_a", "simplecnn_b", "smallresnet", "tinyvit"])
def test_model_loads_and_meets_stated_accuracy(name, fresh_sample):
    info = zoo.model_info(name)
    assert FRESH_SEED != info["heldout_seed"]
    first, last = info["train_data_seed_range"]
    assert not first <= FRESH_SEED <= last

    model = zoo.load_model(name)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert type(model).__name__ == info["architecture"]
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]
    assert info["image_size"] == 32
    assert info["classes"] == list(zoo.SHAPE_CLASSES)

    accuracy = zoo_train.evaluate(model, fresh_sample)
    assert accuracy >= info["accuracy"] - ACCURACY_MARGIN
    # the CNNs clear 95%; the tiny ViT, trained from scratch on the same few minutes of data, 90%
    assert info["accuracy"] >= (0.90 if info["architecture"] == "TinyViT" else 0.95)


@pytest.mark.parametrize("name", ["simplecnn_a", "simplecnn_b", "smallresnet", "tinyvit"])
def test_model_traces_with_fx(name):
    model = zoo.load_model(name)
    traced = torch.fx.symbolic_trace(model)
    x = zoo.shapes(1, seed=9).images
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    ops = {n.op for n in traced.graph.nodes}
    assert "call_module" in ops


def test_resnet_has_residual_adds():
    traced = torch.fx.symbolic_trace(zoo.load_model("smallresnet"))
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3


def test_model_info_is_a_copy():
    info = zoo.model_info("simplecnn_a")
    info["accuracy"] = -1
    assert zoo.model_info("simplecnn_a")["accuracy"] >= 0.95


@pytest.mark.parametrize("func", [zoo.load_model, zoo.model_info, zoo.build_model])
def test_unknown_name_raises(func):
    with pytest.raises(ValueError, match="simplecnn_a.*smallresnet"):
        func("resnet50")


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_all"):
        zoo.load_model("smallresnet", weights_dir=tmp_path)


# --- training ----------------------------------------------------------------


def test_train_model_smoke_is_deterministic():
    kwargs = {"epochs": 1, "n_per_class": 3, "progress": False, "num_threads": 1}
    threads_before = torch.get_num_threads()
    model_a, acc_a = zoo.train_model("simplecnn_a", **kwargs)
    model_b, acc_b = zoo.train_model("simplecnn_a", **kwargs)
    assert torch.get_num_threads() == threads_before
    assert not model_a.training
    assert 0.0 <= acc_a <= 1.0
    assert acc_a == acc_b
    for (key, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), key


def test_train_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        zoo.train_model("simplecnn_a", epochs=0, progress=False)
    with pytest.raises(ValueError, match="available"):
        zoo.train_model("nope", progress=False)


def test_train_all_writes_loadable_weights(tmp_path, monkeypatch):
    tiny = {name: {"epochs": 1, "n_per_class": 2, "lr": 1e-3} for name in zoo.list_models()}
    monkeypatch.setattr(zoo_train, "_RECIPES", tiny)
    accuracies = zoo.train_all(tmp_path, progress=False)
    assert sorted(accuracies) == zoo.list_models()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "models.json",
        "simplecnn_a.pt",
        "simplecnn_b.pt",
        "smallresnet.pt",
        "tinyvit.pt",
    ]
    meta = json.loads((tmp_path / "models.json").read_text())
    for name in zoo.list_models():
        assert meta[name]["accuracy"] == round(accuracies[name], 4)
        assert zoo.model_info(name, weights_dir=tmp_path)["epochs"] == 1
        model = zoo.load_model(name, weights_dir=tmp_path)
        assert not model.training
