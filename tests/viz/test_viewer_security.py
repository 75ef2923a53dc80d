"""viewer.html is safe to open whatever the graphs' names are: hostile names in every string the
page shows (model, category, layer, unit, label, paths, meta) are shown as text, never run, never
blank the page; a Content-Security-Policy lets only the page's own script run, and nothing load."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import numpy as np
import pytest
import torch

import connectome as cn
from connectome._text import printable
from connectome.cli import main
from connectome.viz.viewer import content_security_policy, inline_json, viewer_html, write_viewer

#: Names an attacker (or an unlucky folder) can give: markup with an event handler, the
#: page template's slots, a comment opener before a script tag, a script end tag, and the
#: line separators JavaScript once read as line ends. None may contain ":" (layer names).
PWN = "<img src=x onerror=window.pwned=1>"
HOSTILE = [
    PWN,
    "__DATA__",
    "__SCRIPT__ __TITLE__ __CSS__ __CSP__",
    "<!--<script>",
    "</script><script>window.pwned=2</script>",
    "a\u2028b\u2029c",
    "&amp; \"quoted' <b>bold</b>",
]


def _hostile_graph() -> cn.Connectome:
    """Three layers named by hostile strings, hostile class labels and meta, one top image per unit."""
    layers = [(HOSTILE[0], "input", 3), (HOSTILE[1] + " " + HOSTILE[3], "conv", 4),
              (HOSTILE[4], "output", 2, [HOSTILE[5], HOSTILE[6]])]
    rng = np.random.default_rng(0)
    ids = [f"{name}:{u}" for name, _, size, *_ in layers for u in range(size)]
    edges = [(s, t, float(rng.normal())) for s in ids[:3] for t in ids[3:7]] + \
            [(s, t, float(rng.normal())) for s in ids[3:7] for t in ids[7:]]
    n = len(ids)
    attrs = {"attribution": rng.normal(size=n), "example_index_0": np.arange(n) % 2,
             "example_value_0": np.ones(n), "example_pos_0": np.zeros(n, dtype=np.int64)}
    meta = {"model": " ".join(HOSTILE), "category": HOSTILE[2], "target_class": 0, "data": PWN, "note": HOSTILE,
            "examples": {"k": 1, "input_size": [8, 8], "fields": {}, "index": "dataset",
                         "paths": {"0": f"/x/{PWN}/0.png", "1": "/x/__DATA__/1.png"}}}
    return cn.Connectome.from_edges(layers=layers, edges=edges, meta=meta, node_attrs=attrs)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A viewer of two hostile categories (one titled by the hostile model name), with patches."""
    g = _hostile_graph()
    path = tmp_path_factory.mktemp("hostile") / "viewer.html"
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    write_viewer({HOSTILE[0]: g, HOSTILE[1] + HOSTILE[4]: g.with_meta(target_class=1)}, path, images=images, mass=1.0)
    return g, path


def _inline(text: str, tag: str) -> str:
    return re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S).group(1)


# ----------------------------------------------------------------------------- the file
def test_inline_json_parses_back_and_holds_no_markup():
    obj = {"names": HOSTILE, "nested": {h: [h] for h in HOSTILE}}
    text = inline_json(obj)
    assert json.loads(text) == obj
    assert not set(text) & set("<>&\u2028\u2029")


