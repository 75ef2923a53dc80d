"""The caller's model as extraction finds it: hooks refused (the traced graph would not run
them), reparametrised weights (pruning, weight_norm, spectral_norm) honoured exactly, module
names fx cannot write into code traced under aliases, buffers that forward writes put back,
and a 16-bit model's graph stating its dtype's error."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import connectome as cn
from connectome.errors import ExtractionError
from connectome.extract._model import copy_model, kept_buffers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4),
    ).double().eval()


def _data(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _attribution(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> cn.Connectome:
    return cn.extract.attribution(model, (x, y), progress=False, device="cpu")


def _target_total(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return model(x).gather(1, y[:, None]).sum().item()


def _same_graph(a: cn.Connectome, b: cn.Connectome) -> None:
    assert [(l.name, l.size) for l in a.layers] == [(l.name, l.size) for l in b.layers]
    np.testing.assert_array_equal(a.src, b.src)
    np.testing.assert_array_equal(a.dst, b.dst)
    np.testing.assert_array_equal(a.weight, b.weight)


# ----------------------------------------------------------------------------- hooks (issue 20, item 8)
def _scale_output(module, inputs, output):
    return output * 1.7


def _shift_input(module, inputs):
    return (inputs[0] + 0.5,)


def _watch(module, inputs, output):  # returns None: leaves the output as it is, but extraction cannot know
    pass


@pytest.mark.parametrize("where, register, phrase", [
    ("0", lambda m: m.register_forward_hook(_scale_output), r"forward hook _scale_output on module '0' \(Conv2d\)"),
    ("4", lambda m: m.register_forward_pre_hook(_shift_input), r"forward pre-hook _shift_input on module '4'"),
    ("", lambda m: m.register_forward_hook(_scale_output), r"forward hook _scale_output on the model itself"),
    ("2", lambda m: m.register_forward_hook(_watch), r"forward hook _watch on module '2' \(ReLU\)"),
    ("2", lambda m: m.register_full_backward_hook(lambda mod, gi, go: gi), r"backward hook .*lambda.* on module '2'"),
])
def test_a_model_with_hooks_is_refused_naming_the_hook(where, register, phrase):
    x, y = _data()
    model = _net()
    handle = register(model.get_submodule(where))
    with pytest.raises(ExtractionError, match=phrase) as info:
        cn.extract.weights(model, (3, 8, 8))
    msg = str(info.value)
    assert "\n" not in msg and "handle.remove()" in msg and "model.apply" in msg
    handle.remove()
    _same_graph(cn.extract.weights(model, (3, 8, 8)), cn.extract.weights(_net(), (3, 8, 8)))


def test_every_extraction_refuses_hooks_and_without_them_is_unchanged():
    x, y = _data()
    model = _net()
    handle = model[0].register_forward_hook(_scale_output)
    for run in (lambda: _attribution(model, x, y), lambda: cn.extract.activations(model, x, device="cpu"),
                lambda: cn.extract.examples(model, (x, y), k=2, progress=False, device="cpu")):
        with pytest.raises(ExtractionError, match=r"forward hook _scale_output on module '0'"):
            run()
    # refused before any image is read
    with pytest.raises(ExtractionError, match="forward hook _scale_output"):
        cn.extract.attribution(model, _Unreadable(), progress=False, device="cpu")
    # without the hook, the same model gives the graph of a model that never had one
    handle.remove()
    _same_graph(_attribution(model, x, y), _attribution(_net(), x, y))


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise AssertionError("the data was read")


def test_a_modifying_hook_is_not_silently_left_out():
    # what the issue saw: the graph's target total was not the model's own
    x, y = _data()
    model = _net()
    model[4].register_forward_hook(_scale_output)
    plain = _attribution(_net(), x, y)
    assert plain.meta["target_total"] != pytest.approx(_target_total(model, x, y), rel=1e-6)
    with pytest.raises(ExtractionError, match="forward hook _scale_output"):
        _attribution(model, x, y)


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_hooks_are_refused(kind):
    import torch.nn.modules.module as tm

    x, y = _data()
    register = getattr(tm, f"register_module_{kind}_hook")
    handle = register(_watch if kind == "forward" else (lambda m, i: None))
    try:
        with pytest.raises(ExtractionError, match=f"global {kind.replace('_', ' ')}"):
            _attribution(_net(), x, y)
    finally:
        handle.remove()
    assert _attribution(_net(), x, y).meta["exact"] is True


def test_many_hooks_are_counted_not_all_listed():
    model = _net()
    for m in model:
        m.register_forward_hook(_watch)
    with pytest.raises(ExtractionError, match=r"and 2 more\.") as info:
        cn.extract.weights(model, (3, 8, 8))
    assert str(info.value).count("_watch") == 6


# ----------------------------------------------------------------------------- reparametrised weights (item 17)
def _prune(m: nn.Module) -> None:
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    prune.l1_unstructured(m[7], "weight", amount=0.6)
    prune.l1_unstructured(m[4], "bias", amount=0.4)


def _weight_norm(m: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(m[0])
        torch.nn.utils.weight_norm(m[7])


def _spectral_norm(m: nn.Module) -> None:
    torch.nn.utils.spectral_norm(m[0])
    torch.nn.utils.spectral_norm(m[7])
    m.train()
    with torch.no_grad():
        for _ in range(3):  # power iterations: u and v are not their initial values
            m(_data()[0])
    m.eval()


def _unprune(m: nn.Module) -> None:
    for k in (0, 4, 7):
        for name in ("weight", "bias"):
            if prune.is_pruned(m[k]) and hasattr(m[k], f"{name}_orig") and hasattr(m[k], f"{name}_mask"):
                prune.remove(m[k], name)


def _unnorm(m: nn.Module) -> None:
    torch.nn.utils.remove_weight_norm(m[0])
    torch.nn.utils.remove_weight_norm(m[7])


def _unspectral(m: nn.Module) -> None:
    torch.nn.utils.remove_spectral_norm(m[0])
    torch.nn.utils.remove_spectral_norm(m[7])


@pytest.mark.parametrize("apply, remove", [(_prune, _unprune), (_weight_norm, _unnorm), (_spectral_norm, _unspectral)],
                         ids=["prune", "weight_norm", "spectral_norm"])
def test_reparametrised_weights_are_the_weights_the_model_uses(apply, remove):
    x, y = _data()
    model = _net()
    apply(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    removed = copy_model(model)  # copy.deepcopy refuses a pruned model
    remove(removed)
    assert not removed._forward_pre_hooks and all(not m._forward_pre_hooks for m in removed.modules())

    g = _attribution(model, x, y)
    # exact: the model's own logits, complete, and the graph of the same model after remove()
    assert g.meta["exact"] is True
    assert g.meta["target_total"] == pytest.approx(_target_total(model, x, y), rel=1e-12)
    assert g.meta["completeness_relative"] <= 1e-10
    _same_graph(g, _attribution(removed, x, y))
    _same_graph(cn.extract.weights(model, (3, 8, 8)), cn.extract.weights(removed, (3, 8, 8)))

    # the caller's model is still reparametrised, its tensors unchanged, and it still trains
    assert all(not torch.is_inference(v) for v in model.state_dict().values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(m._forward_pre_hooks for m in model.modules())
    model(x).sum().backward()


def test_a_pruned_model_is_copied_for_another_device():
    # model_on copies a model that is not on the run's device; copy.deepcopy refuses a pruned one
    model = _net()
    _prune(model)
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    twin = copy_model(model)
    x = _data()[0]
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    assert prune.is_pruned(twin) and twin[0].weight_orig is not model[0].weight_orig
    with torch.no_grad():
        twin[0].weight_orig.zero_()
    assert model[0].weight_orig.any()


def test_pruned_weights_are_zero_in_the_weight_graph():
    model = _net()
    prune.l1_unstructured(model[7], "weight", amount=1.0)  # every weight of the head pruned
    g = cn.extract.weights(model, (3, 8, 8))
    into_head = g.node_layer[g.dst] == len(g.layers) - 1
    assert into_head.any() and np.all(g.weight[into_head] == 0)


def test_a_pruned_module_traced_through_uses_its_pruned_weight():
    # a module fx traces through (not a leaf): forward reads self.weight, which pruning sets
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1)

    torch.manual_seed(0)
    model = nn.Sequential(Custom(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3, dtype=torch.float64)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    x, y = _data()
    y = y % 3
    g = _attribution(model, x, y)
    assert g.meta["target_total"] == pytest.approx(_target_total(model, x, y), rel=1e-12)
    assert [l.name for l in g.layers] == ["input", "0", "logits"]
    assert isinstance(model[0].__dict__.get("weight"), torch.Tensor)  # the model's own attribute, not fx's
    w = cn.extract.weights(model, (3, 8, 8))
    expect = (model[0].weight_orig * model[0].weight_mask).detach().sum((2, 3))
    first = w.node_layer[w.dst] == 1
    got = np.zeros((4, 3))
    got[w.dst[first] - 3, w.src[first]] = w.weight[first]
    np.testing.assert_allclose(got, expect.numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- module names (item 16)
def _named(name: str, nested: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    m = nn.Sequential()
    if nested:
        inner = nn.Sequential()
        inner.add_module(name, conv)
        m.add_module(name, inner)
    else:
        m.add_module(name, conv)
    m.add_module("act", nn.ReLU())
    m.add_module("pool", nn.AdaptiveAvgPool2d(1))
    m.add_module("flat", nn.Flatten())
    m.add_module("head", nn.Linear(4, 3))
    return m.double().eval()


NAMES = ["class", "a'b", 'a"b', "a\nb", "a\\b", "x y"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("nested", [False, True])
def test_odd_module_names_trace_and_keep_their_path(name, nested):
    x, y = _data()
    y = y % 3
    model = _named(name, nested)
    path = f"{name}.{name}" if nested else name
    plain = _named("conv", False)
    w = cn.extract.weights(model, (3, 8, 8))
    assert [l.name for l in w.layers] == ["input", path, "logits"]
    assert w.layers[1].module == path
    np.testing.assert_array_equal(w.weight, cn.extract.weights(plain, (3, 8, 8)).weight)
    g = _attribution(model, x, y)
    assert [l.name for l in g.layers] == ["input", path, "logits"]
    assert g.meta["target_total"] == pytest.approx(_target_total(model, x, y), rel=1e-12)
    np.testing.assert_array_equal(g.weight, _attribution(plain, x, y).weight)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in _named(name, nested).named_modules()]


def test_an_odd_name_on_a_parameter_read_in_forward():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_parameter("class", nn.Parameter(torch.randn(3, 4, dtype=torch.float64)))

        def forward(self, x):
            return F.linear(x, getattr(self, "class")) * torch.full((), 2.0, dtype=torch.float64)  # fx keeps it on its root

    m = nn.Sequential()
    m.add_module("for", Odd())
    g = cn.extract.weights(m.eval(), (4,))
    assert [l.name for l in g.layers] == ["input", "logits"]
    w = getattr(m.get_submodule("for"), "class").detach()
    np.testing.assert_array_equal(g.weight, (2 * w).numpy().ravel().astype(np.float32))


def test_an_error_names_the_real_module():
    m = _named("class", False)
    m.add_module("head", nn.Linear(5, 3).double())  # the wrong width
    with pytest.raises(ExtractionError, match="module 'head'"):
        cn.extract.weights(m, (3, 8, 8))


# ----------------------------------------------------------------------------- buffers (item 12)
class Counting(nn.Module):
    """Writes buffers in forward, in eval mode too: a call counter, a running value, a buffer it replaces."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running", torch.ones(4, dtype=torch.float64))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        self.calls.add_(1)
        self.running.mul_(0.5).add_(self.calls)
        h = torch.relu(self.bn(self.conv(x))) * torch.full((), 2.0, dtype=torch.float64)  # fx keeps it on its root
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("run", ["weights", "attribution", "examples", "activations", "attribution_examples"])
def test_buffers_written_by_forward_are_put_back(run):
    torch.manual_seed(0)
    model = Counting().double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
    x, y = _data()
    y = y % 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    versions = {k: v._version for k, v in tensors.items()}
    attrs = set(vars(model))
    runs = {
        "weights": lambda: cn.extract.weights(model, (3, 8, 8)),
        "attribution": lambda: _attribution(model, x, y),
        "examples": lambda: cn.extract.examples(model, (x, y), k=2, progress=False, device="cpu"),
        "activations": lambda: cn.extract.activations(model, x, device="cpu"),
        "attribution_examples": lambda: cn.extract.attribution(model, (x, y), progress=False, device="cpu", examples=2),
    }
    runs[run]()
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state)
    for k, v in after.items():
        assert v is tensors[k], k  # the same tensor objects
        assert v.dtype == state[k].dtype and torch.equal(v.view(torch.uint8) if v.dim() else v, state[k].view(
            torch.uint8) if v.dim() else state[k]), k  # bit for bit
    assert set(vars(model)) == attrs  # nothing fx made (its _tensor_constant0) is left on the model
    assert model.calls.item() == 0 and torch.equal(model.running, torch.ones(4, dtype=torch.float64))
    # untouched buffers are not even rewritten
    assert all(tensors[k]._version == versions[k] for k in tensors if k not in ("calls", "running"))


