"""Every plot returns a Figure that draws something, small and large graphs alike; the HTML
report embeds what it writes and writes it atomically."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from connectome import Connectome, viz  # noqa: E402
from connectome.viz.circuits import _ordered_y, _strongest  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def toy() -> Connectome:
    g = Connectome.from_edges(
        layers=[("input", "input", 3), ("h", "conv", 4), ("logits", "output", 2, ["cat", "dog"])],
        edges=[
            ("input:0", "h:0", 1.0), ("input:1", "h:1", -0.5), ("input:2", "h:3", 0.3),
            ("input:0", "h:2", 0.8), ("h:0", "logits:0", 2.0), ("h:1", "logits:1", -1.0),
            ("h:2", "logits:0", 0.4), ("h:3", "logits:1", 0.9), ("input:1", "logits:1", 0.2),
        ],
        meta={"model": "toy", "method": "attribution", "category": "cat"},
    )
    return g.with_node_attrs(
        attribution=np.array([1.0, 0.5, 0.2, 2.0, 1.0, 0.3, 0.8, 3.0, 1.5]),
        community=np.array([0, 1, 0, 0, 1, 0, 1, 0, 1]),
    )


def _random_layered(sizes, p, seed) -> Connectome:
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for li in range(len(sizes) - 1):
        i, j = np.nonzero(rng.random((sizes[li], sizes[li + 1])) < p)
        src.append(i + offsets[li])
        dst.append(j + offsets[li + 1])
    src, dst = np.concatenate(src), np.concatenate(dst)
    names = ["input"] + [f"layer{i}" for i in range(1, len(sizes) - 1)] + ["logits"]
    kinds = ["input"] + ["conv"] * (len(sizes) - 2) + ["output"]
    return Connectome(
        layers=tuple(zip(names, kinds, sizes)),
        node_units=np.concatenate([np.arange(s) for s in sizes]),
        src=src, dst=dst, weight=rng.normal(size=src.size),
        node_attrs={"attribution": rng.normal(size=int(offsets[-1])),
                    "community": rng.integers(0, 15, int(offsets[-1])).astype(float)},
    )


@pytest.fixture(scope="module")
def big() -> Connectome:
    return _random_layered([100, 200, 200, 90, 10], p=0.08, seed=1)


def _drawn(fig: Figure) -> int:
    """Number of things drawn in all axes: collections, patches, lines, images, texts."""
    return sum(len(a.collections) + len(a.patches) + len(a.lines) + len(a.images) for a in fig.axes)


def _check(fig, tmp_path, name="fig"):
    assert isinstance(fig, Figure)
    assert len(fig.axes) >= 1
    assert _drawn(fig) > 0
    out = tmp_path / f"{name}.png"
    fig.savefig(out, dpi=40)
    assert out.read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------- circuits
def test_plot_circuit_toy(toy, tmp_path):
    fig = viz.plot_circuit(toy)
    _check(fig, tmp_path)
    ax = fig.axes[0]
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lines) == 1 and len(lines[0].get_segments()) == toy.num_edges
    texts = {t.get_text() for t in ax.texts}
    assert {"cat", "dog"} <= texts  # class labels at the output
    assert [t.get_text() for t in ax.get_xticklabels()][0].startswith("input")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "community 0" in legend and "community 1" in legend
    # Output column is the right-most one.
    offsets = [c for c in ax.collections if not isinstance(c, LineCollection)][0].get_offsets()
    assert np.asarray(offsets)[-2:, 0].min() == np.asarray(offsets)[:, 0].max()


def test_plot_circuit_colours_by_kind_without_community(toy, tmp_path):
    g = Connectome(layers=toy.layers, node_units=toy.node_units, src=toy.src, dst=toy.dst, weight=toy.weight)
    fig = viz.plot_circuit(g, title="plain")
    _check(fig, tmp_path)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "conv layer" in legend and "output layer" in legend
    assert fig.axes[0].get_title().startswith("plain")


def test_plot_circuit_signs_coloured(toy):
    ax = viz.plot_circuit(toy).axes[0]
    lc = [c for c in ax.collections if isinstance(c, LineCollection)][0]
    rgb = lc.get_colors()[:, :3]
    red, blue = matplotlib.colors.to_rgb("tab:red"), matplotlib.colors.to_rgb("tab:blue")
    n_red = np.isclose(rgb, red).all(axis=1).sum()
    n_blue = np.isclose(rgb, blue).all(axis=1).sum()
    assert n_blue == int((toy.weight < 0).sum()) and n_red == int((toy.weight >= 0).sum())


def test_plot_circuit_caps_edges_on_big_graph(big, tmp_path):
    assert big.num_nodes == 600 and big.num_edges > 300
    fig = viz.plot_circuit(big)
    _check(fig, tmp_path)
    ax = fig.axes[0]
    lc = [c for c in ax.collections if isinstance(c, LineCollection)][0]
    assert len(lc.get_segments()) == 300
    assert "strongest 300" in ax.get_title()
    fig2 = viz.plot_circuit(big, max_edges=50)
    lc2 = [c for c in fig2.axes[0].collections if isinstance(c, LineCollection)][0]
    assert len(lc2.get_segments()) == 50


def test_edge_cap_is_shared_among_layer_pairs():
    # Block a->b has weights 1000x those of b->c: a global cut would show a->b only.
    g = _random_layered([20, 20, 20], p=1.0, seed=0)
    w = np.where(g.node_layer[g.src] == 0, 1000.0, 1.0) * g.weight
    g = g.with_weight(w)
    ax = viz.plot_circuit(g, max_edges=40).axes[0]
    segs = [c for c in ax.collections if isinstance(c, LineCollection)][0].get_segments()
    x0 = np.round([s_[0][0] for s_ in segs])
    assert (x0 == 0).sum() == 20 and (x0 == 1).sum() == 20
    ax = viz.plot_circuit(g, max_edges=40, edge_scale="global").axes[0]
    segs = [c for c in ax.collections if isinstance(c, LineCollection)][0].get_segments()
    assert all(round(s_[0][0]) == 0 for s_ in segs)
    with pytest.raises(ValueError):
        viz.plot_circuit(g, edge_scale="log")


def test_plot_circuit_into_given_axes(toy):
    fig, axes = plt.subplots(1, 2)
    out = viz.plot_circuit(toy, ax=axes[1], label_units=False)
    assert out is fig
    assert len(axes[1].collections) > 0 and len(axes[0].collections) == 0


def test_plot_circuit_skip_edges_and_empty_graph(tmp_path):
    g = Connectome.from_edges(
        layers=[("a", "input", 2), ("b", "conv", 2), ("c", "residual", 2)],
        edges=[("a:0", "b:0", 1.0), ("a:1", "c:1", -1.0), ("b:0", "c:0", 0.5)],
    )
    fig = viz.plot_circuit(g)
    _check(fig, tmp_path)
    segs = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)][0].get_segments()
    assert sorted(len(s) for s in segs) == [2, 2, 16]  # the skip edge is an arc
    empty = Connectome.from_edges(layers=[("a", "input", 0)])
    assert isinstance(viz.plot_circuit(empty), Figure)
    no_edges = Connectome.from_edges(layers=[("a", "input", 2), ("b", "output", 1)])
    _check(viz.plot_circuit(no_edges), tmp_path, "noedges")


def test_plot_circuit_rejects_bad_input(toy):
    with pytest.raises(TypeError):
        viz.plot_circuit("not a graph")
    with pytest.raises(ValueError):
        viz.plot_circuit(toy, max_edges=-1)


def test_barycenter_order_untangles_a_crossed_chain():
    # a:0 -> b:1 -> c:0 and a:1 -> b:0 -> c:1: unit order crosses twice, the barycenter order never.
    g = Connectome.from_edges(
        layers=[("a", "input", 2), ("b", "conv", 2), ("c", "output", 2)],
        edges=[("a:0", "b:1", 1.0), ("a:1", "b:0", 1.0), ("b:1", "c:0", 1.0), ("b:0", "c:1", 1.0)],
    )
    y = _ordered_y(g)
    s, d = g.src, g.dst
    a, b = y[s], y[d]
    crossings = sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0
        for i in range(len(s)) for j in range(i + 1, len(s)) if g.node_layer[s[i]] == g.node_layer[s[j]]
    )
    assert crossings == 0


def test_strongest_keeps_largest_weights():
    w = np.array([0.1, -5.0, 2.0, np.nan, -0.3])
    keep = _strongest(w, 2)
    assert set(keep.tolist()) == {1, 2}
    assert keep.tolist() == [2, 1]  # weakest first, strongest drawn on top


def test_plot_groups(tmp_path):
    gg = Connectome.from_edges(
        layers=[("h1", "group", 2), ("h2", "group", 2), ("logits", "group", 1)],
        edges=[("h1:0", "h2:0", 2.0), ("h1:1", "h2:1", -0.5), ("h2:0", "logits:0", 1.5),
               ("h2:1", "logits:0", -0.2), ("h1:0", "logits:0", 0.3)],
        node_attrs={"size": [5, 3, 4, 2, 1], "attribution": [2.0, -0.5, 1.5, -0.2, 1.3]},
    )
    members = {"h1:0": ["h1:0", "h1:3"], "h1:1": ["h1:1"], "h2:0": ["h2:0"], "h2:1": ["h2:2"], "logits:0": ["logits:0"]}
    fig = viz.plot_groups(gg, members)
    _check(fig, tmp_path)
    ax = fig.axes[0]
    assert len(ax.patches) == gg.num_edges  # one arrow per link
    assert "5" in {t.get_text() for t in ax.texts}  # groups labelled with their size
    assert len(fig.axes) == 2  # the attribution colour bar


def test_plot_groups_accepts_group_graph_result(tmp_path):
    from types import SimpleNamespace

    gg = Connectome.from_edges(layers=[("a", "group", 1), ("b", "group", 2)],
                               edges=[("a:0", "b:0", 1.0), ("a:0", "b:1", -1.0)])
    res = SimpleNamespace(graph=gg, members={"a:0": ["a:1", "a:2"], "b:0": ["b:0"], "b:1": ["b:5"]})
    _check(viz.plot_groups(res), tmp_path)
    with pytest.raises(TypeError):
        viz.plot_groups(42)


def test_plot_groups_with_neuron_groups():
    analysis = pytest.importorskip("connectome.analysis")
    from connectome.analysis._toys import toy_two_groups

    gg = analysis.neuron_groups(toy_two_groups())
    fig = viz.plot_groups(gg)
    assert len(fig.axes[0].patches) == gg.graph.num_edges


# ---------------------------------------------------------------------------- charts
def test_plot_hubs(toy, big, tmp_path):
    fig = viz.plot_hubs(toy, toy.node_attrs["attribution"], k=2)
    _check(fig, tmp_path)
    assert len([a for a in fig.axes if a.get_visible()]) == 3
    first = fig.axes[0]
    assert len(first.patches) == 2
    assert [t.get_text() for t in first.get_yticklabels()][0] == "unit 0"  # input:0 has the top score
    assert [t.get_text() for t in fig.axes[2].get_yticklabels()][0] == "cat"
    with pytest.raises(ValueError):
        viz.plot_hubs(toy, [1.0, 2.0])
    # Many layers: only max_layers panels, the title says so.
    many = _random_layered([3] * 16, p=0.5, seed=0)
    fig = viz.plot_hubs(many, np.arange(many.num_nodes, dtype=float), k=3, max_layers=12)
    assert len([a for a in fig.axes if a.get_visible()]) == 12
    assert "not shown" in fig._suptitle.get_text()
    _check(viz.plot_hubs(big, np.random.default_rng(0).random(big.num_nodes)), tmp_path, "big")


def test_plot_similarity(tmp_path):
    rng = np.random.default_rng(0)
    mats = {f"l{i}": np.corrcoef(rng.normal(size=(3, 10))) for i in range(5)}
    mats["l4"][0, 1] = mats["l4"][1, 0] = np.nan
    fig = viz.plot_similarity(mats, ["cat", "dog", "car"], title="similarity")
    _check(fig, tmp_path)
    heatmaps = [a for a in fig.axes if a.images]
    assert len(heatmaps) == 5
    assert heatmaps[0].images[0].get_clim() == (-1.0, 1.0)
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["cat", "dog", "car"]
    assert sum(1 for a in fig.axes if a.get_label() == "<colorbar>") == 1  # one shared colour bar
    with pytest.raises(ValueError):
        viz.plot_similarity({"l": np.eye(2)}, ["a", "b", "c"])


def test_plot_image_comparison(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 16, 16)), rng.normal(size=(16, 16, 3)) * 40 + 100  # CHW [0,1] and HWC any range
    diffs = {"conv1": [(3, 1.2, 0.1), (7, 0.9, 0.2)], "layer2": [("layer2:5", 0.3, 1.9)]}
    maps = {"conv1": rng.random((2, 4, 4)), "layer2": (5, rng.random((2, 2, 2)))}
    fig = viz.plot_image_comparison(a, b, diffs, maps, names=("cat", "dog"))
    _check(fig, tmp_path)
    imgs = [a_ for a_ in fig.axes if a_.images]
    assert [len(a_.images) for a_ in imgs] == [1, 1, 2, 2, 2, 2]  # the images, then image + heatmap per map
    assert imgs[4].get_title() == "cat: layer2 unit 5"
    overlay = np.asarray(imgs[2].images[1].get_array())
    assert overlay.shape == (16, 16, 4)  # upsampled to the image size
    assert 0 <= overlay[..., 3].min() and overlay[..., 3].max() < 1  # semi-transparent
    bars = [a_ for a_ in fig.axes if a_.patches]
    assert len(bars) == 2 and len(bars[0].patches) == 4
    fig2 = viz.plot_image_comparison(a[0], b, diffs)  # grey image, no maps
    _check(fig2, tmp_path, "nomaps")
    with pytest.raises(ValueError):
        viz.plot_image_comparison(a, b, diffs, {"conv1": np.zeros((3, 4, 4))})


def test_upsample_is_bilinear_and_keeps_constants():
    from connectome.viz.charts import _upsample

    m = np.array([[0.0, 1.0], [2.0, 3.0]])
    up = _upsample(m, 4, 4)
    assert up.shape == (4, 4)
    assert up[0, 0] == 0.0 and up[-1, -1] == 3.0
    assert np.allclose(up[1, 1], 0.75)  # 1/4 of the way from each corner
    assert np.allclose(_upsample(np.full((3, 5), 2.0), 7, 11), 2.0)


def test_plot_matching(tmp_path):
    rng = np.random.default_rng(0)
    corr = {("conv1", "conv1"): rng.uniform(0, 1, 16), "layer1→layer1": rng.uniform(-0.2, 1, 40), ("fc", "fc"): []}
    over = {"conv1": (0.6, 0.2), "layer1": (0.4, 0.1, 0.05), "fc": 0.3}
    fig = viz.plot_matching(corr, over)
    _check(fig, tmp_path)
    assert len(fig.axes) == 2
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0].startswith("conv1→conv1")
    assert len(fig.axes[1].patches) == 3
    _check(viz.plot_matching(corr), tmp_path, "single")


def test_plot_curves(tmp_path):
    x = np.linspace(0, 1, 11)
    fig = viz.plot_curves({"deletion": (x, 1 - x), "insertion": (x, x, 0.05 * np.ones_like(x))})
    _check(fig, tmp_path)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "deletion (AUC=0.500)"
    with pytest.raises(ValueError):
        viz.plot_curves({"bad": ([0, 1], [0, 1, 2])})


def test_plot_bars(tmp_path):
    fig = viz.plot_bars({"cat": 3, "dog": 5}, title="circuit size", xlabel="category")
    _check(fig, tmp_path)
    assert len(fig.axes[0].patches) == 2
    fig = viz.plot_bars({"cat": (0.9, 0.05), "dog": (0.8, 0.1)}, title="fidelity")
    _check(fig, tmp_path, "err")
    from matplotlib.container import BarContainer

    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert bars and bars[0].errorbar is not None


# ---------------------------------------------------------------------------- report
def _embedded(html: str):
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)" data-file="([^"]+)"', html)


def test_report_writes_html_and_pngs(toy, tmp_path):
    rep = viz.Report("Cat <circuit>")
    rep.add_heading("Circuit")
    rep.add_text("First paragraph <script>alert(1)</script>\n\nSecond & last.")
    rep.add_figure(viz.plot_circuit(toy), "the circuit", "circuit")
    x = np.linspace(0, 1, 5)
    rep.add_figure(viz.plot_curves({"deletion": (x, 1 - x)}), "curves", "circuit")  # name clash -> circuit-2
    rep.add_table([["h:0", 0.123456789, 3], ["h:1", np.float32(12345.678), np.int64(7)]], ["unit", "flow", "n"],
                  caption="top units")
    rep.add_code("connectome report g.npz --out out/")
    out = tmp_path / "new" / "nested"
    path = rep.write(out)
    assert path == out / "report.html" and path.is_file()
    html = path.read_text(encoding="utf-8")
    imgs = _embedded(html)
    assert [f for _, _, f in imgs] == ["circuit.png", "circuit-2.png"]
    for data, alt, file in imgs:
        raw = base64.b64decode(data)
        assert raw[:8] == PNG
        assert (out / file).read_bytes() == raw
    assert imgs[0][1] == "the circuit"
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Cat &lt;circuit&gt;" in html
    assert "0.1235" in html and "1.235e+04" in html and ">7<" in html
    assert html.count("<p>") == 2
    assert sorted(p.name for p in out.iterdir()) == ["circuit-2.png", "circuit.png", "report.html"]  # no temp files
    assert plt.get_fignums() == []  # figures were closed when added


def test_report_overwrites_atomically_and_markdown(tmp_path):
    rep = viz.Report("r")
    rep.add_text("one")
    p1 = rep.write(tmp_path)
    rep.add_table([[1.0, None]], ["a", "b"])
    p2 = rep.write(tmp_path, markdown=True)
    assert p1 == p2 and "<table>" in p2.read_text()
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# r") and "| a | b |" in md
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_viz_import_does_not_import_matplotlib():
    code = "import sys, connectome.viz; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
