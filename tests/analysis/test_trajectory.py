"""Connectomes over training: checkpoints -> graphs of one topology -> trajectory.

Known answers: checkpoints that differ in one layer change only that layer's edges;
identical checkpoints give NMI 1, Jaccard 1 and no change; a circuit that appears at a
step is formed at that step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import connectome as cn
from connectome import analysis
from connectome.analysis._toys import toy_attribution
from connectome.analysis.compare import _nmi as nmi_numpy
from connectome.errors import BadFileError, ConnectomeError
from connectome.extract.over_training import same_topology


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def _states():
    torch.manual_seed(0)
    m = Net().eval()
    s0 = {k: v.clone() for k, v in m.state_dict().items()}
    s1 = {k: v.clone() for k, v in s0.items()}
    s1["conv2.weight"] = s1["conv2.weight"] * 1.5 + 0.01
    return m, s0, s1


def test_checkpoints_differing_in_one_layer_change_only_its_edges(tmp_path):
    m, s0, s1 = _states()
    torch.save(s0, tmp_path / "step_00010.pt")
    torch.save({"state_dict": s1}, tmp_path / "step_00020.pt")
    gs = cn.extract.over_training(m, tmp_path, input_shape=(3, 8, 8))
    assert [g.meta["step"] for g in gs] == [10, 20]
    a, b = gs
    assert np.array_equal(a.src, b.src) and np.array_equal(a.dst, b.dst)
    into = a.node_layer[a.dst]
    conv2 = a.layer_position("conv2")
    assert np.all(a.weight[into != conv2] == b.weight[into != conv2])
    assert np.all(a.weight[into == conv2] != b.weight[into == conv2])
    traj = analysis.trajectory(gs)
    assert traj.steps == (10, 20)
    row = traj.layers.index("conv2")
    assert traj.change[row, 0] > 0
    assert np.all(np.delete(traj.change[:, 0], row) == 0)
    # the model itself is untouched
    for k, v in m.state_dict().items():
        assert torch.equal(v, s0[k])


def test_identical_checkpoints_give_nmi_1_and_jaccard_1():
    m, s0, _ = _states()
    traj = analysis.trajectory(cn.extract.over_training(m, [s0, s0, s0], input_shape=(3, 8, 8)))
    assert traj.steps == (0, 1, 2)
    np.testing.assert_array_equal(traj.nmi, [1.0, 1.0])
    assert set(traj.jaccard) == {"0", "1", "2"}
    for j in traj.jaccard.values():
        np.testing.assert_array_equal(j, [1.0, 1.0, 1.0])
    assert set(traj.formed.values()) == {0}
    assert np.all(traj.change == 0)
    assert len(traj.hubs) == 10 and all(v == 1.0 for v in traj.hub_presence.values())


def test_attribution_over_training_per_category():
    m, s0, s1 = _states()
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(12) % 3
    by_cat = cn.extract.over_training(m, [s0, s0], data=(x, y), device="cpu")
    assert sorted(by_cat) == ["0", "1", "2"] and all(len(v) == 2 for v in by_cat.values())
    traj = analysis.trajectory(by_cat)
    np.testing.assert_array_equal(traj.nmi, [1.0])
    assert all(np.all(j == 1.0) for j in traj.jaccard.values())


def test_a_circuit_forms_at_the_step_it_appears():
    cat, dog = toy_attribution("cat"), toy_attribution("dog")
    gs = [g.with_meta(step=s) for g, s in zip(same_topology([dog, dog, cat, cat]), (0, 100, 200, 300))]
    traj = analysis.trajectory(gs, categories=["cat"])
    j = traj.jaccard["cat"]
    assert j[0] == j[1] < 0.5 and j[2] == j[3] == 1.0
    assert traj.formed == {"cat": 200}
    assert traj.nmi.shape == (3,)
    # NMI of consecutive Leiden partitions, against compare's own numpy NMI
    parts = [analysis.communities(g, seed=0).membership for g in gs]
    want = [nmi_numpy(parts[t - 1], parts[t]) for t in range(1, 4)]
    np.testing.assert_allclose(traj.nmi, want, rtol=1e-12)
    assert traj.nmi[1] < 1.0  # the dog-to-cat step changes the communities


def test_bad_checkpoints_are_refused(tmp_path):
    m, s0, _ = _states()
    with pytest.raises(ConnectomeError, match="input_shape"):
        cn.extract.over_training(m, [s0])
    bad = dict(s0)
    bad.pop("fc.bias")
    with pytest.raises(ConnectomeError, match="checkpoint 1 does not fit the model"):
        cn.extract.over_training(m, [s0, bad], input_shape=(3, 8, 8))
    with pytest.raises(BadFileError, match="not a file"):
        cn.extract.over_training(m, [tmp_path / "nope.pt"], input_shape=(3, 8, 8))
    with pytest.raises(BadFileError, match="no .pt"):
        cn.extract.over_training(m, tmp_path, input_shape=(3, 8, 8))
    with pytest.raises(ConnectomeError, match="no checkpoints"):
        cn.extract.over_training(m, [], input_shape=(3, 8, 8))
    with pytest.raises(ConnectomeError, match="another topology"):
        analysis.trajectory([toy_attribution("cat"), cn.Connectome.from_edges(
            [("in", "input", 3), ("h1", "linear", 4), ("h2", "linear", 4), ("logits", "output", 2)],
            [("in:0", "h1:0", 1.0)])])


def test_trajectory_figure_is_a_layer_by_step_heatmap():
    from connectome.viz.connectivity import plot_trajectory

    m, s0, s1 = _states()
    traj = analysis.trajectory(cn.extract.over_training(m, [s0, s1, s1], input_shape=(3, 8, 8)))
    fig = plot_trajectory(traj)
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (len(traj.layers), 2)
    np.testing.assert_allclose(np.asarray(img), traj.change)


def test_zoo_training_keeps_checkpoints_every_n_steps(tmp_path, capsys):
    from connectome.cli import main
    from connectome.zoo import SHAPE_CLASSES
    from connectome.zoo.train import train_model

    n_per_class = 64 // len(SHAPE_CLASSES) + 1  # two optimizer steps per epoch
    model, _ = train_model("simplecnn_a", epochs=2, n_per_class=n_per_class, progress=False, save_every=3,
                           checkpoint_dir=tmp_path / "ck")
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step_000000.pt", "step_000003.pt", "step_000004.pt"]  # initial, every 3, final
    final = torch.load(tmp_path / "ck" / "step_000004.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v)
    gs = cn.extract.over_training(model, tmp_path / "ck", input_shape=(3, 32, 32))
    assert [g.meta["step"] for g in gs] == [0, 3, 4]
    assert not np.array_equal(gs[0].weight, gs[-1].weight)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_model("simplecnn_a", epochs=1, n_per_class=1, progress=False, save_every=1)
    assert main(["zoo", "train", "--save-every", "0", "--out", str(tmp_path / "w")]) == 2
    assert "--save-every must be" in capsys.readouterr().err


def test_report_section_names_when_each_circuit_formed():
    from connectome.viz.report import Report, trajectory_section

    cat, dog = toy_attribution("cat"), toy_attribution("dog")
    gs = [g.with_meta(step=s) for g, s in zip(same_topology([dog, cat, cat]), (0, 5, 10))]
    rep = Report("r")
    trajectory_section(rep, analysis.trajectory(gs, categories=["cat", "dog"]))
    html = rep.to_html()
    assert 'data-file="trajectory.png"' in html and "circuit formed at step" in html
    assert "<td>cat</td><td class=\"num\">5</td>" in html.replace("\n", "")


def test_cli_trajectory_reads_a_checkpoint_folder(tmp_path, capsys):
    import json

    from connectome.cli import main
    from connectome.zoo import build_model

    m = build_model("simplecnn_a")
    s0 = {k: v.clone() for k, v in m.state_dict().items()}
    for step in (0, 50):
        torch.save(s0, tmp_path / f"step_{step:06d}.pt")
    out = tmp_path / "t.json"
    assert main(["trajectory", "zoo:simplecnn_a", str(tmp_path), "--out", str(out), "--plot",
                 str(tmp_path / "t.png")]) == 0
    d = json.loads(out.read_text())
    assert d["steps"] == [0, 50] and d["nmi"] == [1.0]
    assert all(j == [1.0, 1.0] for j in d["jaccard"].values()) and "circle" in d["jaccard"]
    assert main(["trajectory", "zoo:simplecnn_a", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_persistent_hubs_are_the_hidden_units_strongest_at_every_step():
    cat = toy_attribution("cat")
    w = cat.weight.copy()
    gs = [cat.with_meta(step=0), cat.with_weight(w * 2).with_meta(step=1)]
    traj = analysis.trajectory(gs, categories=["cat"], top=2)
    s = analysis.strength(cat)
    hidden = [i for i, n in enumerate(cat.node_ids) if n.startswith("h")]
    best = sorted(hidden, key=lambda i: (-s[i], i))[:2]
    assert traj.hubs == [cat.node_ids[i] for i in best]
    assert set(traj.hub_presence.values()) == {1.0}
