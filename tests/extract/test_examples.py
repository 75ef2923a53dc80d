"""Dataset examples per unit: streaming top-k against brute force, receptive-field crops
against gradient support, and the examples' journey through save/load, prune, subgraph,
checkpoints and image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import connectome as cn
from connectome import patches
from connectome.extract.topk import topk_merge
from connectome.extract.trace import run_nodes, trace_units
from connectome.kinds import Kind

K = 4


class Net(nn.Module):
    """Strided conv with padding, BN-ReLU, a residual conv, max pooling, a channels-last
    Linear between two permutes, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Linear(5, 6)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=2, dilation=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(h + self.conv2(h))
        h = self.pool(h)
        h = self.mix(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = torch.relu(self.conv3(h))
        return self.fc(h.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = Net().double().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _data(n: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64), torch.arange(n) % 3


def _brute(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per layer: (N, L) max over positions, its position, and per-image attribution, from one
    full-batch pass with plain autograd (no accumulator, no tracker)."""
    ug = trace_units(model, x[:1])
    nodes = {s.out_node: li for li, s in enumerate(ug.layers) if s.kind != Kind.INPUT}
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out, kept = run_nodes(ug.gm, (xg,), keep=set(nodes),
                              on_value=lambda n, v: v.clone() if n.name in nodes else v)
        grads = torch.autograd.grad(out.gather(1, y[:, None]).sum(), [kept[n] for n in nodes])
    res = {}
    for (node, li), gA in zip(nodes.items(), grads):
        A = kept[node].detach()
        dim = ug.unit_dim(node) % A.dim()
        a = A.movedim(dim, 1).reshape(A.shape[0], A.shape[dim], -1)
        p = (A * gA).movedim(dim, 1).reshape(A.shape[0], A.shape[dim], -1)
        res[li] = (a.max(2).values.numpy(), a.argmax(2).numpy(), p.sum(2).numpy(),
                                   p.argmax(2).numpy())
    return res


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Per unit, the k images with the largest value, ties to the smaller index: (L, k)."""
    n = values.shape[0]
    return np.stack([np.lexsort((np.arange(n), -values[:, u]))[:k] for u in range(values.shape[1])])


@pytest.fixture(scope="module")
def run():
    m = _model()
    x, y = _data()
    g = cn.extract.attribution(m, (x, y), batch_size=5, device="cpu", progress=False, examples=K)
    return m, x, y, g


def test_top_k_equals_brute_force_over_all_images(run):
    m, x, y, g = run
    brute = _brute(m, x, y)
    # attribution examples are cropped where the unit is most active in the image
    for by, (vcol, pcol) in {"activation": (0, 1), "attribution": (2, 1)}.items():
        index, value, pos = patches.example_arrays(g, by)
        for li, b in brute.items():
            name = g.layers[li].name
            sl = g.layer_slice(name)
            want = _topk(b[vcol], K)
            np.testing.assert_array_equal(index[sl], want, err_msg=f"{by} {name}")
            np.testing.assert_allclose(value[sl], np.take_along_axis(b[vcol].T, want, 1), rtol=1e-10, atol=1e-12)
            # position of the maximum, where it is unique (a ReLU map of zeros has no one argmax)
            bpos = np.take_along_axis(b[pcol].T, want, 1)
            unique = np.take_along_axis(b[0].T, want, 1) > 0
            np.testing.assert_array_equal(pos[sl][unique], bpos[unique])
    # the input layer is not tracked
    assert (patches.example_arrays(g)[0][g.layer_slice("input")] == -1).all()


def test_examples_without_flows_and_batch_size_do_not_change_the_lists(run):
    m, x, y, g = run
    ex = cn.extract.examples(m, x, k=K, batch_size=23, progress=False)
    a, b = patches.example_arrays(ex), patches.example_arrays(g)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-10, atol=1e-12)
    assert ex.num_edges == 0 and ex.meta["examples"]["k"] == K
    only = cn.extract.examples(m, x, layers=["conv2"], k=2, progress=False)
    idx = patches.example_arrays(only)[0]
    assert (idx[only.layer_slice("conv2")] >= 0).all()
    assert (np.delete(idx, np.r_[only.layer_slice("conv2")], 0) == -1).all()


def test_fewer_images_than_k_leave_empty_slots():
    m = _model()
    x, _ = _data(3)
    ex = cn.extract.examples(m, x, k=5, progress=False)
    index, value, _ = patches.example_arrays(ex)
    sl = ex.layer_slice("conv1")
    assert (np.sort(index[sl][:, :3], 1) == [0, 1, 2]).all()
    assert (index[sl][:, 3:] == -1).all() and np.isnan(value[sl][:, 3:]).all()


@pytest.mark.parametrize("k", [-1, 2.5, True])
def test_bad_number_of_examples_is_refused(k):
    x, y = _data(4)
    with pytest.raises(ValueError, match="examples"):
        cn.extract.attribution(_model(), (x, y), progress=False, examples=k)
    with pytest.raises(ValueError, match="examples"):
        cn.extract.examples(_model(), x, k=k, progress=False)


def test_unknown_layer_is_refused():
    with pytest.raises(cn.ExtractionError, match="nope"):
        cn.extract.examples(_model(), _data(4)[0], layers=["nope"], progress=False)


def test_topk_merge_orders_by_value_then_index():
    cand = torch.tensor([[[1.0, 5, 0], [2.0, 7, 0], [1.0, 2, 0], [-np.inf, -1, -1], [2.0, 3, 1]]], dtype=torch.float64)
    got = topk_merge(cand, 4)[0]
    assert got[:, 1].tolist() == [3, 7, 2, 5]
    assert got[:, 0].tolist() == [2, 2, 1, 1]


# ----------------------------------------------------------------------------- receptive fields
def _support(model: nn.Module, ug, node: str, unit: int, pos: int, x: torch.Tensor) -> np.ndarray:
    """Input pixels with a non-zero gradient of one unit's value at one position."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        _, kept = run_nodes(ug.gm, (x,), keep={node}, on_value=lambda n, v: v.clone() if n.name == node else v)
        v = kept[node]
        dim = ug.unit_dim(node) % v.dim()
        flat = v.movedim(dim, 1).reshape(v.shape[0], v.shape[dim], -1)
        (gx,) = torch.autograd.grad(flat[:, unit, pos].sum(), x)
    return (gx.abs().sum((0, 1)) > 0).numpy()


def test_crop_covers_the_gradient_support_of_every_unit(run):
    m, x, _, g = run
    ug = trace_units(m, x[:1])
    fields = g.meta["examples"]["fields"]
    assert fields["conv1"] is not None and fields["mix"] is not None  # through the permutes
    assert fields["logits"] is None  # after a global mean: the whole image
    for s, layer in zip(ug.layers[1:], g.layers[1:]):
        f = fields[layer.name]
        n_pos = 1 if f is None else f[6] * f[7]
        for pos in sorted({0, n_pos // 2, n_pos - 1}):
            sup = _support(m, ug, s.out_node, 0, pos, x[:8])
            y0, y1, x0, x1 = patches.crop_box(g, f"{layer.name}:0", pos)
            inside = np.zeros_like(sup)
            inside[y0:y1, x0:x1] = True
            assert sup.any(), s.name
            assert not (sup & ~inside).any(), f"{s.name} pos {pos}: gradient outside the crop {(y0, y1, x0, x1)}"


def _conv_stack():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.AvgPool2d(2), nn.Conv2d(3, 2, 3, padding=1),
                         nn.Flatten(), nn.Linear(2 * 4 * 4, 2))


def _dilated_stack():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv2d(3, 2, 3, padding=2, dilation=2),
                         nn.Flatten(), nn.Linear(2 * 8 * 8, 2))


@pytest.mark.parametrize("build,layer,positions", [(_conv_stack, "2", (0, 5, 15)), (_dilated_stack, "1", (0, 27, 63))],
                         ids=["conv stack", "dilated conv"])
def test_crop_is_tight_on_a_linear_conv_stack(build, layer, positions):
    m = build().double().eval()
    x = torch.randn(4, 2, 16, 16, dtype=torch.float64)
    ex = cn.extract.examples(m, x, k=1, progress=False)
    ug = trace_units(m, x[:1])
    spec = ug.layers[ug.layer_index(layer)]
    for pos in positions:
        sup = _support(m, ug, spec.out_node, 1, pos, x)
        rows, cols = np.flatnonzero(sup.any(1)), np.flatnonzero(sup.any(0))
        assert patches.crop_box(ex, f"{layer}:1", pos) == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)


# ----------------------------------------------------------------------------- the examples travel
def test_examples_survive_save_load_prune_subgraph_contract(run, tmp_path):
    _, _, _, g = run
    g.save(tmp_path / "g.npz")
    back = cn.load(tmp_path / "g.npz")
    assert back.equals(g)
    keep = ["conv2:1", "mix:3", "logits:0"]
    for h in (back.prune(top_k=1), back.subgraph(keep), back.contract(["conv2", "mix"])):
        for nid in set(keep) & set(h.node_ids):
            a, b = (patches.example_arrays(v) for v in (h, g))
            i, j = h.index_of(nid), g.index_of(nid)
            np.testing.assert_array_equal(a[0][i], b[0][j])
            assert patches.crop_box(h, nid, int(a[2][i, 0])) == patches.crop_box(g, nid, int(b[2][j, 0]))
    moved = patches.with_examples(g.subgraph(keep), cn.extract.examples(run[0], run[1], k=2, progress=False))
    assert patches.example_arrays(moved)[0].shape == (3, 2)


def test_checkpointed_run_keeps_the_examples_exactly(tmp_path):
    m = _model()
    x, y = _data()
    full = cn.extract.attribution(m, (x, y), batch_size=5, device="cpu", progress=False, examples=K)

    def stop(bi: int) -> None:
        if bi == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cn.extract.attribution(m, (x, y), batch_size=5, device="cpu", progress=False, examples=K,
                               checkpoint=tmp_path, checkpoint_every=1, _batch_hook=stop)
    resumed = cn.extract.attribution(m, (x, y), batch_size=5, device="cpu", progress=False, examples=K,
                                     checkpoint=tmp_path)
    for by in ("activation", "attribution"):
        for a, b in zip(patches.example_arrays(resumed, by), patches.example_arrays(full, by)):
            np.testing.assert_array_equal(a, b)


def test_image_folder_indices_name_the_right_files(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "2.png").write_bytes(b"not a png")  # skipped: the indices after it must not shift
    (tmp_path / "b" / "0.png").write_bytes(b"not a png")  # first of its category (of its batch): found by path
    from torchvision import transforms

    tf = transforms.ToTensor()
    m = _model().float()
    with pytest.warns(UserWarning, match="skipped 1 image"):
        graphs = cn.extract.attribution_by_category(m, str(tmp_path), transform=tf, batch_size=3, progress=False,
                                                    device="cpu", examples=2)
    for g in graphs.values():
        index, value, _ = patches.example_arrays(g)
        paths = g.meta["examples"]["paths"]
        i = g.index_of("conv1:0")
        for j in range(2):
            img = tf(Image.open(paths[str(index[i, j])]).convert("RGB"))
            with torch.no_grad():
                a = torch.relu(m.bn(m.conv1(img[None])))[0, 0].max().item()
            assert a == pytest.approx(value[i, j], rel=1e-5)
        assert all(g.meta["category"] + "/" in p.replace("\\", "/") for p in paths.values())
    index, paths = patches.top_example(graphs["a"])
    assert paths[graphs["a"].index_of("conv2:0")].endswith(".png")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_examples_on_the_gpu_equal_the_cpu(run):
    m, x, y, g = run
    gg = cn.extract.attribution(m, (x, y), batch_size=5, device="cuda", progress=False, examples=K)
    for by in ("activation", "attribution"):
        a, b = patches.example_arrays(gg, by), patches.example_arrays(g, by)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-9, atol=1e-12)
