"""compare_categories of a store, streamed over windows of edges, against the same numbers
computed independently from the graphs in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("zarr")

import connectome as cn  # noqa: E402
from connectome.analysis.categories import StoreComparison  # noqa: E402
from connectome.errors import BadFileError  # noqa: E402

N_CAT = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, N_CAT)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(3 * N_CAT, 3, 8, 8, generator=g), torch.arange(N_CAT).repeat_interleave(3)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict[str, cn.Connectome]]:
    path = tmp_path_factory.mktemp("cmp") / "s"
    cn.extract.attribution_by_category(_model(), _data(), out=path, progress=False, device="cpu")
    graphs = cn.extract.attribution_by_category(_model(), _data(), progress=False, device="cpu")
    return path, graphs


def _corr(X: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(X)


def test_flow_correlation_streamed_in_small_windows_equals_corrcoef(made):
    path, graphs = made
    store = cn.load(path)
    r = cn.analysis.compare_categories(store, window=10)  # windows of 10 edges
    assert isinstance(r, StoreComparison) and r.classes == tuple(graphs)
    g0 = next(iter(graphs.values()))
    assert g0.num_edges > 5 * 10 and g0.num_edges % 10  # several windows, some across layer boundaries
    layer_of_dst = g0.node_layer[g0.dst]
    for li, layer in enumerate(g0.layers):
        into = layer_of_dst == li
        if not into.any():
            assert layer.name not in r.flow
            continue
        X = np.vstack([store[c].weight[into].astype(np.float64) for c in graphs])
        np.testing.assert_allclose(r.flow[layer.name], _corr(X), atol=1e-5)


def test_node_correlation_equals_the_in_memory_comparison(made):
    path, graphs = made
    r = cn.analysis.compare_categories(cn.load(path), "activation_mean")
    ref = cn.analysis.compare_categories(graphs, "activation_mean")
    assert r.attr == "activation_mean"
    for layer in ref:
        np.testing.assert_allclose(r.node[layer], ref[layer][1], atol=1e-9, equal_nan=True)


def test_circuit_overlap_clustering_and_sharing_from_the_circuits(made):
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    path, graphs = made
    r = cn.analysis.compare_categories(cn.load(path))
    circuits = {c: set(cn.analysis.circuit(g, mass=0.8).node_ids.tolist()) for c, g in graphs.items()}
    names = list(graphs)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            expect = len(circuits[a] & circuits[b]) / len(circuits[a] | circuits[b])
            assert r.jaccard[i, j] == pytest.approx(expect)
    assert 0 < np.nanmin(r.jaccard) and np.allclose(np.diag(r.jaccard), 1.0)
    d = 1 - r.jaccard
    np.testing.assert_allclose(r.linkage, linkage(squareform(d, checks=False), method="average"))
    counts = {nid: sum(nid in c for c in circuits.values()) for nid in next(iter(graphs.values())).node_ids}
    assert dict(zip(r.node_ids.tolist(), r.sharing.tolist())) == counts
    need = int(np.ceil(0.5 * N_CAT))
    gen = [n for ids in r.generalists().values() for n in ids]
    spec = [n for ids in r.specialists().values() for n in ids]
    assert sorted(gen) == sorted(n for n, k in counts.items() if k >= need)
    assert sorted(spec) == sorted(n for n, k in counts.items() if k == 1)
    assert set(r.clusters(2).values()) <= {0, 1} and len(r.clusters(2)) == N_CAT
    assert "circuit overlap" in repr(r) and r.to_dict()["classes"] == names


def test_figures(made, tmp_path):
    from connectome.viz._mpl import pyplot

    r = cn.analysis.compare_categories(cn.load(made[0]))
    ax = r.plot_dendrogram()
    assert len(ax.get_xticklabels()) == N_CAT
    ax2 = r.plot_sharing()
    assert sum(p.get_height() for p in ax2.patches) == int((r.sharing > 0).sum())
    pyplot().close("all")


def test_a_damaged_flow_chunk_names_the_category(made, tmp_path):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(made[0], path)
    store = cn.load(path)
    f = path / "edge" / "weight" / "c" / str(store.entry("3")["row"]) / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BadFileError, match="category '3', column edge/weight is damaged"):
        cn.analysis.compare_categories(cn.load(path))


def test_the_store_as_a_dask_array(made):
    pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    path, graphs = made
    store = cn.load(path)
    with distributed.Client(distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)):
        X = store.dask().compute()
    np.testing.assert_array_equal(X, np.vstack([store[c].weight for c in graphs]))


def test_compare_on_a_dask_cluster_equals_the_streamed_comparison(made):
    pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    store = cn.load(made[0])
    local = cn.analysis.compare_categories(store, window=10)
    with distributed.Client(distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)):
        r = cn.analysis.compare_categories(store, use_dask=True)
    assert r.classes == local.classes and set(r.flow) == set(local.flow)
    for name in local.flow:  # float64 products on the cluster, float32 products of windows here
        np.testing.assert_allclose(r.flow[name], local.flow[name], atol=1e-5)
    for name in local.node:
        np.testing.assert_array_equal(r.node[name], local.node[name])
    np.testing.assert_array_equal(r.jaccard, local.jaccard)
    np.testing.assert_array_equal(r.sharing, local.sharing)


@pytest.mark.parametrize("how", ["damaged", "missing"])
def test_a_damaged_or_missing_flow_chunk_on_dask_names_the_category(made, tmp_path, how):
    import shutil

    pytest.importorskip("dask")
    path = tmp_path / "s"
    shutil.copytree(made[0], path)
    f = path / "edge" / "weight" / "c" / str(cn.load(path).entry("3")["row"]) / "0"
    if how == "missing":
        f.unlink()
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(BadFileError, match="category '3', column edge/weight is damaged"):
        cn.analysis.compare_categories(cn.load(path), use_dask=True)


def test_a_store_without_circuits_has_no_overlaps(tmp_path):
    path = tmp_path / "s"
    cn.extract.attribution_by_category(_model(), _data(), out=path, progress=False, device="cpu", circuits=False)
    r = cn.analysis.compare_categories(cn.load(path))
    assert np.isnan(r.jaccard).all() and r.linkage is None and not r.sharing.any()
    assert r.flow  # the flow correlations do not need circuits


def test_pearson_from_the_gram_matrix_is_corrcoef_and_nan_for_a_constant_category():
    from connectome.analysis.categories import _pearson

    X = np.random.default_rng(0).normal(size=(4, 50))
    X[2] = 3.0  # no spread: its correlations are undefined
    C = _pearson(X @ X.T, X.sum(axis=1), X.shape[1])
    ok = np.ix_([0, 1, 3], [0, 1, 3])
    np.testing.assert_allclose(C[ok], _corr(X)[ok], atol=1e-12)
    assert np.isnan(C[2]).all() and np.isnan(C[:, 2]).all()
    assert (np.diag(C[ok]) == 1.0).all() and (C == C.T)[ok].all() and not C.flags.writeable
