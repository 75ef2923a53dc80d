"""One resolver for targets and one for layer names, shared by every function that runs a model."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from connectome import analysis
from connectome.errors import ConnectomeError, DataError, ExtractionError
from connectome.extract import activations, attribution, trace_units
from connectome.extract.targets import check_labels, layer_position, resolve_layer, resolve_target
from connectome.graph import Layer

CLASSES = ["cat", "dog", "eel"]


class Net(nn.Module):
    """input(4) -> body.0(8) -> ReLU -> out(3): the output is ``logits`` in the graph, ``out`` traced."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class Named(TensorDataset):
    classes = CLASSES


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    y = (pred + torch.arange(8)) % 3  # some labels agree with the prediction, some do not
    # The forms below must pick different logits, or the test could not tell them apart.
    assert (pred != y).any() and (pred == y).any() and len(set(pred.tolist())) > 1
    return model, Named(x, y), x, y, logits


attribute = partial(attribution, device="cpu", progress=False)
ablate = partial(analysis.ablate, device="cpu")
fidelity = partial(analysis.fidelity, device="cpu", n_random=2, curves=False)


@pytest.mark.parametrize("form", ["label", "predicted", 1, np.int64(2), "2", "eel"])
def test_attribution_ablate_and_fidelity_read_the_same_target(setup, form):
    model, data, x, y, logits = setup
    n = x.shape[0]
    expect = {
        "label": logits[torch.arange(n), y],
        "predicted": logits.max(1).values,
        1: logits[:, 1],
        2: logits[:, 2],
        "2": logits[:, 2],
        "eel": logits[:, 2],
    }[form if not isinstance(form, np.integer) else int(form)]
    total = float(expect.sum())
    g = attribute(model, data, target=form)
    r = ablate(model, ["body.0:0"], data, target=form)
    f = fidelity(model, ["body.0:0"], data, target=form)
    assert g.meta["target_total"] == pytest.approx(total, rel=1e-12)
    assert r.logit_before * n == pytest.approx(total, rel=1e-12)
    assert f.logit_before * n == pytest.approx(total, rel=1e-12)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "form, phrase",
    [
        ("zebra", r"target 'zebra' is not 'label', 'predicted', a class index or a class name \(classes: \['cat', 'dog', 'eel'\]\)"),
        (3, r"target class 3 does not exist; the output layer has 3 units \(3 is out of range 0..2\)"),
        (-1, "target class -1 does not exist"),
        ("-1", "target class -1 does not exist"),
        ("7", "target class 7 does not exist"),
        (True, "target must be 'label', 'predicted', an int class or a class name"),
        (1.0, "got 1.0"),
        (None, "got None"),
        (["label"], r"got \['label'\]"),
    ],
)
def test_bad_targets_give_one_message_everywhere(setup, form, phrase):
    model, data, *_ = setup
    msgs = {
        _error(attribute, model, data, target=form),
        _error(ablate, model, ["body.0:0"], data, target=form),
        _error(fidelity, model, ["body.0:0"], data, target=form),
    }
    assert len(msgs) == 1
    assert pytest.raises(DataError, resolve_target, form, 3, CLASSES).match(phrase)


def test_missing_and_out_of_range_labels_give_one_message_everywhere(setup):
    model, _, x, y, _ = setup
    bad = y.clone()
    bad[0] = 5
    for data, phrase in [(x, "target='label' needs labels"), ((x, bad), "labels 0..5 are out of range of the output layer")]:
        msgs = {
            _error(attribute, model, data),
            _error(ablate, model, ["body.0:0"], data),
            _error(fidelity, model, ["body.0:0"], data),
        }
        assert len(msgs) == 1 and phrase in msgs.pop()


def test_a_callable_target_is_attribution_only(setup):
    model, data, x, _, logits = setup

    def second(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 1]

    g = attribute(model, data, target=second)
    assert g.meta["target_total"] == pytest.approx(float(logits[:, 1].sum()), rel=1e-12)
    for fn, name in [(ablate, "ablate"), (fidelity, "fidelity")]:
        msg = _error(fn, model, ["body.0:0"], data, target=second)
        assert msg.startswith(f"target=second is a callable, which only attribution takes: {name} scores")