def test_buffers_are_put_back_when_extraction_fails():
    torch.manual_seed(0)
    model = Counting().double().eval()
    with pytest.raises(Exception):
        cn.extract.attribution(model, (torch.randn(2, 5, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long)),
                               progress=False, device="cpu")
    assert model.calls.item() == 0 and torch.equal(model.running, torch.ones(4, dtype=torch.float64))


def test_a_buffer_registered_or_replaced_by_forward_is_undone():
    class Replacing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("last", torch.zeros(3))

        def forward(self, x):
            self.lin.register_buffer("made", torch.ones(1))
            self.last = torch.full((3,), 5.0)
            return self.lin(x)

    model = Replacing().eval()
    last = model.last
    model(torch.randn(1, 4))  # forward as such does both
    assert "made" in dict(model.lin.named_buffers()) and model.last is not last
    model = Replacing().eval()
    last = model.last
    with kept_buffers(model):
        model(torch.randn(1, 4))
    assert "made" not in dict(model.lin.named_buffers()) and model.last is last and not last.any()


def test_an_inference_tensor_buffer_written_by_forward_is_put_back():
    # a model built under torch.inference_mode has inference-tensor buffers: no version counter to tell a write
    with torch.inference_mode():
        model = Counting().double().eval()
    assert model.calls.is_inference()
    with torch.inference_mode(), kept_buffers(model):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64))
        assert model.calls.item() == 1  # forward did write it
    assert model.calls.item() == 0 and torch.equal(model.running, torch.ones(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- 16-bit models (item 12)
@pytest.mark.parametrize("dtype, roundoff", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_a_16_bit_model_states_its_dtype_and_error(dtype, roundoff):
    x, y = _data()
    model = _net().to(dtype)
    g = cn.extract.attribution(model, (x.to(dtype), y), progress=False, device="cpu")
    assert g.meta["dtype"] == str(dtype).replace("torch.", "")
    assert g.meta["unit_roundoff"] == roundoff and g.meta["exact"] is False
    # the flows are as close to the float64 flows of the same (16-bit) weights as meta says, and not closer
    # than the dtype allows: meta does not claim float32 accuracy
    ref = _attribution(copy.deepcopy(model).double(), x.to(dtype).double(), y)
    err = np.linalg.norm(g.weight - ref.weight) / np.linalg.norm(ref.weight)
    assert roundoff / 100 <= err <= g.meta["expected_error"], err
    assert g.meta["expected_error"] > 2.0**-24 * 1e3
    f32 = cn.extract.attribution(model.float(), (x.float(), y), progress=False, device="cpu")
    assert f32.meta["exact"] is True and f32.meta["expected_error"] < g.meta["expected_error"]
    assert f32.meta["dtype"] == "float32" and f32.meta["unit_roundoff"] == 2.0**-24


# ----------------------------------------------------------------------------- command line
MODEL_FILE = '''
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def hooked():
    m = _net()
    m[0].register_forward_hook(lambda mod, inputs, out: out * 2)
    return m


def pruned():
    torch.manual_seed(0)
    m = _net()
    odd = nn.Sequential()
    odd.add_module("class", m)
    prune.l1_unstructured(m[0], "weight", 0.5)
    return odd
'''


def test_the_command_line_refuses_hooks_in_one_line_and_takes_pruned_models(tmp_path, capsys):
    from connectome.cli import main

    (tmp_path / "models.py").write_text(MODEL_FILE)
    spec = str(tmp_path / "models.py")
    assert main(["weights", f"{spec}:hooked", "--input-shape", "3,8,8", "--out", str(tmp_path / "h.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "forward hook" in err and "module '0' (Conv2d)" in err
    assert not (tmp_path / "h.npz").exists()
    assert main(["weights", f"{spec}:pruned", "--input-shape", "3,8,8", "--out", str(tmp_path / "p.npz")]) == 0
    g = cn.load(tmp_path / "p.npz")
    assert [l.name for l in g.layers] == ["input", "class.0", "logits"]
    from connectome.modelspec import load_model_spec

    model = load_model_spec(f"{spec}:pruned").model
    prune.remove(model.get_submodule("class.0"), "weight")
    _same_graph(g, cn.extract.weights(model, (3, 8, 8)))
