"""The category store: one folder per run, topology once, each category written as it finishes,
read back lazily and exactly (float32 rounding), resumed after a kill, damage named."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("zarr")

import connectome as cn  # noqa: E402
from connectome.cli import main  # noqa: E402
from connectome.errors import BadFileError, ConnectomeError  # noqa: E402
from connectome.store import CategoryStore, FolderOfGraphs, StoreWriter  # noqa: E402

N_CAT = 4


def _model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, N_CAT)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * N_CAT, 3, 8, 8, generator=g)
    return x, torch.arange(N_CAT).repeat_interleave(2)


def _store(path: Path, **kw) -> CategoryStore:
    return cn.extract.attribution_by_category(_model(), _data(), out=path, progress=False, device="cpu", **kw)


def _same_but_rounding(stored: cn.Connectome, g: cn.Connectome, dtype=np.float32) -> None:
    assert stored.layers == g.layers
    np.testing.assert_array_equal(stored.src, g.src)
    np.testing.assert_array_equal(stored.dst, g.dst)
    assert stored.weight.dtype == dtype
    np.testing.assert_array_equal(stored.weight, g.weight.astype(dtype))  # exactly the rounded sums
    assert set(stored.edge_attrs) == set(g.edge_attrs) and set(stored.node_attrs) == set(g.node_attrs)
    for k, v in g.edge_attrs.items():
        np.testing.assert_array_equal(stored.edge_attrs[k], v.astype(dtype))
    for k, v in g.node_attrs.items():
        np.testing.assert_array_equal(stored.node_attrs[k], v)  # node columns keep their dtype
        assert stored.node_attrs[k].dtype == v.dtype
    skip = {"seconds", "store"}
    assert {k: v for k, v in stored.meta.items() if k not in skip} == {k: v for k, v in g.meta.items() if k not in skip}


def test_a_category_read_back_equals_the_category_computed_alone(tmp_path):
    store = _store(tmp_path / "s", per_sample=True)
    assert isinstance(store, CategoryStore) and list(store) == [str(i) for i in range(N_CAT)]
    x, y = _data()
    for c in range(N_CAT):
        alone = cn.extract.attribution(_model(), (x[y == c], y[y == c]), progress=False, device="cpu",
                                       per_sample=True, category=str(c))
        _same_but_rounding(store[str(c)], alone.with_meta(target_class=c))  # the label a category run knows
    assert store["0"].meta["store"]["dtype"] == "float32" and "2**-24" in store["0"].meta["store"]["rounding"]


def test_float64_on_request_is_exact(tmp_path):
    store = _store(tmp_path / "s", dtype="float64")
    ref = cn.extract.attribution_by_category(_model(), _data(), progress=False, device="cpu")
    for c, g in ref.items():
        _same_but_rounding(store[c], g, dtype=np.float64)
    assert store["1"].meta["store"]["dtype"] == "float64"


def test_categories_share_the_topology_arrays(tmp_path):
    store = _store(tmp_path / "s")
    a, b = store["0"], store["3"]
    assert a.src is b.src and a.dst is b.dst and a.node_units is b.node_units  # read once, not copied
    assert not a.weight.flags.writeable


def test_opening_reads_no_column(tmp_path):
    import shutil

    _store(tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "edge")  # every flow column gone: opening and listing never notice
    store = cn.load(tmp_path / "s")
    assert isinstance(store, CategoryStore) and len(store) == N_CAT and "2" in store
    assert store.entry("2")["n_images"] == 2
    with pytest.raises(BadFileError, match="no column 'edge/weight'"):
        store["2"]


def test_reading_a_block_of_rows_equals_zarr_whole_and_partial_chunks_missing_and_damaged(tmp_path, monkeypatch):
    import zlib

    import connectome.store as store_mod

    monkeypatch.setattr(store_mod, "EDGE_CHUNK", 5)  # many small chunks, the last one partial
    store = _store(tmp_path / "s")
    arr = store.array("edge", "weight")
    n = arr.shape[1]
    assert arr.chunks == (1, 5) and n % 5 and n > 20
    rows = store.rows(["3", "0", "2"])  # any order, not consecutive
    full = np.asarray(arr[:])[rows]
    for a, b in [(0, n), (0, 5), (5, 15), (3, 11), (5, 6), (n - n % 5, n), (n - 2, n), (10, 10)]:
        np.testing.assert_array_equal(store.block("edge", "weight", rows, a, b), full[:, a:b])
    crc = [0] * rows.size
    for a, b in [(0, 12), (12, 13), (13, n)]:  # consecutive ranges: the CRC-32 of whole rows
        store.block("edge", "weight", rows, a, b, crc=crc)
    assert crc == [zlib.crc32(np.ascontiguousarray(r)) for r in full]
    node = np.asarray(store.array("node", "attribution")[:])[rows]
    np.testing.assert_array_equal(store.block("node", "attribution", rows), node)
    (tmp_path / "s" / "edge" / "weight" / "c" / str(rows[1]) / "1").unlink()  # a missing chunk: NaN, as zarr reads it
    got = store.block("edge", "weight", rows, 0, n)
    np.testing.assert_array_equal(got, np.asarray(CategoryStore(tmp_path / "s").array("edge", "weight")[:])[rows])
    assert np.isnan(got[1, 5:10]).all() and not np.isnan(got[0]).any()
    _damage(tmp_path / "s" / "edge" / "weight" / "c" / str(rows[2]) / "2")
    with pytest.raises(RuntimeError):  # zstd's frame checksum
        store.block("edge", "weight", rows, 0, n)


def _chunk_files(root: Path) -> dict[str, bytes]:
    """Every array chunk of a store (not the meta files, which hold the time taken)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(root)}"}