def test_hostile_names_stay_in_their_places(hostile):
    g, path = hostile
    text = path.read_text(encoding="utf-8")
    # exactly the page's own two scripts, whole: no name ended one or opened another
    assert text.count("<script") == 2 and text.count("</script>") == 2
    assert "<!--" not in text
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    assert not set(raw) & set("<>&\u2028\u2029")
    d = json.loads(raw)  # the data is whole: no slot was filled inside it, nothing pasted into it
    # names are shown as printable() makes them for the terminal too: U+2028/9 as visible escapes
    assert d["title"] == printable("connectome viewer: " + " ".join(HOSTILE))
    assert [c["name"] for c in d["categories"]] == [HOSTILE[0], HOSTILE[1] + HOSTILE[4]]
    assert set(d["categories"][0]["layers"]) == {layer.name for layer in g.layers}
    assert d["categories"][0]["target"] == printable(HOSTILE[5]) and d["categories"][1]["target"] == HOSTILE[6]
    # the title is escaped HTML in <title> and in the bar, and the script is the module's own
    from connectome.viz import viewer

    assert _inline(text, "title") == viewer.html.escape(d["title"])
    assert re.search(r"<script>(.*?)</script>", text, re.S).group(1) == viewer._SCRIPT
    assert _inline(text, "style") == viewer._CSS


def test_the_page_declares_a_policy_that_allows_only_its_own_script(hostile):
    text = hostile[1].read_text(encoding="utf-8")
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text).group(1)
    assert policy.replace("&#x27;", "'") == content_security_policy()
    rules = dict(r.strip().split(" ", 1) for r in content_security_policy().split(";"))
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    style = _inline(text, "style")
    digest = lambda s: "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"  # noqa: E731
    assert rules == {"default-src": "'none'", "script-src": digest(script), "style-src": digest(style),
                     "img-src": "data:", "base-uri": "'none'", "form-action": "'none'"}
    # the policy comes before anything it governs
    assert text.index("Content-Security-Policy") < min(text.index("<style"), text.index("<script"))


@pytest.mark.filterwarnings("ignore:viewer .* no patches")  # its image files do not exist
def test_a_title_that_names_a_slot_is_a_title():
    g = _hostile_graph()
    for t in ("__DATA__", "__SCRIPT__", "__CSS__", "__CSP__", "__TITLE__"):
        text = viewer_html(g, title=t)
        assert _inline(text, "title") == t
        assert f'<b id="title">{t}</b>' in text


# ----------------------------------------------------------------------------- in a browser
_NO_MARKUP = ("return [document.querySelectorAll('img, iframe, object, embed').length, "
              "document.scripts.length, window.pwned === undefined]")


def _check_card(ui, V, unit):
    ui.move((2, ui.driver.execute_script("return window.innerHeight") - 3))  # off every unit first: the
    # card of the last one may cover this one
    ui.move(V("screenOf(arguments[0])", unit))
    assert V("state()")["hover"] == unit
    card = ui.driver.find_element("id", "card")
    assert card.is_displayed()
    got = ui.driver.execute_script(
        "var c = document.getElementById('card'); return [c.querySelector('h3').textContent, c.dataset.unit, "
        "Array.prototype.map.call(c.querySelectorAll('td'), function (t) { return t.textContent; })]")
    assert got[0] == unit and got[1] == unit
    return got[2]


