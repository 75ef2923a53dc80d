"""What ``--out`` may overwrite: never one of the command's inputs (also through a link), and
``view`` of graphs with one name from several folders keeps them all."""

from __future__ import annotations

import json
import os
import re

import pytest

import connectome as cn
from connectome.cli import main


def _graph(category: str, width: int) -> cn.Connectome:
    layers = [("input", "input", 2), ("hidden", "linear", width), ("out", "output", 2, ["circle", "ring"])]
    edges = [(f"input:{i}", f"hidden:{j}", 1.0 + i + j) for i in range(2) for j in range(width)]
    edges += [(f"hidden:{j}", f"out:{k}", 0.5 - k) for j in range(width) for k in range(2)]
    return cn.Connectome.from_edges(layers=layers, edges=edges, meta={"category": category, "target_class": 0})


def _one_line_refusal(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    return err


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "G.npz"
    _graph("circle", 3).save(path)
    return path


def _link(kind: str, target, link):
    if kind == "symlink":
        os.symlink(target, link)
    else:
        os.link(target, link)
    return link


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_export_refuses_to_write_over_its_input(saved, tmp_path, capsys, how):
    before = saved.read_bytes()
    out = saved if how == "same" else _link(how, saved, tmp_path / "G.graphml")
    assert main(["export", str(saved), "--format", "graphml", "--out", str(out)]) == 2
    _one_line_refusal(capsys, "--out", "is the input", str(saved), "choose another --out")
    assert saved.read_bytes() == before and cn.load(saved).num_edges == 12
    assert main(["export", str(saved), "--out", str(tmp_path / "ok.graphml")]) == 0  # elsewhere: written


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_view_refuses_to_write_over_its_input(saved, tmp_path, capsys, how):
    before = saved.read_bytes()
    out = saved if how == "same" else _link(how, saved, tmp_path / "v.html")
    assert main(["view", str(saved), "--out", str(out)]) == 2
    _one_line_refusal(capsys, "--out", "is the input", str(saved))
    assert saved.read_bytes() == before


def test_view_of_a_folder_refuses_its_index_and_graphs_as_output(tmp_path, capsys):
    folder = tmp_path / "g"
    folder.mkdir()
    _graph("circle", 3).save(folder / "circle.npz")
    (folder / "index.json").write_text(json.dumps({"categories": {"circle": {"file": "circle.npz"}}}))
    for victim in ("index.json", "circle.npz"):
        before = (folder / victim).read_bytes()
        assert main(["view", str(folder), "--out", str(folder / victim)]) == 2
        _one_line_refusal(capsys, "is the input", victim)
        assert (folder / victim).read_bytes() == before
    assert main(["view", str(folder), "--out", str(folder / "viewer.html")]) == 0  # a new file beside them


def test_weights_refuses_to_write_over_its_weights_file(tmp_path, capsys):
    import torch

    (tmp_path / "m.py").write_text("import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 2))\n")
    torch.save({"0.weight": torch.ones(2, 4), "0.bias": torch.zeros(2)}, tmp_path / "w.pt")
    before = (tmp_path / "w.pt").read_bytes()
    spec = f"{tmp_path / 'm.py'}:make"
    assert main(["weights", spec, "--weights", str(tmp_path / "w.pt"), "--input-shape", "4",
                 "--out", str(tmp_path / "w.pt")]) == 2
    _one_line_refusal(capsys, "is the input", "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == before
    assert main(["weights", spec, "--input-shape", "4", "--out", str(tmp_path / "m.py")]) == 2
    _one_line_refusal(capsys, "is the input", "m.py")
    assert "def make" in (tmp_path / "m.py").read_text()


# ----------------------------------------------------------------------------- one name, two folders
def _viewer_categories(path) -> dict[str, list[str]]:
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', path.read_text(), re.S).group(1)
    return {c["name"]: c["nodes"]["id"] for c in json.loads(raw)["categories"]}


def test_view_keeps_graphs_of_one_name_from_two_folders(tmp_path, capsys):
    for folder, width in (("a", 3), ("b", 5)):
        (tmp_path / folder).mkdir()
        _graph("circle", width).save(tmp_path / folder / "circle.npz")
    out = tmp_path / "v.html"
    files = [str(tmp_path / "a" / "circle.npz"), str(tmp_path / "b" / "circle.npz")]
    assert main(["view", *files, "--out", str(out)]) == 0
    cats = _viewer_categories(out)
    assert sorted(cats) == ["a/circle", "b/circle"]
    # each name shows its own graph: 3 and 5 hidden units
    assert sum(u.startswith("hidden:") for u in cats["a/circle"]) == 3
    assert sum(u.startswith("hidden:") for u in cats["b/circle"]) == 5


def test_view_names_from_folders_of_one_name_and_from_one_folder(tmp_path):
    for folder, width in (("x/data", 2), ("y/data", 3)):
        (tmp_path / folder).mkdir(parents=True)
        _graph("circle", width).save(tmp_path / folder / "g.npz")
    _graph("circle", 4).save(tmp_path / "x" / "data" / "h.npz")
    out = tmp_path / "v.html"
    files = [tmp_path / "x/data/g.npz", tmp_path / "y/data/g.npz", tmp_path / "x/data/h.npz"]
    assert main(["view", *map(str, files), str(files[0]), "--out", str(out)]) == 0  # the first file twice: once
    cats = _viewer_categories(out)
    assert {n: sum(u.startswith("hidden:") for u in ids) for n, ids in cats.items()} == {
        "x/data/circle (g.npz)": 2, "y/data/circle": 3, "x/data/circle (h.npz)": 4}


def test_export_of_a_folder_category_refuses_the_folder_files_as_output(tmp_path, capsys):
    """``DIR:CATEGORY`` is no path, so its folder's files were not counted as inputs: export
    wrote GraphML over the category's own .npz."""
    folder = tmp_path / "g"
    folder.mkdir()
    _graph("circle", 3).save(folder / "circle.npz")
    (folder / "index.json").write_text(json.dumps({"categories": {"circle": {"file": "circle.npz"}}}))
    for victim in ("index.json", "circle.npz"):
        before = (folder / victim).read_bytes()
        assert main(["export", f"{folder}:circle", "--format", "graphml", "--out", str(folder / victim)]) == 2
        _one_line_refusal(capsys, "is the input", victim)
        assert (folder / victim).read_bytes() == before
    assert main(["export", f"{folder}:circle", "--out", str(folder / "circle.graphml")]) == 0  # a new file beside them
