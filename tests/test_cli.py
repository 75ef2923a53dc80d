"""The command line end to end on tiny inputs: exit codes, files, JSON, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import connectome as cn
from connectome.cli import main


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs")
    rc = main(["extract", "zoo:smallresnet", "zoo:shapes:3", "--out", str(out), "--quiet", "--per-sample",
               "--device", "cpu", "--categories", "circle,ring,square"])
    assert rc == 0
    return out


def test_extract_writes_one_graph_per_category_and_index(extracted):
    index = json.loads((extracted / "index.json").read_text())
    assert set(index["categories"]) == {"circle", "ring", "square"}
    for cname, entry in index["categories"].items():
        g = cn.load(extracted / entry["file"])
        assert g.meta["category"] == cname
        assert g.meta["n_images"] == 3
        assert "abs_weight" in g.edge_attrs
        assert abs(g.meta["completeness_residual"]) <= 1e-4 * max(1.0, abs(g.meta["target_total"]))


def test_weights_command(tmp_path, capsys):
    out = tmp_path / "w.npz"
    assert main(["weights", "zoo:simplecnn_a", "--out", str(out)]) == 0
    g = cn.load(out)
    assert g.meta["method"] == "weights"
    assert g.layers[-1].labels is not None
    assert "Connectome(" in capsys.readouterr().out


def test_weights_torchvision_with_state_dict_file(tmp_path):
    import torch
    import torchvision

    m = torchvision.models.squeezenet1_0(weights=None, num_classes=1000)
    sd = tmp_path / "sq.pt"
    torch.save(m.state_dict(), sd)
    out = tmp_path / "sq.npz"
    assert main(["weights", "torchvision:squeezenet1_0", "--weights", str(sd), "--input-shape", "3,64,64",
                 "--out", str(out)]) == 0
    g = cn.load(out)
    # the conv weights in the file are the model's: compare one kernel sum
    w = m.features[0].weight.detach().double().sum(dim=(2, 3)).numpy()
    i, j, v = g.edge_block("input", "features.0")
    np.testing.assert_allclose(v, w[j, i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["graphml", "gexf"])
def test_export(extracted, tmp_path, fmt):
    out = tmp_path / f"g.{fmt}"
    assert main(["export", str(extracted / "circle.npz"), "--format", fmt, "--prune-top-k", "3", "--out", str(out)]) == 0
    import networkx as nx

    G = nx.read_graphml(out) if fmt == "graphml" else nx.read_gexf(out)
    g = cn.load(extracted / "circle.npz").prune(top_k=3)
    # zero-weight edges (into dead units) are not exported
    assert G.number_of_nodes() == g.num_nodes and G.number_of_edges() == int((g.weight != 0).sum()) < g.num_edges


def test_report_json_and_html(extracted, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(extracted / "circle.npz"), "--json", "--out", str(out), "--top", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["graph"]["num_nodes"] > 0
    assert len(data["hubs"]["top"]) == 5
    assert data["circuit"]["units"] > 0
    html = (out / "report.html").read_text()
    files = re.findall(r'data-file="([^"]+)"', html)
    assert files, "the report embeds figures"
    for f in files:
        assert (out / f).is_file()


def test_report_text(extracted, capsys):
    assert main(["report", str(extracted / "ring.npz")]) == 0
    text = capsys.readouterr().out
    assert "Leiden communities" in text and "Circuit" in text


def test_compare_json(extracted, capsys):
    assert main(["compare", str(extracted / "circle.npz"), str(extracted / "ring.npz"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, dict) and data


def test_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    assert "smallresnet" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["weights", "not-a-spec", "--out", "x.npz"], "model spec"),
        (["weights", "torchvision:nonexistent_net", "--out", "x.npz"], "no model"),
        (["weights", "zoo:nope", "--out", "x.npz"], "nope"),
        (["extract", "zoo:simplecnn_a", "/no/such/folder", "--out", "o"], "does not exist"),
        (["report", "/no/such/file.npz"], "no such file"),
        (["weights", "zoo:simplecnn_a", "--out", "/no/such/dir/g.npz"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, phrase, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert phrase in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unknown_format_exits_2(extracted, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(extracted / "circle.npz"), "--format", "dot", "--out", "x"])
    assert exc.value.code == 2


def test_help_has_an_example_for_every_command(capsys):
    for cmd in ["weights", "extract", "report", "compare", "export", "demo", "zoo"]:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "Example:" in capsys.readouterr().out


def test_own_model_file_and_image_folder(tmp_path, capsys):
    """The path a researcher takes after the demo: their model file and their images."""
    from PIL import Image

    (tmp_path / "mymodel.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n"
    )
    rng = np.random.default_rng(0)
    for cname in ("cats", "dogs"):
        (tmp_path / "imgs" / cname).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cname / f"{i}.png")
    out = tmp_path / "graphs"
    rc = main(["extract", f"{tmp_path / 'mymodel.py'}:build", str(tmp_path / "imgs"), "--out", str(out),
               "--image-size", "32", "--quiet", "--device", "cpu"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert set(index["categories"]) == {"cats", "dogs"}
    g = cn.load(out / "dogs.npz")
    assert g.layers[-1].labels == ("cats", "dogs")
    assert g.meta["target_class"] == 1 and g.meta["n_images"] == 3
    assert main(["report", str(out / "dogs.npz"), "--json"]) == 0
    capsys.readouterr()
    assert main(["weights", f"{tmp_path / 'mymodel.py'}:build", "--out", str(tmp_path / "w.npz")]) == 2
    assert "--input-shape" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["extract", "report", "demo", "export", "weights"])
def test_out_that_is_the_wrong_kind_of_path(cmd, extracted, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    argv = {
        "extract": ["extract", "zoo:simplecnn_a", "zoo:shapes:1", "--out", str(a_file)],
        "report": ["report", str(extracted / "circle.npz"), "--out", str(a_file)],
        "demo": ["demo", "--out", str(a_file)],
        "export": ["export", str(extracted / "circle.npz"), "--format", "gexf", "--out", str(tmp_path)],
        "weights": ["weights", "zoo:simplecnn_a", "--out", str(tmp_path)],
    }[cmd]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("is a file" in err or "is a folder" in err), err
    assert a_file.read_text() == "x"