def test_hostile_names_are_shown_as_text_and_never_run(ui, hostile):
    g, path = hostile
    V = ui.open(path, ready=False)
    js = ui.driver.execute_script
    assert js(_NO_MARKUP) == [0, 2, True]  # nothing ran: no element made of a name
    assert V("ready") is True  # and the page is not blank
    d = json.loads(re.search(r'id="data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S).group(1))
    assert js("return document.title") == d["title"]
    assert js("return document.getElementById('title').textContent") == d["title"]
    options = js("return Array.prototype.map.call(document.querySelectorAll('#cat option'), "
                 "function (o) { return o.textContent; })")
    assert options == [f"{c['name']} ({c['target']})" for c in d["categories"]]
    for i, c in enumerate(d["categories"]):
        V(f"category({i})")
        V("setMass(1.0)")
        shown = V("visibleUnits()")
        assert shown and set(shown) <= set(g.node_ids.tolist())  # the page drew the units
        assert c["target"] in js("return document.getElementById('count').textContent")
        for unit in {u.rpartition(":")[0]: u for u in shown}.values():  # a unit of every layer shown
            cells = _check_card(ui, V, unit)
            assert set(cells) & set(g.node_ids.tolist())  # its inputs or outputs, named as text
        painted = js("var c = document.getElementById('patches'); return c ? c.width : 0")
        assert painted > 0  # the patch sprite (a data: image) is allowed and drawn
    assert js(_NO_MARKUP) == [0, 2, True]
    assert V("errors") == [] and ui.severe() == []


def test_the_policy_blocks_injected_script_handlers_and_network(ui, hostile, tmp_path):
    """Were a name ever pasted into the page as HTML, the browser would still run none of it."""
    text = hostile[1].read_text(encoding="utf-8")
    evil = ('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
            '<img src="http://127.0.0.1:9/beacon.png"><link rel="stylesheet" href="http://127.0.0.1:9/s.css">')
    path = tmp_path / "injected.html"
    path.write_text(text.replace("<body>", "<body>" + evil, 1), encoding="utf-8")
    V = ui.open(path)  # the page's own script still runs
    assert ui.driver.execute_script("return window.pwned === undefined")
    assert V("state()")["units"] > 0
    refused = [e["message"] for e in ui.severe()]
    assert any("Content Security Policy" in m and "inline script" in m for m in refused), refused
    assert any("Content Security Policy" in m and "127.0.0.1:9/beacon.png" in m for m in refused), refused
    assert any("Content Security Policy" in m and "127.0.0.1:9/s.css" in m for m in refused), refused


def test_cli_extract_and_view_with_a_model_in_a_folder_named_like_a_slot(ui, model_file, tmp_path, capsys):
    """No hostile file needed: a model under __DATA__/ and hostile category folders, extracted and viewed."""
    from PIL import Image

    cats = [PWN, "__SCRIPT__ <!--<script>", "a\u2028b"]
    rng = np.random.default_rng(0)
    for c in cats:
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    spec = model_file(tmp_path / "__DATA__")
    assert main(["extract", spec, str(tmp_path / "data"), "--out", str(tmp_path / "g"), "--examples", "2",
                 "--image-size", "8", "--quiet", "--num-workers", "0"]) == 0
    assert main(["view", str(tmp_path / "g"), "--out", str(tmp_path / "v.html")]) == 0
    capsys.readouterr()
    V = ui.open(tmp_path / "v.html", ready=False)
    js = ui.driver.execute_script
    assert js(_NO_MARKUP) == [0, 2, True]
    assert V("ready") is True
    assert js("return document.getElementById('title').textContent") == f"connectome viewer: {spec}"
    options = js("return Array.prototype.map.call(document.querySelectorAll('#cat option'), "
                 "function (o) { return o.textContent; })")
    assert sorted(options) == sorted(printable(c) for c in cats)
    for i in range(len(cats)):
        V(f"category({i})")
        unit = next(u for u in V("visibleUnits()") if u.startswith("conv1:"))
        _check_card(ui, V, unit)
        assert js("var c = document.getElementById('patches'); return c ? c.width : 0") > 0
    assert js(_NO_MARKUP) == [0, 2, True]
    assert V("errors") == [] and ui.severe() == []


@pytest.mark.filterwarnings("ignore:viewer .* no patches")  # its image files do not exist
@pytest.mark.parametrize("tc", [[1], {"a": 1}, float("inf"), float("nan"), "x"])
def test_meta_numbers_from_a_file_that_are_not_numbers(tmp_path, tc):
    """target_class and n_images come from the file: a list or inf raised TypeError/OverflowError
    out of view, NaN made the page's JSON invalid ("Out of range float values")."""
    g = _hostile_graph().with_meta(target_class=tc, n_images=float("nan"))
    g.save(tmp_path / "g.npz")
    assert main(["view", str(tmp_path / "g.npz"), "--out", str(tmp_path / "v.html")]) == 0
    d = json.loads(re.search(r'id="data">(.*?)</script>', (tmp_path / "v.html").read_text(encoding="utf-8"), re.S).group(1))
    assert [(c["target"], c["n_images"]) for c in d["categories"]] == [(None, None)]
