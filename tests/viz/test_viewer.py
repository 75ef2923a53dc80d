"""The interactive viewer, unit cards and patch exports: their data checked in Python, the page
checked in a real headless Chromium (skipped, with the reason, where no browser is installed)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import connectome as cn
from connectome import analysis as an
from connectome import patches
from connectome.cli import main
from connectome.viz.viewer import circuit_levels, viewer_html, write_viewer


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(h, 1))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 12, 12, generator=g)
    x[8:16, 0] += 1.0  # the categories differ a little, so their circuits do
    return x, torch.arange(24) // 8


@pytest.fixture(scope="module")
def graphs(data):
    torch.manual_seed(0)
    m = Small().eval()
    return cn.extract.attribution_by_category(m, data, batch_size=8, device="cpu", progress=False, examples=4,
                                              labels=["red", "</script>green", "blue"])


@pytest.fixture(scope="module")
def page(graphs, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("viewer") / "viewer.html"
    write_viewer(graphs, path, images=data[0])
    return path


def _embedded(html_text: str) -> dict:
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', html_text, re.S).group(1)
    return json.loads(raw)


# ----------------------------------------------------------------------------- without a browser
def test_slider_levels_are_the_circuits_of_their_masses(graphs):
    for g in graphs.values():
        levels, member = circuit_levels(g, mass=1.0)
        assert levels[-1] == 1.0 and levels == sorted(levels)
        for m, row in zip(levels, member):
            assert set(g.node_ids[row].tolist()) == set(an.circuit(g, mass=m).node_ids.tolist()), m


def test_viewer_masks_hold_each_circuit(graphs, page):
    d = _embedded(page.read_text())["categories"][0]
    g = graphs[d["name"]]
    for j, m in enumerate(d["levels"]):
        shown = {u for u, mask in zip(d["nodes"]["id"], d["nodes"]["mask"]) if mask >> j & 1}
        assert shown == set(an.circuit(g, mass=m).node_ids.tolist())


def test_viewer_is_one_self_contained_file(page, graphs):
    text = page.read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"'](https?:)?//", text)  # nothing fetched
    assert "http://" not in text and "https://" not in text
    d = _embedded(text)
    assert [c["name"] for c in d["categories"]] == list(graphs)
    c = d["categories"][0]
    n = len(c["nodes"]["id"])
    assert all(len(v) == n for v in c["nodes"].values())
    assert c["sprite"].startswith("data:image/")
    assert max(c["edges"]["s"] + c["edges"]["t"]) < n
    # a category named like a closing tag does not end the script early
    assert text.count("</script>") == 2


def test_viewer_without_images_still_works(graphs):
    d = _embedded(viewer_html(graphs["0"], images=None))
    assert d["categories"][0]["sprite"] is None  # tensors were not given: numbers only


@pytest.mark.parametrize("bad, err", [({}, ValueError), ({"a": 1}, TypeError)])
def test_viewer_refuses_bad_input(bad, err):
    with pytest.raises(err):
        viewer_html(bad)


def test_report_has_unit_cards_with_patches(graphs, data, tmp_path):
    from connectome.reporting import graph_report

    r = graph_report(graphs["0"], out=str(tmp_path), images=data[0], viewer=True)
    text = (tmp_path / "report.html").read_text()
    assert text.count('<div class="card">') >= 3
    assert re.search(r'<div class="card"><h4>[^<]+</h4><img src="data:image/png;base64,', text)
    assert (tmp_path / "viewer.html").is_file() and r.data["viewer"].endswith("viewer.html")
    no_images = graph_report(graphs["0"], out=str(tmp_path / "b"))
    assert "not the images they index" in (tmp_path / "b" / "report.html").read_text()
    assert no_images.path


def test_unit_patch_is_the_crop_of_its_top_image(graphs, data):
    g = graphs["0"]
    index, _, pos = patches.example_arrays(g)
    # a conv2 unit whose best image peaks inside: two 3x3 convs, the second strided, see 5x5 pixels
    boxes = {u: patches.crop_box(g, f"conv2:{u}", int(pos[g.index_of(f'conv2:{u}'), 0])) for u in range(8)}
    unit, (y0, y1, x0, x1) = next((u, b) for u, b in boxes.items() if (b[1] - b[0], b[3] - b[2]) == (5, 5))
    assert all(b[1] - b[0] <= 5 and b[3] - b[2] <= 5 for b in boxes.values())
    nid = f"conv2:{unit}"
    i = g.index_of(nid)
    got = patches.unit_patches(g, patches.image_source(g, data[0]), [nid], n=1, size=5)[nid][0]
    assert got["index"] == index[i, 0] and got["box"] == (y0, y1, x0, x1)
    img = data[0][index[i, 0]].numpy().transpose(1, 2, 0)
    crop = (img - img.min()) / (img.max() - img.min())
    np.testing.assert_allclose(got["patch"] / 255.0, crop[y0:y1, x0:x1], atol=1 / 255 + 1e-6)


# ----------------------------------------------------------------------------- command line
def test_cli_view_export_and_report(graphs, tmp_path, capsys):
    folder = tmp_path / "g"
    folder.mkdir()
    index = {"categories": {}}
    for name, g in graphs.items():
        f = f"{len(index['categories'])}.npz"
        g.save(folder / f)
        index["categories"][name] = {"file": f}
    (folder / "index.json").write_text(json.dumps(index))
    assert main(["view", str(folder), "--out", str(tmp_path / "v.html")]) == 0
    assert len(_embedded((tmp_path / "v.html").read_text())["categories"]) == 3
    assert main(["view", str(folder / "0.npz"), "--out", str(tmp_path / "one.html")]) == 0
    # no images recorded (the graphs came from tensors): export --examples says what to pass
    assert main(["export", str(folder / "0.npz"), "--format", "graphml", "--out", str(tmp_path / "x.graphml"),
                 "--examples", str(tmp_path / "p")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["view", str(tmp_path), "--out", str(tmp_path / "w.html")]) == 2
    assert "index.json" in capsys.readouterr().err
    assert main(["report", str(folder / "0.npz"), "--html"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", '{"categories": {"a": {}}}', '{"categories": ["a.npz"]}', "[]"])
def test_cli_view_of_a_damaged_index_is_one_line(tmp_path, capsys, text):
    """A damaged index.json: one line and exit 2 (it was a KeyError or AttributeError traceback)."""
    (tmp_path / "index.json").write_text(text)
    assert main(["view", str(tmp_path), "--out", str(tmp_path / "v.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index.json is damaged" in err and "run extract again" in err, err
    assert main(["view", str(tmp_path / "missing.npz"), "--mass", "2", "--out", str(tmp_path / "v.html")]) == 2
    assert "--mass" in capsys.readouterr().err, "--mass is checked before any graph is read"


def test_cli_export_examples_from_an_image_folder(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    torch.manual_seed(0)
    torch.save(Small().state_dict(), tmp_path / "w.pt")
    spec = f"{__file__}:Small"
    assert main(["extract", "--layout", "npz", spec, str(tmp_path / "img"), "--out", str(tmp_path / "g"), "--examples", "2",
                 "--image-size", "12", "--quiet", "--categories", "a"]) == 0
    g = cn.load(tmp_path / "g" / "a.npz")
    assert g.meta["examples"]["paths"] and g.meta["examples"]["data"] == str((tmp_path / "img").resolve())
    out = tmp_path / "gephi" / "a.graphml"
    out.parent.mkdir()
    assert main(["export", str(tmp_path / "g" / "a.npz"), "--format", "graphml", "--out", str(out),
                 "--examples", str(tmp_path / "gephi" / "patches")]) == 0
    pngs = sorted((tmp_path / "gephi" / "patches").glob("a-*/*.png"))  # a folder of the graph's own
    assert len(pngs) == g.num_nodes - g.layer("input").size
    text = out.read_text()
    assert 'attr.name="example_path"' in text and 'attr.name="example_file"' in text
    assert re.search(rf"patches/a-{patches.examples_key(g)}/conv1_0\.png<", text)
    path = patches.top_example(g)[1][g.index_of("conv1:0")]
    assert f">{path}<" in text


# ----------------------------------------------------------------------------- in a browser
def test_hover_and_click_show_a_units_card(browser, ui, page, graphs):
    V = ui.open(page)
    assert V("errors") == [] and ui.severe() == []
    d = _embedded(page.read_text())["categories"][0]
    rows = dict(zip(d["nodes"]["id"], d["nodes"]["row"]))
    unit = next(u for u in V("visibleUnits()") if u.startswith("conv2:") and rows[u] >= 0)
    ui.move(V("screenOf(arguments[0])", unit))
    assert V("state()")["hover"] == unit
    card = browser.find_element("id", "card")
    assert card.is_displayed() and card.get_attribute("data-unit") == unit
    assert unit in card.text and "attribution" in card.text
    painted = browser.execute_script(
        "var c = document.getElementById('patches'); var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "var s = 0; for (var i = 3; i < d.length; i += 4) s += d[i] > 0; return [c.width, s];")
    assert painted[0] > 0 and painted[1] > 0  # the patches were drawn
    ui.click(V("screenOf(arguments[0])", unit))
    assert V("state()")["pinned"] == unit
    other = next(u for u in V("visibleUnits()") if u != unit)
    ui.move(V("screenOf(arguments[0])", other))
    assert card.get_attribute("data-unit") == unit  # pinned: hovering another unit keeps the card
    assert "pinned" in card.get_attribute("class")
    png = browser.get_screenshot_as_png()
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert a.std() > 5  # not a blank page
    reddish = (a[..., 0] > 150) & (a[..., 1] < 120) & (a[..., 2] < 120)
    bluish = (a[..., 2] > 120) & (a[..., 0] < 100)
    assert reddish.sum() > 20 and bluish.sum() > 20  # positive and negative flows are drawn
    assert V("errors") == [] and ui.severe() == []


def test_slider_categories_and_search(browser, ui, page, graphs):
    V = ui.open(page)
    few = V("state()")["units"]
    V("setMass(0.9)")
    assert V("state()")["units"] > few
    V("category(1)")
    assert V("state()")["category"] == list(graphs)[1]
    unit = [u for u in V("visibleUnits()") if u.startswith("conv1:")][-1]
    box = browser.find_element("id", "search")
    box.send_keys(unit + "\n")
    assert V("state()")["pinned"] == unit
    assert browser.find_element("id", "card").get_attribute("data-unit") == unit
    assert V("errors") == [] and ui.severe() == []


def test_two_thousand_units_and_twenty_thousand_edges(browser, ui, tmp_path):
    rng = np.random.default_rng(0)
    sizes = [3] + [250] * 8 + [10]
    layers = [("input", "input", 3)] + [(f"l{i}", "conv", 250) for i in range(1, 9)] + [("logits", "output", 10)]
    edges, seen = [], set()
    while len(edges) < 20000:
        li = int(rng.integers(0, len(sizes) - 1))
        s, t = int(rng.integers(sizes[li])), int(rng.integers(sizes[li + 1]))
        if (li, s, t) not in seen:
            seen.add((li, s, t))
            edges.append((f"{layers[li][0]}:{s}", f"{layers[li + 1][0]}:{t}", float(rng.normal())))
    g = cn.Connectome.from_edges(layers=layers, edges=edges)
    g = g.with_node_attrs(attribution=rng.normal(size=g.num_nodes))
    path = tmp_path / "big.html"
    write_viewer(g, path, mass=1.0)
    V = ui.open(path)
    V("setMass(1.0)")
    st = V("state()")
    assert st["units"] >= 2000
    unit = V("visibleUnits()")[1500]
    ui.move(V("screenOf(arguments[0])", unit))
    assert V("state()")["hover"] is not None
    print(f"2,013 units, 20,000 edges: one full redraw took {V('lastDrawMs'):.1f} ms in headless Chromium")
    assert V("errors") == [] and ui.severe() == []


def test_viewer_says_when_the_data_given_cannot_be_read(graphs, tmp_path):
    """``view --data`` naming no data (a typo) wrote a viewer without patches and said nothing
    (report warns and export refuses)."""
    with pytest.warns(UserWarning, match=r"viewer '0': no patches \(data '.*nowhere' does not exist"):
        d = _embedded(viewer_html(graphs["0"], images=str(tmp_path / "nowhere")))
    assert d["categories"][0]["sprite"] is None
