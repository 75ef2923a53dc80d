"""The command line end to end on tiny inputs: exit codes, files, JSON, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import connectome as cn
from connectome.cli import main

from _image_folder import image_folder_model


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs")
    rc = main(["extract", "--layout", "npz", "zoo:smallresnet", "zoo:shapes:3", "--out", str(out), "--quiet", "--per-sample",
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
    rc = main(["extract", "--layout", "npz", f"{tmp_path / 'mymodel.py'}:build", str(tmp_path / "imgs"), "--out", str(out),
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


# ---------------------------------------------------------------------- nothing lost, nothing silently wrong
def _extract(tmp_path, names, *extra) -> tuple[int, Path]:
    model = image_folder_model(tmp_path, names)
    out = tmp_path / "graphs"
    rc = main(["extract", "--layout", "npz", model, str(tmp_path / "imgs"), "--out", str(out), "--image-size", "8", "--quiet",
               "--device", "cpu", *extra])
    return rc, out


def test_categories_that_look_alike_get_their_own_files(tmp_path, capsys):
    names = ["a b", "a?b", "a_b", "a\tb"]
    rc, out = _extract(tmp_path, names)
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is True
    files = {c: e["file"] for c, e in index["categories"].items()}
    assert sorted(files) == sorted(names)
    assert len(set(files.values())) == len(names)  # one file each: before, all four were a_b.npz
    assert files["a_b"] == "a_b.npz"  # a safe name keeps its name
    for cname, f in files.items():
        assert cn.load(out / f).meta["category"] == cname
    assert sorted(p.name for p in out.iterdir()) == sorted([*files.values(), "index.json"])


def test_long_category_names_stay_within_file_name_limits(tmp_path, capsys):
    names = ["x" * 250, "é" * 120]  # 250 bytes and 240 bytes: legal folder names
    rc, out = _extract(tmp_path, names)
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    for cname, entry in index["categories"].items():
        assert len(entry["file"].encode()) <= 120
        assert cn.load(out / entry["file"]).meta["category"] == cname


def test_category_files_are_distinct_stable_and_bounded():
    from connectome.cli import category_files

    names = ["circle", "Circle", "a b", "a?b", "a_b", "", ".hidden", "x" * 300, "ü" * 200, "bad\udcffname", "index"]
    files = category_files(names)
    assert len(set(f.casefold() for f in files.values())) == len(names)  # distinct even where case is not
    assert category_files(names) == files and category_files(["a b"]) == {"a b": files["a b"]}
    for f in files.values():
        assert f.endswith(".npz") and not f.startswith(".") and len(f.encode("utf-8", "surrogateescape")) <= 120
        assert "/" not in f and "\x00" not in f
    assert files["a_b"] == "a_b.npz" and files["index"] == "index.npz"


def test_report_of_a_graph_extracted_for_a_fixed_target(tmp_path, capsys):
    """--target cats: the dogs graph holds the flows into 'cats', and its report follows them."""
    rc, out = _extract(tmp_path, ["cats", "dogs"], "--target", "cats")
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    g = cn.load(out / index["categories"]["dogs"]["file"])
    assert g.meta["category"] == "dogs" and g.meta["target_class"] == 0
    capsys.readouterr()
    assert main(["report", str(out / index["categories"]["dogs"]["file"]), "--json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["circuit"]["units"] > 1
    assert main(["compare", str(out / "dogs.npz"), str(out / "cats.npz")]) == 0, capsys.readouterr().err
    assert main(["report", str(out / "dogs.npz")]) == 0
    assert "into cats" in capsys.readouterr().out


def test_extract_checks_the_output_folder_before_any_work(tmp_path, monkeypatch, capsys):
    import connectome.extract

    calls = []
    monkeypatch.setattr(connectome.extract, "attribution_by_category", lambda *a, **k: calls.append(1))
    (tmp_path / "afile").write_text("x")
    model = image_folder_model(tmp_path, ["cats", "dogs"])
    rc = main(["extract", model, str(tmp_path / "imgs"), "--out", str(tmp_path / "afile" / "graphs"),
               "--image-size", "8", "--quiet", "--device", "cpu"])
    assert rc == 2 and not calls  # refused before the first batch
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write to --out" in err, err


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_extract_refuses_a_read_only_output_folder_before_any_work(tmp_path, monkeypatch, capsys):
    import os

    import connectome.extract

    calls = []
    monkeypatch.setattr(connectome.extract, "attribution_by_category", lambda *a, **k: calls.append(1))
    model = image_folder_model(tmp_path, ["cats", "dogs"])
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        rc = main(["extract", model, str(tmp_path / "imgs"), "--out", str(tmp_path / "ro"), "--image-size", "8",
                   "--quiet", "--device", "cpu"])
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert rc == 2 and not calls
    assert "cannot write to --out" in capsys.readouterr().err


def test_a_run_stopped_while_writing_is_marked_partial(tmp_path, monkeypatch, capsys):
    import errno

    from connectome.graph import Connectome

    real, saved = Connectome.save, []

    def save_then_disk_full(self, path):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real(self, path)

    monkeypatch.setattr(Connectome, "save", save_then_disk_full)
    rc, out = _extract(tmp_path, ["ants", "bees", "cats"])
    assert rc == 2
    assert "No space left" in capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False
    assert list(index["categories"]) == ["ants"]  # exactly what was written
    assert (out / index["categories"]["ants"]["file"]).is_file()


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["extract", "zoo:simplecnn_a", "zoo:shapes:1", "--out", "o", "--max-images", "0"], "--max-images"),
        (["extract", "zoo:simplecnn_a", "zoo:shapes:1", "--out", "o", "--image-size", "100000"], "--image-size"),
        (["extract", "zoo:simplecnn_a", "zoo:shapes:1", "--out", "o", "--image-size", "0"], "--image-size"),
        (["weights", "zoo:simplecnn_a", "--input-shape", "3,99999999,99999999", "--out", "x.npz"], "--input-shape"),
        (["weights", "zoo:simplecnn_a", "--input-shape", "3,0,32", "--out", "x.npz"], "--input-shape"),
    ],
)
def test_impossible_sizes_are_one_line_and_exit_2(argv, phrase, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and phrase in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("body", ["    raise ValueError('no such variant')\n", "    return 1 / 0\n"])
def test_a_failing_model_factory_is_one_line_and_exit_2(tmp_path, capsys, body):
    (tmp_path / "bad.py").write_text("def build():\n" + body)
    assert main(["weights", f"{tmp_path / 'bad.py'}:build", "--input-shape", "3,8,8",
                 "--out", str(tmp_path / "w.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.py:build" in err and "raised" in err, err


@pytest.mark.parametrize("name", ["$\\foo$", "bad\udcffname"])
def test_report_on_any_category_name(extracted, tmp_path, capsys, name):
    """Names from folders: mathtext in titles and bytes that are not UTF-8 are drawn as text."""
    g = cn.load(extracted / "circle.npz")
    out_layer = g.layers[-1]
    labels = [name if l == "circle" else l for l in out_layer.labels]
    g = g.with_meta(category=name).with_labels(out_layer.name, labels)
    g.save(tmp_path / "g.npz")
    assert main(["report", str(tmp_path / "g.npz"), "--out", str(tmp_path / "rep")]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "Circuit" in text
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "report" in html
    assert main(["report", str(tmp_path / "g.npz"), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert main(["compare", str(tmp_path / "g.npz"), str(extracted / "ring.npz"), "--out", str(tmp_path / "cmp")]) == 0


def test_extract_precision_is_recorded(extracted, tmp_path):
    index = json.loads((extracted / "index.json").read_text())
    g = cn.load(extracted / next(iter(index["categories"].values()))["file"])
    assert g.meta["precision"] == "exact" and g.meta["exact"] is True
    out = tmp_path / "bf16"
    assert main(["extract", "--layout", "npz", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "circle", "--precision", "bf16"]) == 0
    g = cn.load(out / json.loads((out / "index.json").read_text())["categories"]["circle"]["file"])
    assert g.meta["precision"] == "bf16" and g.meta["exact"] is False


def test_extract_says_how_categories_map_to_output_units(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["extract", "zoo:simplecnn_a", "zoo:shapes:2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "ring,square"]) == 0
    err = capsys.readouterr().err
    assert "categories mapped to output units: ring -> unit 1 (ring), square -> unit 3 (square)" in err
