"""The README's Python tour, run as written on a small model: every line works.

``benchmarks/bench_tour.py`` runs the same block on ResNet-50 and times it; here the
model line builds a small residual CNN instead, and the names the tour leaves to the reader
(``images/``, ``model_a``, ``model_b``, ``probe_images``, ``images``, ``labels``) are
provided the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_LINE = "torchvision.models.resnet50(weights=None)"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tour", ROOT / "benchmarks" / "bench_tour.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def small_model(seed: int = 0):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + x)

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 12, 7, stride=8, padding=3)
            self.layer1 = Block(12)
            self.conv2 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
            self.layer2 = Block(16)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.layer2(torch.relu(self.conv2(self.layer1(torch.relu(self.conv1(x))))))
            return self.fc(torch.flatten(self.pool(x), 1))

    torch.manual_seed(seed)
    return Small().eval()


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    import torch

    bench = _bench()
    source = bench.tour_source()
    assert MODEL_LINE in source, "the README tour's model line changed; update this test and bench_tour.py"
    steps = bench.tour_steps(source.replace(MODEL_LINE, "small_model()"))
    workdir = tmp_path_factory.mktemp("tour")
    bench.make_images(workdir / "images", 3, size=64)
    from connectome.extract.data import default_transform

    import torchvision

    ds = torchvision.datasets.ImageFolder(str(workdir / "images"), transform=default_transform(64))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    ns = {"__name__": "__tour__", "small_model": small_model, "model_a": small_model(1), "model_b": small_model(2),
          "probe_images": xs, "images": xs[ys == 0], "labels": ys[ys == 0]}
    cwd = Path.cwd()
    import os

    os.chdir(workdir)
    try:
        rows = bench.run_steps(steps, ns, echo=False)
    finally:
        os.chdir(cwd)
    return steps, rows, ns, workdir


def test_every_line_of_the_tour_runs(tour):
    steps, rows, _, _ = tour
    failed = [r for r in rows if r["status"] != "ok"]
    assert not failed, failed
    assert len(rows) == len(steps)


def test_the_tour_computes_what_it_says(tour):
    _, _, ns, workdir = tour
    g, c, circ = ns["g"], ns["c"], ns["circ"]
    assert set(c) == {"strength", "pagerank", "betweenness", "flow"} and c.betweenness_samples is None
    assert circ.meta["circuit"]["max_units"] == 150 and circ.num_nodes <= 150
    import connectome as cn

    weights = cn.load(workdir / "resnet50.npz")  # the tour's weight graph, as it saved it
    assert all(d["weight"] >= 0 for _, _, d in ns["nxg"].edges(data=True))
    assert ns["nxg"].number_of_edges() == weights.prune(top_k=8).num_edges
    assert ns["igg"].ecount() == weights.num_edges
    assert len(ns["hits"]) >= 1, "the README promises placements of the skeleton"
    assert ns["cmp"].summary["nmi"] is not None
    for name in ("resnet50.npz", "resnet50.graphml", "tabby.gexf"):
        assert (workdir / name).stat().st_size > 0
    assert np.isfinite(ns["fid"].circuit_drop)
    assert "community" in ns["g2"].node_attrs


def test_gephi_file_of_the_tour_reads_back_as_written(tour):
    _, _, ns, workdir = tour

    import connectome as cn

    pruned = cn.load(workdir / "resnet50.npz").prune(top_k=8)
    back = ns["g3"]
    assert back.layer_names == pruned.layer_names
    assert back.node_ids.tolist() == pruned.node_ids.tolist()
    np.testing.assert_allclose(back.weight, pruned.weight, rtol=1e-6)