def test_resolve_target_forms():
    assert resolve_target("label", 3).kind == "label"
    assert resolve_target("predicted", 3).kind == "predicted"
    assert resolve_target(np.int64(2), 3).index == 2
    assert resolve_target("0", 3).index == 0
    assert resolve_target("dog", 3, CLASSES).index == 1
    # Digits are unit numbers even where a class is named by digits (folders named '281').
    assert resolve_target("2", 3, ["2", "1", "0"]).index == 2
    t = resolve_target(lambda L: L.sum(1), 3)
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 1.0]])
    torch.testing.assert_close(t.logit(logits), torch.tensor([8.0, 4.0]))
    assert resolve_target("predicted", 3).classes(logits).tolist() == [1, 0]
    assert resolve_target(2, 3).classes(logits).tolist() == [2, 2]
    torch.testing.assert_close(resolve_target("label", 3).logit(logits, torch.tensor([2, 1])), torch.tensor([2.0, 0.0]))
    with pytest.raises(DataError, match="needs labels"):
        resolve_target("label", 3).classes(logits)
    with pytest.raises(TypeError, match="no class per image"):
        t.classes(logits)


def test_check_labels():
    assert check_labels(torch.tensor([0, 2], dtype=torch.int32), 3).dtype == torch.long
    with pytest.raises(DataError, match=r"labels -1..2 are out of range"):
        check_labels(torch.tensor([-1, 2]), 3)


# ---------------------------------------------------------------------- layer names
def test_layer_resolver_precedence():
    layers = [Layer("input", "input", 2), Layer("a", "linear", 2, module="x"), Layer("x", "linear", 2, module="y")]
    traced = [Layer("input", "input", 2), Layer("t_a", "linear", 2, module="x"), Layer("t_x", "linear", 2, module="y")]
    assert layer_position("x", layers) == 2  # a layer's own name beats another layer's module path
    assert layer_position("y", layers) == 2
    assert layer_position("t_a", layers, traced) == 1
    assert layer_position("t_a", layers) is None
    assert resolve_layer("a", layers) == 1
    with pytest.raises(ConnectomeError, match=r"^no layer 'zz' in model B; layers are \['input', 'a', 'x'\]$"):
        resolve_layer("zz", layers, where="in model B")
    with pytest.raises(ExtractionError):
        resolve_layer("zz", layers, error=ExtractionError)


def test_layer_names_mean_the_same_everywhere(setup):
    """Graph layer name, traced name and module path find the same layer in every function."""
    model, data, x, *_ = setup
    ug = trace_units(model, x[:1])
    assert ug.layer_index("out") == len(ug.layers) - 1  # traced name (the graph calls it logits)
    assert ug.layer_index("body.0") == 1
    with pytest.raises(ExtractionError, match="no layer 'nope' in the traced model"):
        ug.layer_index("nope")
    for name in ["logits", "out"]:
        acts = activations(model, x, layers=[name], device="cpu")
        assert list(acts) == ["logits"]
        cmp = analysis.compare_activations(model, x[0], x[1], layers=[name], device="cpu")
        assert [d.layer for d in cmp.per_layer] == ["logits"]
        m = analysis.match_units(model, model, x, layer_pairs=[("body.0", name)], device="cpu")
        assert m.layer_pairs == (("body.0", "logits"),)
    g = attribute(model, data, layers=["body.0"])
    assert g.layer_names == ["input", "body.0", "logits"]
    for fn, phrase in [
        (lambda: activations(model, x, layers=["nope"], device="cpu"), "no layer 'nope' in the model's unit graph; layers are"),
        (lambda: analysis.compare_activations(model, x[0], x[1], layers=["nope"], device="cpu"),
         "no layer 'nope' in the model's unit graph; layers are"),
        (lambda: analysis.match_units(model, model, x, layer_pairs=[("body.0", "nope")], device="cpu"),
         "no layer 'nope' in model B; layers are"),
        (lambda: attribute(model, data, layers=["nope"]), "no layer 'nope' to contract onto; layers are"),
    ]:
        with pytest.raises(ConnectomeError, match=phrase):
            fn()