def test_a_run_killed_between_categories_resumes_bit_identical(tmp_path, monkeypatch):
    import connectome.extract.flow as flow

    whole = _store(tmp_path / "whole")
    real = flow._attribution

    def killed_at_2(*a, **k):
        if k.get("category") == "2":
            raise KeyboardInterrupt  # the run stops between categories 1 and 2
        return real(*a, **k)

    monkeypatch.setattr(flow, "_attribution", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        _store(tmp_path / "resumed")
    assert list(cn.load(tmp_path / "resumed")) == ["0", "1"]  # written as they finished
    computed = []
    monkeypatch.setattr(flow, "_attribution", lambda *a, **k: computed.append(k["category"]) or real(*a, **k))
    resumed = _store(tmp_path / "resumed")
    assert computed == ["2", "3"]  # resumed at the first unfinished category
    assert list(resumed) == list(whole)
    chunks = _chunk_files(tmp_path / "whole")
    assert chunks and _chunk_files(tmp_path / "resumed") == chunks  # bit-identical arrays
    for c in whole:
        assert resumed[c].equals(whole[c].with_meta(seconds=resumed[c].meta["seconds"]))


def test_a_full_disk_leaves_the_completed_categories_readable(tmp_path, monkeypatch):
    calls = []
    real = StoreWriter.write

    def disk_full_on_third(self, name, g, circuit=None, row=None):
        calls.append(name)
        if len(calls) == 3:
            self._array("edge", "weight", g.num_edges, self.dtype)[self._rows] = g.weight.astype(self.dtype)
            raise OSError(errno.ENOSPC, "No space left on device")  # after part of its columns
        return real(self, name, g, circuit, row)

    monkeypatch.setattr(StoreWriter, "write", disk_full_on_third)
    with pytest.raises(OSError, match="No space"):
        _store(tmp_path / "s")
    store = cn.load(tmp_path / "s")
    assert list(store) == ["0", "1"]
    assert store["1"].meta["category"] == "1"


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_column_names_the_category(tmp_path):
    store = _store(tmp_path / "s")
    row = store.entry("2")["row"]
    _damage(tmp_path / "s" / "edge" / "weight" / "c" / str(row) / "0")
    store = cn.load(tmp_path / "s")
    with pytest.raises(BadFileError, match="category '2', column edge/weight is damaged"):
        store["2"]
    assert store["1"].meta["category"] == "1"  # the others are unharmed


def test_a_missing_chunk_names_the_category(tmp_path):
    store = _store(tmp_path / "s")
    (tmp_path / "s" / "node" / "attribution" / "c" / str(store.entry("3")["row"]) / "0").unlink()
    with pytest.raises(BadFileError, match="category '3', column node/attribution is damaged"):
        cn.load(tmp_path / "s")["3"]


@pytest.mark.parametrize("change, match", [
    ({"version": 99}, "newer connectome"),
    ({"format": "something-else"}, "not a connectome category store"),
    ({"dtype": "int8"}, "flow dtype"),
])
def test_a_store_of_another_format_is_one_bad_file_error(tmp_path, change, match):
    _store(tmp_path / "s")
    meta = tmp_path / "s" / "zarr.json"
    z = json.loads(meta.read_text())
    z["attributes"]["connectome_store"].update(change)
    meta.write_text(json.dumps(z))
    with pytest.raises(BadFileError, match=match):
        cn.load(tmp_path / "s")
    with pytest.raises(BadFileError, match=match):
        _store(tmp_path / "s")  # nor is it written into


def test_a_damaged_manifest_is_one_bad_file_error(tmp_path):
    _store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"categories": {"a": {"row": "x"}}}')
    with pytest.raises(BadFileError, match="manifest.json is damaged"):
        cn.load(tmp_path / "s")


