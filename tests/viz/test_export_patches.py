"""``export --examples DIR`` writes each graph's patch files where no other graph's and no other
unit's land: one subfolder per graph, file names distinct where case or Unicode normalisation
is ignored (macOS, Windows)."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from PIL import Image

import connectome as cn
from connectome import patches
from connectome.cli import main
from connectome.io import file_stems, folded_name

HANGUL = "\ud55c"  # one syllable (NFC); its NFD spelling is three jamo, letters too
TWINS = ["Conv", "conv", "STRASSE", "stra\u00dfe", HANGUL, unicodedata.normalize("NFD", HANGUL)]


def test_file_stems_are_distinct_where_case_and_normalisation_are_ignored():
    names = TWINS + ["circle", "a b", "caf\u00e9", "cafe\u0301"]
    stems = file_stems(names)
    assert list(stems) == names
    assert len({folded_name(s) for s in stems.values()}) == len(names)
    assert stems["circle"] == "circle" and stems["caf\u00e9"] == "caf\u00e9"  # no twin: the name itself
    assert all(stems[n].startswith(n[:3]) or not n.isascii() for n in TWINS)  # readable, then a hash
    assert file_stems(reversed(names)) == stems  # the same stems whatever the order


def _image_folder(root, rng, cats=("a", "b")):
    for c in cats:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def _example_files(path) -> dict[str, str]:
    """Node id -> its ``example_file`` column, as Gephi (or networkx) reads the GraphML file."""
    import networkx as nx

    return {str(n): d.get("example_file", "") for n, d in nx.read_graphml(path).nodes(data=True)}


def _strip_file_pixels(out_file, rel):
    return np.asarray(Image.open(out_file.parent / rel).convert("RGB"))


def test_two_graphs_exported_into_one_examples_folder_keep_their_own_patches(model_file, tmp_path, capsys):
    from connectome.viz.units import patch_strip

    _image_folder(tmp_path / "img", np.random.default_rng(3))
    assert main(["extract", model_file(tmp_path), str(tmp_path / "img"), "--out", str(tmp_path / "g"),
                 "--examples", "2", "--image-size", "12", "--quiet", "--num-workers", "0", "--layout", "npz"]) == 0
    out = tmp_path / "gephi"
    out.mkdir()
    for c in ("a", "b"):
        assert main(["export", str(tmp_path / "g" / f"{c}.npz"), "--out", str(out / f"{c}.graphml"),
                     "--examples", str(out / "patches")]) == 0
    capsys.readouterr()
    differ = 0
    for c in ("a", "b"):
        g = cn.load(tmp_path / "g" / f"{c}.npz")
        files = _example_files(out / f"{c}.graphml")
        expected = patches.unit_patches(g, patches.image_source(g), n=8, size=48)
        assert len({f for f in files.values() if f}) == len(expected)
        for nid, items in expected.items():
            got = _strip_file_pixels(out / f"{c}.graphml", files[nid])
            np.testing.assert_array_equal(got, patch_strip([p["patch"] for p in items], 48))
        other = cn.load(tmp_path / "g" / f"{'b' if c == 'a' else 'a'}.npz")
        top, other_top = patches.example_arrays(g)[0][:, 0], patches.example_arrays(other)[0][:, 0]
        differ += sum(top[g.index_of(n)] != other_top[other.index_of(n)] for n in expected)
    assert differ > 0  # the two graphs' patches differ: a shared file would have shown the wrong ones


def _twins_graph(tmp_path):
    """A graph whose layers are named by TWINS, one image per unit, recorded by path."""
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
        paths[str(i)] = str(p)
    layers = [("input", "input", 2)] + [(name, "conv", 2) for name in TWINS] + [("out", "output", 2)]
    names = [name for name, *_ in layers]
    edges = [(f"{a}:{i}", f"{b}:{j}", 1.0) for a, b in zip(names, names[1:]) for i in range(2) for j in range(2)]
    n = 2 * len(layers)
    attrs = {"example_index_0": np.arange(n) % 2, "example_value_0": np.ones(n),
             "example_pos_0": np.zeros(n, dtype=np.int64)}
    meta = {"category": "x",
            "examples": {"k": 1, "input_size": [8, 8], "fields": {}, "index": "dataset", "paths": paths}}
    return cn.Connectome.from_edges(layers=layers, edges=edges, meta=meta, node_attrs=attrs)


def test_patch_files_of_units_named_alike_do_not_collide(tmp_path, capsys):
    g = _twins_graph(tmp_path)
    g.save(tmp_path / "g.npz")
    assert main(["export", str(tmp_path / "g.npz"), "--out", str(tmp_path / "g.graphml"),
                 "--examples", str(tmp_path / "patches")]) == 0
    capsys.readouterr()
    files = [f for f in _example_files(tmp_path / "g.graphml").values() if f]
    assert len(files) == g.num_nodes  # every unit has a patch strip ...
    assert len({folded_name(f) for f in files}) == len(files)  # ... in a file of its own, on any file system
    assert all((tmp_path / f).is_file() for f in files)
    assert len({f.rsplit("/", 1)[0] for f in files}) == 1  # one folder for the graph


@pytest.mark.parametrize("change", ["examples", "positions", "data"])
def test_examples_key_names_what_the_patches_are_cut_from(tmp_path, change):
    g = _twins_graph(tmp_path)
    key = patches.examples_key(g)
    assert patches.examples_key(g) == key and len(key) == 12
    assert patches.examples_key(g.prune(top_k=1)) == key  # edges do not change a unit's patches
    # the values only rank the examples: the same images and positions cut the same patches
    assert patches.examples_key(g.with_node_attrs(example_value_0=2 * np.asarray(g.node_attrs["example_value_0"]))) == key
    if change == "examples":
        other = g.with_node_attrs(example_index_0=1 - np.asarray(g.node_attrs["example_index_0"]))
        assert patches.examples_key(other) != key
    elif change == "positions":
        other = g.with_node_attrs(example_pos_0=1 - np.asarray(g.node_attrs["example_pos_0"]))
        assert patches.examples_key(other) != key
    else:
        assert patches.examples_key(g, str(tmp_path)) != key


@pytest.mark.parametrize("kind", ["folder", "tensor", "dataset"])
def test_data_holding_fewer_images_than_the_examples_is_one_data_error(tmp_path, kind):
    """``--data`` naming other (smaller) data than the graph was extracted from raised an
    IndexError deep in view, report and export; now a DataError names the image and the data."""
    import torch

    from connectome.errors import DataError

    g = cn.Connectome.from_edges([("input", "input", 2), ("conv", "conv", 2)],
                                 [("input:0", "conv:0", 1.0), ("input:1", "conv:1", 2.0)])
    index = np.array([[0], [1], [2], [5]])  # conv:1's top image is image 5
    field = [1, 0, 1, 1, 0, 1, 4, 4]
    g = g.with_node_attrs(**patches.example_columns("example", index, np.ones((4, 1)), np.zeros((4, 1), dtype=np.int64)))
    g = g.with_meta(examples={"k": 1, "fields": {"input": field, "conv": field}, "input_size": [4, 4], "index": "dataset"})
    images = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    if kind == "folder":
        _image_folder(tmp_path / "img", np.random.default_rng(0), cats=("a",))  # 3 images
        data, name = str(tmp_path / "img"), str(tmp_path / "img")
    else:
        data = images if kind == "tensor" else torch.utils.data.TensorDataset(images, torch.zeros(3))
        name = "the images" if kind == "tensor" else "the TensorDataset"
    source = patches.image_source(g, data)
    assert source(2).shape == (4, 4, 3)
    assert set(patches.unit_patches(g, source, ["conv:0"], n=1, size=4)) == {"conv:0"}
    with pytest.raises(DataError, match=rf"^image 5 of the graph's examples is not in '{name}', which holds 3 images"):
        patches.unit_patches(g, source, n=1, size=4)
    if kind == "folder":  # the command line: one line, exit 2
        g.save(tmp_path / "g.npz")
        assert main(["export", str(tmp_path / "g.npz"), "--out", str(tmp_path / "g.graphml"), "--data", data,
                     "--examples", str(tmp_path / "p")]) == 2


def test_an_example_image_pil_refuses_is_one_data_error(tmp_path, capsys):
    """An example file replaced by one PIL will not open (here a PNG header declaring 20000 x
    20000 pixels: DecompressionBombError, not an OSError) raised a traceback out of view,
    report and export; now the viewer and report go on without patches and export says why."""
    import struct
    import zlib

    from connectome.errors import DataError

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    _image_folder(tmp_path / "img", np.random.default_rng(0), cats=("a",))
    bomb = tmp_path / "img" / "a" / "1.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    g = cn.Connectome.from_edges([("input", "input", 1), ("conv", "conv", 2)],
                                 [("input:0", "conv:0", 1.0), ("input:0", "conv:1", 2.0)])
    g = g.with_node_attrs(**patches.example_columns("example", np.array([[-1], [0], [1]]), np.ones((3, 1)),
                                                    np.zeros((3, 1), dtype=np.int64)))
    g = g.with_meta(examples={"k": 1, "fields": {}, "input_size": [4, 4], "index": "dataset",
                              "paths": {"0": str(tmp_path / "img" / "a" / "0.png"), "1": str(bomb)}})
    source = patches.image_source(g)
    assert source(0).shape == (4, 4, 3)
    with pytest.raises(DataError, match=r"^cannot read the example image '.*1\.png' \(DecompressionBombError: "):
        source(1)
    g.save(tmp_path / "g.npz")
    assert main(["view", str(tmp_path / "g.npz"), "--out", str(tmp_path / "v.html")]) == 0
    assert main(["export", str(tmp_path / "g.npz"), "--out", str(tmp_path / "g.graphml"),
                 "--examples", str(tmp_path / "p")]) == 2
    assert "DecompressionBombError" in capsys.readouterr().err
