"""Distributed (torch.distributed, gloo on CPU) and resumable attribution runs.

Several processes must give the graph of one process (float64, rtol 1e-10: only the order
of the final sums differs); a run killed and resumed must give exactly the graph of an
uninterrupted one; checkpoints of other arguments and damaged ones are refused.
"""

from __future__ import annotations

import collections

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import Dataset

import connectome as cn
from connectome.errors import BadFileError, ConnectomeError
from connectome.extract.distributed import ShardSampler, SkippedNames, _payload_checksum, category_folder
from connectome.extract.flow import attribution, attribution_by_category

N_IMAGES = 7  # divides by neither 2 nor 3 processes
BATCH = 2


class Tiny(nn.Module):
    """conv-BN-ReLU, a residual conv, max pooling, linear: every kind of edge, piecewise linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(h + self.conv2(h))
        return self.fc(torch.flatten(self.pool(h), 1))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny().double().eval()
    with torch.no_grad():
        m.bn1.running_mean.normal_()
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def _data(n: int = N_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3  # classes of 3, 2 and 2 images
    return x, y


class Recorded(Dataset):
    """(image, label) pairs that remember which indices were read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.read = x, y, []
        self.targets = y.tolist()  # labels without reading images

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.read.append(int(i))
        return self.x[i], self.y[i]


class Stop(Exception):
    """Stands for a killed process."""


def _stop_after(k: int, rank: int | None = None):
    calls = {"n": 0}

    def hook(batch_index: int) -> None:
        calls["n"] += 1
        if calls["n"] == k + 1 and (rank is None or dist.get_rank() == rank):
            raise Stop(f"stopped after batch {batch_index}")

    return hook


def _run(data, **kw):
    return attribution(_model(), data, batch_size=BATCH, device="cpu", progress=False, **kw)


def _assert_same(a: cn.Connectome, b: cn.Connectome, rtol: float | None = 1e-10) -> None:
    """Edges and every node attribute equal; exactly when ``rtol`` is None."""
    check = np.testing.assert_array_equal if rtol is None else (
        lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-12))  # float64 sums, other order
    assert list(a.node_ids) == list(b.node_ids)
    np.testing.assert_array_equal(a.src, b.src)
    np.testing.assert_array_equal(a.dst, b.dst)
    check(a.weight, b.weight)
    assert sorted(a.node_attrs) == sorted(b.node_attrs)
    for k in a.node_attrs:
        check(a.node_attrs[k], b.node_attrs[k])
    for k in ("n_images", "target_total"):
        if rtol is None:
            assert a.meta[k] == b.meta[k]
        else:
            assert a.meta[k] == pytest.approx(b.meta[k], rel=1e-10)


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n, world", [(7, 3), (7, 2), (2, 3), (0, 2), (12, 4)])
def test_shards_cover_every_index_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # no padding, nothing dropped
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sampler_starts_after_done_indices():
    assert list(ShardSampler(10, 1, 3, start=2)) == [7]
    assert list(ShardSampler(10, 1, 3, start=5)) == []


def test_skipped_names_are_capped_but_counted():
    s = SkippedNames(cap=3)
    s.extend([f"f{i}.jpg" for i in range(5)])
    s.extend(["g.jpg"])
    assert len(s) == 6 and list(s) == ["f0.jpg", "f1.jpg", "f2.jpg"]


