"""Files: .npz save/load (exact, atomic, clear errors), GraphML and GEXF for Gephi."""

from __future__ import annotations

import json
import os
import struct
import xml.etree.ElementTree as ET
import zipfile

import igraph as ig
import networkx as nx
import numpy as np
import pytest

import connectome as cn
from connectome import _files, gephi, npzformat
from connectome import io as cio
from connectome.errors import BadFileError, ExportError
from connectome.graph import Connectome, Layer


def make_graph(seed: int = 0) -> Connectome:
    """A small layered graph with every kind of content a file must carry."""
    rng = np.random.default_rng(seed)
    sizes = [3, 4, 2]
    layers = (Layer("input", "input", 3), Layer("layer1.0.conv1", "conv", 4, module="layer1.0.conv1"),
              Layer("logits", "output", 2, labels=("cat & <dog>", "ünï \"q\""), module="fc"))
    src, dst = [], []
    off = np.r_[0, np.cumsum(sizes)]
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        m = rng.random((sizes[a], sizes[b])) < 0.7
        i, j = np.nonzero(m)
        src.append(i + off[a])
        dst.append(j + off[b])
    src, dst = np.concatenate(src), np.concatenate(dst)
    w = rng.normal(size=src.size).astype(np.float32)
    n = off[-1]
    return Connectome(
        layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]), src=src, dst=dst, weight=w,
        edge_attrs={"abs_weight": np.abs(w).astype(np.float64) * 1.5},
        node_attrs={"attribution": rng.normal(size=n), "community": np.arange(n) % 3,
                    "activation_max": np.r_[np.nan, np.inf, rng.normal(size=n - 2)]},
        meta={"model": "toy", "method": "attribution", "n_images": 3, "nested": {"a": [1, 2.5, None]}, "exact": True},
    )


@pytest.fixture
def g() -> Connectome:
    return make_graph()


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------- npz
def test_save_load_round_trip_is_exact(g, tmp_path):
    p = tmp_path / "g.npz"
    g.save(p)
    h = cn.load(p)
    assert h.equals(g)
    assert h.weight.dtype == np.float32 and h.node_attr("community").dtype == g.node_attr("community").dtype
    assert h.layer("logits").labels == ("cat & <dog>", "ünï \"q\"") and h.layer("logits").module == "fc"
    assert h.meta == g.meta
    assert listing(tmp_path) == ["g.npz"]


def test_save_load_edgeless_graph(tmp_path):
    e = Connectome.from_edges([("input", "input", 2), ("logits", "output", 1)], meta={"x": 1})
    e.save(tmp_path / "e.npz")
    assert cn.load(str(tmp_path / "e.npz")).equals(e)


def test_file_holds_no_pickle(g, tmp_path):
    g.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:
        assert "header" in z.files
        for k in z.files:
            assert z[k].dtype != object
        assert json.loads(str(z["header"]))["format"] == "connectome-npz"


def test_save_overwrites(g, tmp_path):
    p = tmp_path / "g.npz"
    make_graph(1).save(p)
    g.save(p)
    assert cn.load(p).equals(g)