def test_a_store_of_another_model_is_refused(tmp_path):
    _store(tmp_path / "s", name="net", categories=["0", "1"])
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    with pytest.raises(ConnectomeError, match="holds graphs of another run"):
        _store(tmp_path / "s", name="other")
    # the same name but other layers: the topology tells
    with pytest.raises(ConnectomeError, match="other layers or edges"):
        cn.extract.attribution_by_category(_model(width=5), _data(), out=tmp_path / "s", progress=False,
                                           device="cpu", name="net", categories=["3"])
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    with pytest.raises(ConnectomeError, match="stores flows as float32"):
        _store(tmp_path / "s", name="net", dtype="float64")


def test_a_folder_holding_other_files_is_not_written_into(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(ConnectomeError, match="not empty and not a category store"):
        _store(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "graphs"
    assert main(["extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "circle,ring,square"]) == 0
    return out


def test_cli_extract_writes_a_store_and_a_rerun_continues_it(cli_store, tmp_path, capsys):
    store = cn.load(cli_store)
    assert isinstance(store, CategoryStore) and list(store) == ["circle", "ring", "square"]
    assert not list(cli_store.glob("*.npz")) and not (cli_store / "extract.lock").exists()
    out = tmp_path / "g"
    assert main(["extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "circle", "--dtype", "float64"]) == 0
    capsys.readouterr()
    assert main(["extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "circle,ring", "--dtype", "float64"]) == 0
    err = capsys.readouterr().err
    assert "resuming: 1 categories already" in err and "wrote 1 categories" in err
    again = cn.load(out)
    assert list(again) == ["circle", "ring"] and again["ring"].weight.dtype == np.float64
    np.testing.assert_array_equal(again["ring"].weight.astype(np.float32), store["ring"].weight)


def test_cli_commands_take_folder_colon_category(cli_store, tmp_path, capsys):
    assert main(["report", f"{cli_store}:ring", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["circuit"]["units"] > 1
    assert main(["compare", f"{cli_store}:ring", f"{cli_store}:circle", "--json"]) == 0
    capsys.readouterr()
    assert main(["export", f"{cli_store}:square", "--out", str(tmp_path / "sq.gexf")]) == 0
    assert "square" in (tmp_path / "sq.gexf").read_text()
    assert main(["view", str(cli_store), "--out", str(tmp_path / "v.html")]) == 0
    assert all(c in (tmp_path / "v.html").read_text() for c in ("circle", "ring", "square"))
    capsys.readouterr()
    assert main(["report", f"{cli_store}:rng"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no category 'rng'" in err and "ring" in err, err
    assert main(["report", str(cli_store)]) == 2
    assert f"{cli_store}:circle" in capsys.readouterr().err


def test_an_older_npz_folder_still_opens(tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["extract", "--layout", "npz", "zoo:simplecnn_a", "zoo:shapes:1", "--out", str(out), "--quiet",
                 "--device", "cpu", "--categories", "circle,ring"]) == 0
    folder = cn.load(out)
    assert isinstance(folder, FolderOfGraphs) and list(folder) == ["circle", "ring"]
    assert folder["ring"].equals(cn.load(out / "ring.npz"))
    assert main(["report", f"{out}:ring", "--json"]) == 0
    with pytest.raises(ConnectomeError, match="older connectome"):  # never mixed with a store
        cn.extract.attribution_by_category(_model(), _data(), out=out, progress=False, device="cpu")


def test_cli_under_torchrun_writes_the_store_of_one_process(tmp_path):
    """Fewer categories than processes: the two split each category's images and process 0 writes; a
    rerun under torchrun learns from process 0 which categories are done (and splits the other 8)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["extract", "zoo:simplecnn_a", "zoo:shapes:2", "--device", "cpu", "--quiet", "--batch-size", "1"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "connectome", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run([*cmd, "--categories", "circle"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("completeness residual") == 1  # printed by process 0 only
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)  # continues the store
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("completeness residual") == 8  # the 8 missing categories, each once
    one, two = cn.load(tmp_path / "one"), cn.load(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 9
    for c in one:
        a, b = one[c], two[c]
        assert a.meta["n_images"] == b.meta["n_images"] == 2
        np.testing.assert_allclose(b.weight, a.weight, rtol=1e-4, atol=1e-5 * np.abs(a.weight).max())


def test_cli_killed_with_sigkill_between_categories_resumes_bit_identical(tmp_path, cli_store):
    """kill -9 once the store lists a category; the same command continues and the arrays equal an
    uninterrupted run's (cli_store: the same categories in one go)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "connectome", "extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out),
           "--quiet", "--device", "cpu", "--categories", "circle,ring,square"]
    env = {**os.environ, "PYTHONPATH": str(Path(cn.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        m = out / "manifest.json"
        if m.is_file() and json.loads(m.read_text())["categories"]:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    if p.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert p.returncode == -signal.SIGKILL
    listed = list(cn.load(out))
    assert 1 <= len(listed) < 3  # stopped between categories, the finished ones listed
    assert main(["extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "circle,ring,square"]) == 0  # the stale lock of the dead process is taken over
    assert list(cn.load(out)) == list(cn.load(cli_store))
    assert _chunk_files(out) == _chunk_files(cli_store)


def test_the_two_layouts_never_mix_in_one_folder(cli_store, tmp_path, capsys):
    before = (cli_store / "manifest.json").read_bytes()
    assert main(["extract", "--layout", "npz", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(cli_store), "--quiet",
                 "--device", "cpu", "--categories", "circle"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a category store" in err, err
    assert not (cli_store / "index.json").exists() and (cli_store / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_splits_the_categories_and_equals_one_process_bit_for_bit(tmp_path, world, cli_store):
    """At least as many categories as processes: each process computes its own categories with all their
    images (no communication per category) and writes their rows; the arrays are those of one process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(cn.__file__).resolve().parents[1])}
    out = tmp_path / "split"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(port),
           "-m", "connectome", "extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet",
           "--device", "cpu", "--categories", "circle,ring,square"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("completeness residual") == 3  # each category once, by the process that made it
    assert "wrote 3 categories" in done.stderr
    store, one = cn.load(out), cn.load(cli_store)
    assert list(store) == list(one) and not list(out.glob("manifest.rank*"))  # the parts merged
    assert _chunk_files(out) == _chunk_files(cli_store)  # bit for bit: each category computed whole
    for c in one:
        assert "world_size" not in store[c].meta and store[c].meta["n_images"] == 2


def test_manifest_parts_of_an_interrupted_split_run_are_read_and_merged(tmp_path):
    """A split run killed before process 0 merged the parts: readers see every part's categories,
    and the next run folds them into the manifest."""
    _store(tmp_path / "s", categories=["0", "1"])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    part = {"format": m["format"], "version": m["version"], "categories": {"1": m["categories"].pop("1")}}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "s" / "manifest.rank1.json").write_text(json.dumps(part))  # as process 1 left it
    assert list(cn.load(tmp_path / "s")) == ["0", "1"]
    store = _store(tmp_path / "s")  # computes 2 and 3 only, and merges
    assert list(store) == ["0", "1", "2", "3"] and not list((tmp_path / "s").glob("manifest.rank*"))
    assert list(json.loads((tmp_path / "s" / "manifest.json").read_text())["categories"]) == ["0", "1", "2", "3"]
    (tmp_path / "s" / "manifest.rank2.json").write_text(json.dumps({"categories": {"x": {"row": 0}}}))
    with pytest.raises(BadFileError, match="two categories claim one row"):
        cn.load(tmp_path / "s")
    (tmp_path / "s" / "manifest.rank2.json").write_text(json.dumps({"categories": {"x": {"row": -1}}}))
    with pytest.raises(BadFileError, match="manifest.rank2.json is damaged"):
        cn.load(tmp_path / "s")


def test_cli_compare_of_a_store_writes_the_dendrogram(cli_store, tmp_path, capsys):
    assert main(["compare", str(cli_store), "--out", str(tmp_path / "cmp")]) == 0
    assert "circuit overlap (Jaccard)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["categories.json", "dendrogram.png", "sharing.png"]
    data = json.loads((tmp_path / "cmp" / "categories.json").read_text())
    assert data["classes"] == ["circle", "ring", "square"] and len(data["jaccard"]) == 3
    assert (tmp_path / "cmp" / "dendrogram.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", f"{cli_store}:ring"]) == 2
    assert "one folder written by extract" in capsys.readouterr().err


def test_cli_compare_of_a_store_with_dask(cli_store, capsys):
    pytest.importorskip("distributed")
    assert main(["compare", str(cli_store), "--json"]) == 0
    here = json.loads(capsys.readouterr().out)
    assert main(["compare", str(cli_store), "--json", "--dask", "local"]) == 0
    there = json.loads(capsys.readouterr().out)
    assert there["classes"] == here["classes"] and there["jaccard"] == here["jaccard"]
    for name, m in here["flow"].items():
        np.testing.assert_allclose(np.array(there["flow"][name], dtype=float), np.array(m, dtype=float), atol=1e-5)
    assert main(["compare", str(cli_store), "--dask", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--dask 'tcp://127.0.0.1:9': no dask scheduler answers there" in err and err.count("\n") == 1


def test_the_stored_circuit_mask_is_the_circuit_of_each_category(tmp_path):
    from connectome.extract.flow import circuit_mask

    graphs = cn.extract.attribution_by_category(_model(8), _data(), progress=False, device="cpu")
    store = _store(tmp_path / "s")
    refs = cn.extract.attribution_by_category(_model(), _data(), progress=False, device="cpu")
    for c, g in graphs.items():
        for mass in (0.5, 0.8, 1.0):
            want = np.zeros(g.num_nodes, dtype=np.int64)
            want[g.index_of(cn.analysis.circuit(g, mass=mass).node_ids)] = 1
            np.testing.assert_array_equal(circuit_mask(g, mass), want)
        row = store.entry(c)["row"]
        stored = np.asarray(store.array("circuit", "units")[row])
        np.testing.assert_array_equal(stored, circuit_mask(refs[c]))