# ----------------------------------------------------------------------------- several processes
def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out_dir = Path(out)
        x, y = _data()
        ds = Recorded(x, y)
        _run(ds, per_sample=True, examples=3).save(out_dir / f"flat{rank}.npz")  # top-k merged across ranks
        np.save(out_dir / f"read{rank}.npy", np.array(ds.read, dtype=np.int64))
        graphs = attribution_by_category(_model(), (x, y), batch_size=BATCH, device="cpu", progress=False)
        for name, g in graphs.items():
            g.save(out_dir / f"cat{name}_{rank}.npz")
        # Process 0 is killed after its first batch: every process must stop (none hangs) ...
        ck = out_dir / "ck"
        with pytest.raises((Stop, ConnectomeError)):
            _run(Recorded(x, y), per_sample=True, checkpoint=ck, checkpoint_every=1, _batch_hook=_stop_after(0, rank=0),
                 examples=3)
        # ... and the same command again finishes the job.
        _run(Recorded(x, y), per_sample=True, checkpoint=ck, checkpoint_every=1, examples=3).save(
            out_dir / f"resumed{rank}.npz")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_processes_give_the_graph_of_one_process(world, tmp_path, free_port):
    mp.spawn(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    x, y = _data()
    single = _run((x, y), per_sample=True, examples=3)
    flats = [cn.load(tmp_path / f"flat{r}.npz") for r in range(world)]
    for g in flats:
        _assert_same(g, single)
        assert g.meta["world_size"] == world
        np.testing.assert_array_equal(g.node_attrs["attribution"], flats[0].node_attrs["attribution"])
    reads = np.concatenate([np.load(tmp_path / f"read{r}.npy") for r in range(world)])
    assert sorted(reads.tolist()) == list(range(N_IMAGES))  # every image read once, by one process

    ref = attribution_by_category(_model(), (x, y), batch_size=BATCH, device="cpu", progress=False)
    for name, g in ref.items():
        for r in range(world):
            got = cn.load(tmp_path / f"cat{name}_{r}.npz")
            _assert_same(got, g)
            assert got.meta["category"] == name

    for r in range(world):  # killed and resumed == uninterrupted, with the same processes
        _assert_same(cn.load(tmp_path / f"resumed{r}.npz"), flats[r], rtol=None)
    assert sorted(os.listdir(tmp_path / "ck")) == [f"rank{r}.pt" for r in range(world)]


# ----------------------------------------------------------------------------- kill and resume
@pytest.mark.parametrize("stop, every", [(0, 1), (0, 2), (2, 2), (1, 1), (3, 1)])  # 4 batches: 3 is the last
def test_killed_run_resumes_to_the_exact_result(stop, every, tmp_path):
    data = _data()
    full = _run(data, per_sample=True)
    with pytest.raises(Stop):
        _run(data, per_sample=True, checkpoint=tmp_path, checkpoint_every=every, _batch_hook=_stop_after(stop))
    resumed = _run(data, per_sample=True, checkpoint=tmp_path, checkpoint_every=every)
    _assert_same(resumed, full, rtol=None)
    payload = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert payload["complete"] and payload["batches_done"] == 4
    _assert_same(_run(data, per_sample=True, checkpoint=tmp_path), full, rtol=None)  # complete: no batch read


def test_killed_run_by_category_resumes(tmp_path):
    x, y = _data()
    kw = dict(batch_size=BATCH, device="cpu", progress=False)
    full = attribution_by_category(_model(), (x, y), **kw)
    with pytest.raises(Stop):  # category 0 has 2 batches: stop in category 1
        attribution_by_category(_model(), Recorded(x, y), checkpoint=tmp_path, checkpoint_every=1,
                                _batch_hook=_stop_after(2), **kw)
    assert sorted(os.listdir(tmp_path)) == [category_folder(0, "0"), category_folder(1, "1")]
    ds = Recorded(x, y)
    resumed = attribution_by_category(_model(), ds, checkpoint=tmp_path, checkpoint_every=1, **kw)
    # The finished categories' batches are not read again: of their items only the (at most 3)
    # probes that fingerprint the data are; category 2 is computed.
    labels = y.tolist()
    reads = collections.Counter(ds.read)
    for c in (0, 1):
        assert sum(reads[i] for i, t in enumerate(labels) if t == c) <= 3
    assert all(reads[i] >= 1 for i, t in enumerate(labels) if t == 2)
    assert list(resumed) == list(full)
    for name in full:
        _assert_same(resumed[name], full[name], rtol=None)


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def finished(tmp_path):
    _run(_data(), checkpoint=tmp_path, checkpoint_every=1)
    return tmp_path


def _other_weights() -> nn.Module:
    m = _model()
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] += 1e-3
    return m


@pytest.mark.parametrize("change, what", [
    (dict(target=1), "target"),
    (dict(batch_size=3), "batch size"),
    (dict(per_sample=True), "per_sample"),
    (dict(model=_other_weights()), "model weights"),
    (dict(data=_data(6)), "number of images"),
])
def test_checkpoint_of_other_arguments_is_refused(finished, change, what):
    kw = dict(model=_model(), data=_data(), batch_size=BATCH, device="cpu", progress=False, checkpoint=finished)
    kw.update(change)
    with pytest.raises(ConnectomeError, match=what) as info:
        attribution(kw.pop("model"), kw.pop("data"), **kw)
    assert "rank0.pt" in str(info.value) and "different arguments" in str(info.value)


def test_checkpoint_of_another_world_size_is_refused(finished):
    path = finished / "rank0.pt"
    payload = torch.load(path, weights_only=True)
    payload["fingerprint"]["world_size"] = 4
    payload["checksum"] = _payload_checksum(payload)  # a sound checkpoint, of another run
    torch.save(payload, path)
    with pytest.raises(ConnectomeError, match="number of processes"):
        _run(_data(), checkpoint=finished)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_checkpoint_is_refused(finished, damage):
    path = finished / "rank0.pt"
    raw = path.read_bytes()
    path.write_bytes(b"not a checkpoint" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(BadFileError, match="corrupted"):
        _run(_data(), checkpoint=finished)


def test_checkpoint_from_another_file_kind_is_refused(finished):
    torch.save({"weights": torch.zeros(3)}, finished / "rank0.pt")
    with pytest.raises(BadFileError, match="not a connectome attribution checkpoint"):
        _run(_data(), checkpoint=finished)


# ----------------------------------------------------------------------------- command line
def test_cli_under_torchrun_matches_one_process(tmp_path, free_port):
    from connectome.cli import main

    args = ["extract", "--layout", "npz", "zoo:simplecnn_a", "zoo:shapes:2", "--device", "cpu", "--quiet", "--batch-size", "3"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port),
           "-m", "connectome", *args, "--out", str(tmp_path / "two"), "--checkpoint", str(tmp_path / "ck")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("completeness residual") == 9  # printed by rank 0 only
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == one
    for name in one:
        if name.endswith(".npz"):  # float32 model: batches of other images round differently
            a, b = cn.load(tmp_path / "two" / name), cn.load(tmp_path / "one" / name)
            assert a.meta["n_images"] == b.meta["n_images"] == 2
            np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5 * np.abs(b.weight).max())