def test_failed_save_leaves_nothing(g, tmp_path, monkeypatch):
    def broken(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("disk full")

    monkeypatch.setattr(npzformat.np, "savez_compressed", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        g.save(tmp_path / "g.npz")
    assert listing(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(g, tmp_path, monkeypatch):
    p = tmp_path / "g.npz"
    g.save(p)
    before = p.read_bytes()

    def broken(fh, **arrays):
        fh.write(b"garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(npzformat.np, "savez_compressed", broken)
    with pytest.raises(KeyboardInterrupt):
        make_graph(1).save(p)
    assert p.read_bytes() == before
    assert listing(tmp_path) == ["g.npz"]


@pytest.mark.parametrize("writer", ["graphml", "gexf"])
def test_failed_export_leaves_nothing(g, tmp_path, monkeypatch, writer):
    calls = {"n": 0}
    real = gephi._number_texts

    def flaky(v):
        calls["n"] += 1
        if calls["n"] > 3:  # fail in the middle of the node list, after the header was written
            raise OSError("disk full")
        return real(v)

    monkeypatch.setattr(gephi, "_number_texts", flaky)
    with pytest.raises(OSError, match="disk full"):
        getattr(cio, f"write_{writer}")(g, tmp_path / f"g.{writer}")
    assert calls["n"] > 3
    assert listing(tmp_path) == []


def test_save_into_missing_folder(g, tmp_path):
    with pytest.raises(ExportError, match="does not exist; create it first"):
        g.save(tmp_path / "nope" / "g.npz")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------- bad files
def _npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _header(**over):
    h = {"format": "connectome-npz", "version": 1, "layers": [{"name": "input", "kind": "input", "size": 2}],
         "meta": {}, "node_attrs": [], "edge_attrs": []}
    h.update(over)
    return np.array(json.dumps(h))


def _random_bytes(p):
    p.write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated(p):
    make_graph().save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _no_header(p):
    _npz(p, weight=np.ones(3))


def _other_format(p):
    _npz(p, header=_header(format="something-else"))


def _newer_version(p):
    _npz(p, header=_header(version=99))


def _missing_array(p):
    _npz(p, header=_header(), node_units=np.arange(2), src=np.zeros(0, np.int64), dst=np.zeros(0, np.int64))


def _pickled(p):
    _npz(p, header=np.array([{"format": "connectome-npz"}], dtype=object))


def _text(p):
    p.write_text("source,target\na,b\n")


@pytest.mark.parametrize(
    "make, phrase",
    [
        (_random_bytes, "not a readable connectome file"),
        (_truncated, "may be truncated"),
        (_no_header, "no header"),
        (_other_format, "not a connectome file"),
        (_newer_version, "newer connectome"),
        (_missing_array, "missing the array 'weight'"),
        (_pickled, "not a readable connectome file"),
        (_text, "not a readable connectome file"),
    ],
)
def test_bad_files_raise_bad_file_error(tmp_path, make, phrase):
    p = tmp_path / "bad.npz"
    make(p)
    with pytest.raises(BadFileError, match=phrase) as info:
        cn.load(p)
    msg = str(info.value)
    assert "bad.npz" in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(BadFileError, match="no such file.*Connectome.save"):
        cn.load(tmp_path / "missing.npz")
    with pytest.raises(BadFileError, match="no such file"):
        cn.load(tmp_path)  # a folder is not a file


@pytest.mark.parametrize("member", ["header.npy", "node_units.npy", "weight.npy", "node.attribution.npy"])
def test_corrupted_compressed_data(g, tmp_path, member):
    p = tmp_path / "g.npz"
    g.save(p)
    data = bytearray(p.read_bytes())
    # Flip bytes inside one member's deflate stream (after its 30-byte local header, name and extra):
    # zipfile then raises zlib.error or a CRC error, never a clean read.
    with zipfile.ZipFile(p) as z:
        info = z.getinfo(member)
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", bytes(data[off + 26 : off + 30]))  # the local header's own lengths
    start = off + 30 + name_len + extra_len + 2
    for k in range(start, start + min(16, info.compress_size - 4)):
        data[k] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BadFileError, match="g.npz") as exc:
        cn.load(p)
    assert "\n" not in str(exc.value)


def test_inconsistent_arrays_in_file(tmp_path):
    p = tmp_path / "bad.npz"
    _npz(p, header=_header(), node_units=np.arange(5), src=np.zeros(0, np.int64), dst=np.zeros(0, np.int64),
         weight=np.zeros(0))
    with pytest.raises(BadFileError, match="bad.npz"):
        cn.load(p)


def test_json_list_header_is_a_bad_file(tmp_path):
    p = tmp_path / "bad.npz"
    _npz(p, header=np.array("[1, 2]"))
    with pytest.raises(BadFileError, match="bad.npz"):
        cn.load(p)


# ---------------------------------------------------------------------- GraphML / GEXF
def _expected_edges(g: Connectome) -> dict[tuple[str, str], float]:
    ids = g.node_ids
    return {(ids[s], ids[d]): float(w) for s, d, w in zip(g.src, g.dst, g.weight.astype(np.float64))}


def test_graphml_read_back_by_networkx(g, tmp_path):
    p = tmp_path / "g.graphml"
    cio.write_graphml(g, p)
    G = nx.read_graphml(p)
    assert isinstance(G, nx.DiGraph)
    assert list(G.nodes) == g.node_ids.tolist()
    expected = _expected_edges(g)
    assert set(G.edges) == set(expected)
    for (s, d), w in expected.items():
        e = G.edges[s, d]
        assert e["weight"] == abs(w) and e["signed_weight"] == w
        assert e["abs_weight"] == pytest.approx(1.5 * abs(w), rel=1e-7)
    n = G.nodes["logits:0"]
    assert n["label"] == "cat & <dog>" and n["layer"] == "logits" and n["kind"] == "output" and n["index"] == 0
    for k in ("x", "y", "size", "r", "g", "b"):
        assert k in n
    got = np.array([G.nodes[i]["attribution"] for i in g.node_ids])
    np.testing.assert_array_equal(got, g.node_attr("attribution"))
    am = [G.nodes[i]["activation_max"] for i in g.node_ids[:2]]
    assert np.isnan(am[0]) and am[1] == np.inf
    assert json.loads(G.graph["meta"]) == g.meta


def test_graphml_read_back_by_igraph(g, tmp_path):
    p = tmp_path / "g.graphml"
    cio.write_graphml(g, p)
    G = ig.Graph.Read_GraphML(str(p))
    assert G.is_directed() and G.vcount() == g.num_nodes and G.ecount() == g.num_edges
    assert G.vs["id"] == g.node_ids.tolist()
    got = {(G.vs[e.source]["id"], G.vs[e.target]["id"]): (e["weight"], e["signed_weight"]) for e in G.es}
    assert got == {k: (abs(w), w) for k, w in _expected_edges(g).items()}
    assert G.vs["label"] == g.node_labels.tolist()
    np.testing.assert_array_equal(G.vs["community"], g.node_attr("community"))


def test_graphml_gephi_keys(g, tmp_path):
    p = tmp_path / "g.graphml"
    cio.write_graphml(g, p)
    ns = {"g": "http://graphml.graphdrawing.org/xmlns"}
    keys = ET.parse(p).getroot().findall("g:key", ns)
    node_keys = {k.get("attr.name"): k.get("attr.type") for k in keys if k.get("for") == "node"}
    edge_keys = {k.get("attr.name"): k.get("attr.type") for k in keys if k.get("for") == "edge"}
    for k in ("x", "y", "size"):
        assert node_keys[k] in ("double", "float")
    for k in ("r", "g", "b"):
        assert node_keys[k] in ("int", "long")
    assert node_keys["label"] == "string"
    assert edge_keys["weight"] == "double" and edge_keys["signed_weight"] == "double"
    G = nx.read_graphml(p)
    for _, d in G.nodes(data=True):
        assert all(0 <= d[c] <= 255 for c in "rgb") and d["size"] > 0
    # Layers are laid out left to right.
    xs = [G.nodes[f"{l}:0"]["x"] for l in g.layer_names]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_gexf_read_back_by_networkx(g, tmp_path):
    p = tmp_path / "g.gexf"
    cio.write_gexf(g, p)
    G = nx.read_gexf(p)
    assert G.is_directed()
    assert sorted(G.nodes) == sorted(g.node_ids.tolist())
    expected = _expected_edges(g)
    assert set(G.edges) == set(expected)
    for (s, d), w in expected.items():
        e = G.edges[s, d]
        assert float(e["weight"]) == abs(w) and float(e["signed_weight"]) == w
    n = G.nodes["logits:0"]
    assert n["label"] == "cat & <dog>" and n["layer"] == "logits"
    assert {"position", "color", "size"} <= set(n["viz"])
    assert set(n["viz"]["color"]) >= {"r", "g", "b"}
    got = np.array([float(G.nodes[i]["attribution"]) for i in g.node_ids])
    np.testing.assert_array_equal(got, g.node_attr("attribution"))


def test_export_into_missing_folder(g, tmp_path):
    for writer in (cio.write_graphml, cio.write_gexf):
        with pytest.raises(ExportError, match="does not exist"):
            writer(g, tmp_path / "missing" / "g.xml")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["x", "label", "size", "r"])
def test_export_attribute_colliding_with_gephi_key(g, tmp_path, name):
    h = g.with_node_attrs(**{name: np.ones(g.num_nodes)})
    with pytest.raises(ExportError, match=f"'{name}' collides"):
        cio.write_graphml(h, tmp_path / "g.graphml")
    assert listing(tmp_path) == []


def test_export_needs_a_connectome(tmp_path):
    with pytest.raises(ExportError, match="expected a Connectome"):
        cio.write_graphml({"not": "a graph"}, tmp_path / "g.graphml")


def test_community_colours(g, tmp_path):
    rgb = cio.node_colors(g)
    assert rgb.shape == (g.num_nodes, 3) and rgb.min() >= 0 and rgb.max() <= 255
    comm = g.node_attr("community")
    for c in np.unique(comm):  # one colour per community
        assert len({tuple(x) for x in rgb[comm == c]}) == 1
    assert len({tuple(x) for x in rgb}) == len(np.unique(comm))


# ---------------------------------------------------------------------- a real model
@pytest.mark.slow
def test_pruned_resnet50_round_trips(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet50(weights=None)
    full = cn.extract.weights(m, (3, 64, 64))
    g = full.prune(top_k=4)
    assert g.num_nodes == full.num_nodes
    # top_k=4 keeps min(4, in-degree) edges per unit.
    indeg = np.bincount(full.dst, minlength=full.num_nodes)
    assert g.num_edges == int(np.minimum(indeg, 4).sum())
    g.save(tmp_path / "r50.npz")
    assert cn.load(tmp_path / "r50.npz").equals(g)
    cio.write_graphml(g, tmp_path / "r50.graphml")
    G = ig.Graph.Read_GraphML(str(tmp_path / "r50.graphml"))
    assert G.vcount() == g.num_nodes and G.ecount() == g.num_edges
    assert G.vs["id"][:3] == g.node_ids[:3].tolist() and G.vs["id"][-1] == "logits:999"
    np.testing.assert_array_equal(np.asarray(G.es["signed_weight"]), g.weight.astype(np.float64))


# ---------------------------------------------------------------------- hostile and damaged files
def _npy_bytes(arr: np.ndarray, shape=None) -> bytes:
    """An .npy member; with ``shape`` its header declares that shape whatever data follows."""
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    if shape is None:
        return data
    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                                "fortran_order": False, "shape": shape})
    return buf.getvalue() + data[len(data) - arr.nbytes:]


def _zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _graph_members(g: Connectome, tmp_path) -> dict[str, bytes]:
    """The members Connectome.save writes, as bytes (to be tampered with)."""
    g.save(tmp_path / "orig.npz")
    with zipfile.ZipFile(tmp_path / "orig.npz") as z:
        out = {name: z.read(name) for name in z.namelist()}
    os.unlink(tmp_path / "orig.npz")
    return out


def test_load_reads_only_the_arrays_the_format_defines(g, tmp_path):
    """A small file with a large extra member must not cost the extra member's memory."""
    import tracemalloc

    members = _graph_members(g, tmp_path)
    members["junk.npy"] = _npy_bytes(np.zeros(64 << 20, np.uint8))  # 64 MB, compresses to ~64 kB
    p = tmp_path / "g.npz"
    _zip(p, members)
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        h = cn.load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.equals(g)
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("member, shape", [("node_units.npy", (10**12,)), ("src.npy", (10**12,)),
                                           ("weight.npy", (10**6, 10**6)), ("node.attribution.npy", (10**11,))])
def test_load_checks_declared_shapes_before_allocating(g, tmp_path, member, shape):
    members = _graph_members(g, tmp_path)
    arr = np.load(__import__("io").BytesIO(members[member]))
    members[member] = _npy_bytes(arr, shape=shape)
    p = tmp_path / "g.npz"
    _zip(p, members)
    with pytest.raises(BadFileError, match="g.npz") as exc:
        cn.load(p)
    assert "\n" not in str(exc.value)


def test_load_refuses_a_header_implying_more_than_the_file_can_hold(tmp_path):
    """A header may describe a huge graph; the arrays must then really be in the file."""
    big = 10**11
    header = np.array(json.dumps({"format": "connectome-npz", "version": 1,
                                  "layers": [{"name": "input", "kind": "input", "size": big}],
                                  "meta": {}, "node_attrs": [], "edge_attrs": []}))
    p = tmp_path / "big.npz"
    _zip(p, {"header.npy": _npy_bytes(header), "node_units.npy": _npy_bytes(np.zeros(4, np.int64), shape=(big,))})
    with pytest.raises(BadFileError, match="big.npz"):
        cn.load(p)


def _plain_npy(p):
    np.save(p.with_suffix(".npy"), np.arange(5))
    p.with_suffix(".npy").rename(p)


def _deep_header(p):
    _npz(p, header=np.array('{"format": "connectome-npz", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"))


def _header_text(text):
    def make(p):
        _npz(p, header=np.array(text), node_units=np.arange(2), src=np.zeros(0, np.int64), dst=np.zeros(0, np.int64),
             weight=np.zeros(0))
    return make


def _header_with(**over):
    def make(p):
        _npz(p, header=_header(**over), node_units=np.arange(2), src=np.zeros(0, np.int64), dst=np.zeros(0, np.int64),
             weight=np.zeros(0))
    return make


_INPUT = {"name": "input", "kind": "input", "size": 2}


@pytest.mark.parametrize(
    "make",
    [
        _plain_npy,
        _deep_header,
        _header_with(version="2"),
        _header_with(version=True),
        _header_with(layers={"name": "input"}),
        _header_with(layers=["input"]),
        _header_text('{"format": "connectome-npz", "version": 1, "layers": [{"name": "input", "size": Infinity}], '
                     '"meta": {}, "node_attrs": [], "edge_attrs": []}'),
        _header_with(layers=[{**_INPUT, "size": 2.5}]),
        _header_with(layers=[{**_INPUT, "size": -1}]),
        _header_with(layers=[{**_INPUT, "name": 7}]),
        _header_with(layers=[{**_INPUT, "labels": "ab"}]),
        _header_with(layers=[{**_INPUT, "labels": [1, 2]}]),
        _header_with(layers=[_INPUT, _INPUT]),
        _header_with(meta=[1, 2]),
        _header_with(node_attrs="attribution"),
        _header_with(edge_attrs=[1]),
        _header_with(node_attrs=["a", "a"]),
        _header_with(layers=[{**_INPUT, "name": "in\ud800put"}]),  # a lone surrogate: matplotlib's TypeError in report
        _header_with(layers=[{**_INPUT, "kind": "\udcff"}]),
    ],
    ids=["plain-npy", "deep", "version-str", "version-bool", "layers-object", "layer-str", "size-infinity",
         "size-float", "size-negative", "name-int", "labels-str", "labels-int", "duplicate-layer", "meta-list",
         "node-attrs-str", "edge-attrs-int", "node-attrs-duplicate", "name-surrogate", "kind-surrogate"],
)
def test_damaged_headers_are_bad_files(tmp_path, make):
    p = tmp_path / "bad.npz"
    make(p)
    with pytest.raises(BadFileError, match="bad.npz") as exc:
        cn.load(p)
    assert "\n" not in str(exc.value)


def test_many_duplicate_layer_names_are_refused(tmp_path):
    layers = [{"name": f"l{i % 50_000}", "kind": "conv", "size": 0} for i in range(100_000)]
    p = tmp_path / "dup.npz"
    _npz(p, header=_header(layers=layers), node_units=np.zeros(0, np.int64), src=np.zeros(0, np.int64),
         dst=np.zeros(0, np.int64), weight=np.zeros(0))
    with pytest.raises(BadFileError, match="'l0' appears twice"):
        cn.load(p)


# ---------------------------------------------------------------------- XML-safe text
_NASTY = "a\x00b\x01\x08\x0b\x0c\x0e\x1f\ufffe\uffff\udcff|\t\n\r\r\n<&>\"'"


def _nasty_graph() -> Connectome:
    return Connectome.from_edges(
        [Layer("in\x01put", "input", 2, labels=(_NASTY, "plain")), Layer("fc\udcff", "linear", 1),
         Layer("logits", "output", 2, labels=("x\uffffy", "carriage\rreturn"))],
        edges=[("in\x01put:0", "fc\udcff:0", 0.5), ("in\x01put:1", "fc\udcff:0", -1.0), ("fc\udcff:0", "logits:0", 2.0),
               ("fc\udcff:0", "logits:1", -0.25)],
        meta={"category": "c\x00\udcff\r"},
        node_attrs={"note\x02": np.arange(5.0)},
    )


def _expected_text(s: str) -> str:
    return cio.xml_safe(s)


@pytest.mark.parametrize("writer", ["graphml", "gexf"])
def test_export_is_well_formed_whatever_the_names(tmp_path, writer):
    g = _nasty_graph()
    p = tmp_path / f"g.{writer}"
    getattr(cio, f"write_{writer}")(g, p)
    root = ET.parse(p).getroot()  # a strict XML 1.0 parser: refuses any forbidden character
    text = "".join(root.itertext()) + "".join(v for el in root.iter() for v in el.attrib.values())
    assert "\ufffd" in text
    G = nx.read_graphml(p) if writer == "graphml" else nx.read_gexf(p)
    ids = [cio.xml_safe(i) for i in g.node_ids.tolist()]
    assert sorted(G.nodes) == sorted(ids)
    # CR, LF, tab, '<&>' and quotes travel unchanged; only what XML cannot carry became U+FFFD
    assert G.nodes[ids[0]]["label"] == _expected_text(_NASTY)
    assert G.nodes[ids[0]]["label"] == "a\ufffdb" + "\ufffd" * 9 + "|\t\n\r\r\n<&>\"'"  # spelled out, not xml_safe's
    assert G.nodes[ids[-1]]["label"] == "carriage\rreturn"
    assert G.nodes[ids[-2]]["label"] == "x\ufffdy"
    assert G.number_of_edges() == 4


def test_graphml_meta_survives_with_control_characters(tmp_path):
    g = _nasty_graph()
    cio.write_graphml(g, tmp_path / "g.graphml")
    G = nx.read_graphml(tmp_path / "g.graphml")
    assert json.loads(G.graph["meta"]) == g.meta  # JSON escapes them itself


def test_export_refuses_names_that_would_merge(tmp_path):
    g = Connectome.from_edges([Layer("a\x01", "input", 1), Layer("a\x02", "output", 1)], edges=[("a\x01:0", "a\x02:0", 1.0)])
    with pytest.raises(ExportError, match="differ only in characters XML"):
        cio.write_graphml(g, tmp_path / "g.graphml")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------- temp files, permissions, links
def _child_env() -> dict[str, str]:
    """The environment of a child Python that imports this checkout of connectome."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


def _kill_during_write(path) -> None:
    """Start a writer in another process and kill -9 it in the middle of the write."""
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "from connectome.io import atomic_write\n"
            "with atomic_write(sys.argv[1]) as fh:\n"
            "    fh.write(b'half a file'); fh.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = _child_env()
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True)
    assert r.returncode == -9, r.stderr


def _age(folder, seconds: float) -> None:
    for f in os.listdir(folder):
        st = os.stat(folder / f)
        os.utime(folder / f, (st.st_atime - seconds, st.st_mtime - seconds))


@pytest.mark.skipif(os.name != "posix", reason="kill -9 and process probes are POSIX")
def test_stale_temp_files_of_killed_writers_are_removed(g, tmp_path):
    for _ in range(2):
        _kill_during_write(tmp_path / "g.npz")
    left = listing(tmp_path)
    assert len(left) == 2 and all(f.startswith(".g.npz.") and f.endswith(".tmp") for f in left), left
    _age(tmp_path, 2 * cio.STALE_AFTER_S)
    (tmp_path / ".mine.tmp").write_text("not ours")  # a file we did not name is never touched
    g.save(tmp_path / "other.npz")  # any later write into the folder cleans up
    assert listing(tmp_path) == [".mine.tmp", "other.npz"]


@pytest.mark.skipif(os.name != "posix", reason="process probes are POSIX")
def test_temp_file_of_a_live_writer_is_kept(g, tmp_path):
    import subprocess
    import sys

    code = ("import sys\n"
            "from connectome.io import atomic_write\n"
            "with atomic_write(sys.argv[1]) as fh:\n"
            "    fh.write(b'data'); fh.flush()\n"
            "    print('writing', flush=True); sys.stdin.readline()\n")
    env = _child_env()
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "slow.npz")], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        _age(tmp_path, 2 * cio.STALE_AFTER_S)  # old, but its writer is alive
        g.save(tmp_path / "g.npz")
        assert len([f for f in listing(tmp_path) if f.startswith(".slow.npz.")]) == 1
    finally:
        proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0
    assert listing(tmp_path) == ["g.npz", "slow.npz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_overwrite_keeps_permissions(g, tmp_path):
    p = tmp_path / "g.npz"
    make_graph(1).save(p)
    os.chmod(p, 0o640)
    g.save(p)
    assert (os.stat(p).st_mode & 0o777) == 0o640
    cio.write_graphml(g, tmp_path / "g.graphml")
    os.chmod(tmp_path / "g.graphml", 0o604)
    cio.write_graphml(g, tmp_path / "g.graphml")
    assert (os.stat(tmp_path / "g.graphml").st_mode & 0o777) == 0o604


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_writing_through_a_symlink_writes_its_target(g, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "g.npz"
    make_graph(1).save(target)
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    g.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert cn.load(target).equals(g)
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "real" / "new.npz")
    g.save(dangling)  # like open(): the link's target is created
    assert dangling.is_symlink() and cn.load(tmp_path / "real" / "new.npz").equals(g)
    assert listing(tmp_path / "real") == ["g.npz", "new.npz"]


def test_long_file_names_within_the_limit_can_be_written(g, tmp_path):
    name = "a" * 250 + ".npz"  # 254 bytes: a legal name, but too long to prefix and suffix for a temp file
    g.save(tmp_path / name)
    assert listing(tmp_path) == [name]
    assert cn.load(tmp_path / name).equals(g)



def test_gephi_community_colours_are_the_figures_colours():
    from connectome.palette import community_rgb

    g = make_graph()
    labels = np.arange(g.num_nodes) % 4
    g = g.with_node_attrs(community=labels.astype(np.float64))
    expect = np.clip(np.round(np.asarray(community_rgb(labels)) * 255), 0, 255).astype(np.int64)
    np.testing.assert_array_equal(cio.node_colors(g), expect)


def test_kind_colours_follow_the_kinds_table(monkeypatch):
    """Hue and saturation both come from connectome/kinds.py (the saturation was a second,
    hard-coded table: 0.55, or 0 for the image); a kind outside the table is drawn quieter."""
    import colorsys

    from connectome import kinds

    g = Connectome.from_edges([("x", "input", 2), ("c", "conv", 2), ("grp", "group", 1), ("o", "output", 2)],
                              [("x:0", "c:0", 1.0), ("c:1", "grp:0", 1.0), ("grp:0", "o:1", 1.0)])
    hsv = {"input": (0.0, 0.0), "conv": (0.58, 0.55), "group": (0.0, 0.3), "output": (0.95, 0.55)}
    expect = [colorsys.hsv_to_rgb(*hsv[l.kind], 0.85) for l in g.layers for _ in range(l.size)]
    np.testing.assert_array_equal(cio.node_colors(g), np.round(np.asarray(expect) * 255).astype(np.int64))
    monkeypatch.setitem(kinds.KINDS, "conv", kinds.KindInfo("conv", kinds.DENSE, True, 0.58, 1.0))
    assert cio.node_colors(g)[2].tolist() == np.round(np.asarray(colorsys.hsv_to_rgb(0.58, 1.0, 0.85)) * 255).tolist()


def test_a_folder_is_scanned_for_stale_temps_once_per_interval(g, tmp_path, monkeypatch):
    """Writing n files into one folder (export --examples: one per unit) scanned the whole folder
    per file, quadratic in n; now once per STALE_AFTER_S, the age a temp file needs to be stale."""
    scans = []
    real = _files._remove_stale_temps
    monkeypatch.setattr(_files, "_remove_stale_temps", lambda folder: scans.append(folder) or real(folder))
    for i in range(20):
        with cio.atomic_write(tmp_path / f"u{i}.bin", "wb") as fh:
            fh.write(b"x")
    assert len(scans) == 1
    monkeypatch.setitem(_files._LAST_SCAN, str(tmp_path.resolve()), -cio.STALE_AFTER_S - 1.0)  # long ago
    g.save(tmp_path / "g.npz")
    assert len(scans) == 2
