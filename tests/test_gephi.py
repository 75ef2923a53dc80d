"""Reading GraphML/GEXF back, as connectome and as Gephi (0.9-0.10 exporters) write them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pytest

from connectome import gephi, io
from connectome.errors import BadFileError, ConnectomeError
from connectome.graph import Connectome, Layer


@pytest.fixture(scope="module")
def g() -> Connectome:
    rng = np.random.default_rng(0)
    sizes = [3, 5, 4, 2]
    off = np.r_[0, np.cumsum(sizes)]
    src, dst = [], []
    for lj in range(1, len(sizes)):
        for li in range(lj):
            i, j = np.nonzero(rng.random((sizes[li], sizes[lj])) < (0.8 if li == lj - 1 else 0.2))
            src.append(i + off[li])
            dst.append(j + off[lj])
    src, dst = np.concatenate(src), np.concatenate(dst)
    layers = (Layer("input", "input", 3), Layer("conv1", "conv", 5), Layer("layer1.add", "residual", 4),
              Layer("logits", "output", 2, ("tabby cat", "tiger")))
    return Connectome(layers=layers, node_units=np.concatenate([np.arange(s) for s in sizes]), src=src, dst=dst,
                      weight=rng.normal(size=src.size),
                      node_attrs={"attribution": rng.normal(size=off[-1]), "community": rng.integers(0, 3, off[-1])},
                      meta={"model": "toy", "category": "tiger"})


def _same_graph(a: Connectome, b: Connectome) -> None:
    assert a.layers == b.layers
    assert a.node_ids.tolist() == b.node_ids.tolist()
    assert (a.src.tolist(), a.dst.tolist()) == (b.src.tolist(), b.dst.tolist())
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-6)
    for k in ("attribution", "community"):
        np.testing.assert_allclose(a.node_attr(k), b.node_attr(k), rtol=1e-6)
    assert b.node_attr("community").dtype.kind == "i"


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_connectomes_own_files_read_back(g, tmp_path, ext):
    path = tmp_path / f"g.{ext}"
    (io.write_graphml if ext == "graphml" else io.write_gexf)(g, path)
    back = gephi.read(path)
    _same_graph(g, back)
    assert back.meta["read_from"] == str(path)
    if ext == "graphml":  # GraphML carries meta as graph data
        assert back.meta["model"] == "toy" and back.meta["category"] == "tiger"


def _gephi_nodes(g: Connectome, order: np.ndarray):
    """Per node in Gephi's order: index, quoted id, label, layer, kind, unit, attribution, community."""
    ids, labels = g.node_ids, g.node_labels
    attribution, community = g.node_attr("attribution"), g.node_attr("community")
    for i in order.tolist():
        layer = g.layers[g.node_layer[i]]
        yield i, quoteattr(str(ids[i])), str(labels[i]), layer.name, layer.kind, g.node_units[i], float(attribution[i]), community[i]


def _gephi_graphml(g: Connectome, path: Path, order: np.ndarray, x: np.ndarray, extra: dict) -> None:
    """What Gephi's ExporterGraphML writes for a graph imported from connectome's GraphML
    (keys label/Edge Label/weight/Edge Id/r/g/b/x/y/size, then the table columns)."""
    ids = g.node_ids
    lines = ['<?xml version="1.0" encoding="UTF-8" standalone="yes"?>',
             '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">',
             '<key attr.name="label" attr.type="string" for="node" id="label"/>',
             '<key attr.name="Edge Label" attr.type="string" for="edge" id="edgelabel"/>',
             '<key attr.name="weight" attr.type="double" for="edge" id="weight"/>',
             '<key attr.name="Edge Id" attr.type="string" for="edge" id="edgeid"/>',
             *[f'<key attr.name="{c}" attr.type="int" for="node" id="{c}"/>' for c in "rgb"],
             *[f'<key attr.name="{c}" attr.type="float" for="node" id="{c}"/>' for c in ("x", "y", "size")],
             '<key attr.name="layer" attr.type="string" for="node" id="layer"/>',
             '<key attr.name="kind" attr.type="string" for="node" id="kind"/>',
             '<key attr.name="index" attr.type="long" for="node" id="index"/>',
             '<key attr.name="attribution" attr.type="double" for="node" id="attribution"/>',
             '<key attr.name="community" attr.type="long" for="node" id="community"/>',
             '<key attr.name="Modularity Class" attr.type="int" for="node" id="modularity_class"/>',
             '<key attr.name="signed_weight" attr.type="double" for="edge" id="signed_weight"/>',
             '<graph edgedefault="directed">']
    for i, nid, label, layer, kind, unit, attribution, community in _gephi_nodes(g, order):
        lines.append(
            f"<node id={nid}><data key=\"label\">{escape(label)}</data>"
            f"<data key=\"layer\">{layer}</data><data key=\"kind\">{kind}</data>"
            f"<data key=\"index\">{unit}</data><data key=\"attribution\">{attribution!r}</data>"
            f"<data key=\"community\">{community}</data>"
            f"<data key=\"modularity_class\">{extra['modularity_class'][i]}</data>"
            f"<data key=\"size\">10.0</data><data key=\"r\">153</data><data key=\"g\">0</data><data key=\"b\">0</data>"
            f"<data key=\"x\">{float(x[i])!r}</data><data key=\"y\">{float(i)!r}</data></node>")
    for e in np.random.default_rng(1).permutation(g.num_edges).tolist():
        lines.append(
            f"<edge source={quoteattr(str(ids[g.src[e]]))} target={quoteattr(str(ids[g.dst[e]]))}>"
            f"<data key=\"edgeid\">{e}</data><data key=\"weight\">{abs(float(g.weight[e]))!r}</data>"
            f"<data key=\"signed_weight\">{float(g.weight[e])!r}</data></edge>")
    lines += ["</graph>", "</graphml>"]
    path.write_text("\n".join(lines), encoding="utf-8")


def _gephi_gexf(g: Connectome, path: Path, order: np.ndarray, x: np.ndarray) -> None:
    """What Gephi's ExporterGEXF (0.9, GEXF 1.3) writes."""
    ids = g.node_ids
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<gexf xmlns="http://www.gexf.net/1.3" version="1.3" xmlns:viz="http://www.gexf.net/1.3/viz" '
             'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
             'xsi:schemaLocation="http://www.gexf.net/1.3 http://www.gexf.net/1.3/gexf.xsd">',
             '<meta lastmodifieddate="2024-05-01"><creator>Gephi 0.10.1</creator><description></description></meta>',
             '<graph defaultedgetype="directed" mode="static">',
             '<attributes class="node" mode="static">',
             '<attribute id="layer" title="layer" type="string"/><attribute id="kind" title="kind" type="string"/>',
             '<attribute id="index" title="index" type="long"/><attribute id="attribution" title="attribution" type="double"/>',
             '<attribute id="community" title="community" type="long"/>',
             '</attributes>',
             '<attributes class="edge" mode="static"><attribute id="signed_weight" title="signed_weight" type="double"/></attributes>',
             '<nodes>']
    for i, nid, label, layer, kind, unit, attribution, community in _gephi_nodes(g, order):
        lines.append(
            f"<node id={nid} label={quoteattr(label)}><attvalues>"
            f"<attvalue for=\"layer\" value=\"{layer}\"/><attvalue for=\"kind\" value=\"{kind}\"/>"
            f"<attvalue for=\"index\" value=\"{unit}\"/>"
            f"<attvalue for=\"attribution\" value=\"{attribution!r}\"/>"
            f"<attvalue for=\"community\" value=\"{community}\"/></attvalues>"
            f"<viz:size value=\"10.0\"/><viz:position x=\"{float(x[i])!r}\" y=\"{float(i)!r}\"/>"
            f"<viz:color r=\"153\" g=\"0\" b=\"0\"/></node>")
    lines.append("</nodes><edges>")
    for e in np.random.default_rng(2).permutation(g.num_edges).tolist():
        lines.append(
            f"<edge id=\"{e}\" source={quoteattr(str(ids[g.src[e]]))} target={quoteattr(str(ids[g.dst[e]]))} "
            f"weight=\"{abs(float(g.weight[e]))!r}\"><attvalues><attvalue for=\"signed_weight\" "
            f"value=\"{float(g.weight[e])!r}\"/></attvalues></edge>")
    lines += ["</edges>", "</graph>", "</gexf>"]
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_files_written_by_gephi_after_a_layout(g, tmp_path, ext):
    rng = np.random.default_rng(3)
    order = rng.permutation(g.num_nodes)  # Gephi's own node order
    x = rng.normal(size=g.num_nodes) * 100  # a force layout moved every node
    path = tmp_path / f"gephi.{ext}"
    if ext == "graphml":
        _gephi_graphml(g, path, order, x, {"modularity_class": np.arange(g.num_nodes) % 4})
    else:
        _gephi_gexf(g, path, order, x)
    back = gephi.read(path)
    _same_graph(g, back)  # the layer order comes from the edges, labels from "label"
    if ext == "graphml":  # Gephi's computed columns come along
        np.testing.assert_array_equal(back.node_attr("Modularity Class"), np.arange(g.num_nodes) % 4)


def test_a_graph_filtered_in_gephi(g, tmp_path):
    keep = np.ones(g.num_nodes, dtype=bool)
    keep[[1, g.index_of("conv1:3"), g.index_of("logits:0")]] = False
    sub = g.subgraph(g.node_ids[keep])
    path = tmp_path / "filtered.graphml"
    _gephi_graphml(sub, path, np.arange(sub.num_nodes), sub.node_layer * 200.0,
                   {"modularity_class": np.zeros(sub.num_nodes, dtype=int)})
    back = gephi.read_graphml(path)
    assert back.node_ids.tolist() == sub.node_ids.tolist()
    assert back.layer("logits").labels == ("tiger",)
    np.testing.assert_allclose(back.weight, sub.weight, rtol=1e-6)


def test_layer_order_ties_follow_x(tmp_path):
    # two layers without edges between them: the layout's x decides
    g = Connectome.from_edges([("a", "input", 1), ("b", "conv", 1), ("c", "conv", 1), ("d", "output", 1)],
                              [("a:0", "b:0", 1.0), ("a:0", "c:0", 2.0), ("b:0", "d:0", 1.0), ("c:0", "d:0", -1.0)],
                              node_attrs={"attribution": np.zeros(4), "community": np.zeros(4, dtype=int)})
    path = tmp_path / "t.graphml"
    swapped = np.array([0.0, 400.0, 200.0, 600.0])  # c drawn left of b
    _gephi_graphml(g, path, np.arange(4), swapped, {"modularity_class": np.zeros(4, dtype=int)})
    assert gephi.read_graphml(path).layer_names == ["a", "c", "b", "d"]


def test_bad_files(tmp_path, g):
    with pytest.raises(BadFileError, match="does not exist"):
        gephi.read_graphml(tmp_path / "none.graphml")
    (tmp_path / "junk.gexf").write_text("not xml")
    with pytest.raises(BadFileError, match="GEXF"):
        gephi.read_gexf(tmp_path / "junk.gexf")
    with pytest.raises(ValueError, match="graphml or .gexf"):
        gephi.read(tmp_path / "g.csv")
    import networkx as nx

    G = nx.Graph()
    G.add_edge("in:0", "out:0")
    nx.write_graphml(G, tmp_path / "u.graphml")
    with pytest.raises(ConnectomeError, match="undirected"):
        gephi.read_graphml(tmp_path / "u.graphml")
    H = nx.DiGraph()
    H.add_edge("alpha", "beta")
    nx.write_graphml(H, tmp_path / "ids.graphml")
    with pytest.raises(ConnectomeError, match="'<layer>:<unit>'"):
        gephi.read_graphml(tmp_path / "ids.graphml")
    H = nx.DiGraph()
    H.add_edge("a:0", "b:0")
    H.add_edge("b:0", "a:1")
    nx.write_graphml(H, tmp_path / "cycle.graphml")
    with pytest.raises(ConnectomeError, match="cycle"):
        gephi.read_graphml(tmp_path / "cycle.graphml")


def test_graphml_key_defaults_types_and_graph_data(tmp_path):
    path = tmp_path / "d.graphml"
    path.write_text(
        '<?xml version="1.0"?><graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
        '<key id="m" for="graph" attr.name="meta" attr.type="string"/>'
        '<key id="s" for="node" attr.name="score" attr.type="double"><default>0.5</default></key>'
        '<key id="c" for="node" attr.name="community" attr.type="int"/>'
        '<key id="w" for="edge" attr.name="weight" attr.type="float"/>'
        '<key id="f" for="edge" attr.name="flag" attr.type="boolean"/>'
        '<graph edgedefault="directed"><data key="m">{"model": "m1"}</data>'
        '<node id="in:0"><data key="c">1</data></node><node id="in:1"><data key="s">2.0</data><data key="c">0</data></node>'
        '<node id="out:0"><data key="c">1</data></node>'
        '<edge source="in:0" target="out:0"><data key="w">-1.5</data><data key="f">true</data></edge>'
        '<edge source="in:1" target="out:0"><data key="w">2</data><data key="f">false</data></edge>'
        '</graph></graphml>')
    g = gephi.read_graphml(path)
    assert g.layer_names == ["in", "out"] and g.meta["model"] == "m1"
    assert g.node_attr("score").tolist() == [0.5, 2.0, 0.5]  # the key's default where a node has none
    assert g.node_attr("community").tolist() == [1, 0, 1] and g.node_attr("community").dtype.kind == "i"
    assert sorted(g.weight.tolist()) == [-1.5, 2.0]
    assert sorted(g.edge_attr("flag").tolist()) == [0.0, 1.0]


def test_hand_edited_values_and_duplicate_units_are_bad_files(tmp_path):
    """A non-integer index or a non-numeric weight was a bare ValueError from deep inside the
    reader; two nodes claiming one (layer, index) were read as a graph with repeated ids."""
    import networkx as nx

    H = nx.DiGraph()
    H.add_node("n0", layer="a", index="zero")
    H.add_node("n1", layer="b", index=0)
    H.add_edge("n0", "n1")
    nx.write_graphml(H, tmp_path / "index.graphml")
    with pytest.raises(BadFileError, match="wrong type.*export it again") as err:
        gephi.read_graphml(tmp_path / "index.graphml")
    assert "\n" not in str(err.value)
    H = nx.DiGraph()
    H.add_edge("a:0", "b:0", signed_weight="heavy")
    nx.write_graphml(H, tmp_path / "weight.graphml")
    with pytest.raises(BadFileError, match="wrong type"):
        gephi.read_graphml(tmp_path / "weight.graphml")
    H = nx.DiGraph()
    H.add_node("x", layer="a", index=0)
    H.add_node("y", layer="a", index=0)
    H.add_node("z", layer="b", index=0)
    H.add_edges_from([("x", "z"), ("y", "z")])
    nx.write_graphml(H, tmp_path / "dup.graphml")
    with pytest.raises(BadFileError, match="both unit 0 of layer 'a'"):
        gephi.read_graphml(tmp_path / "dup.graphml")


# ----------------------------------------------------------------------------- hand-edited ids
def _edited(g: Connectome, tmp_path: Path, ext: str, edit) -> Path:
    """``g`` written by connectome, then edited as text by ``edit(lines) -> lines``."""
    path = tmp_path / f"edited.{ext}"
    (io.write_graphml if ext == "graphml" else io.write_gexf)(g, path)
    path.write_text("\n".join(edit(path.read_text(encoding="utf-8").split("\n"))), encoding="utf-8")
    return path


def _node_line(lines: list[str], node_id: str) -> int:
    return next(i for i, s in enumerate(lines) if f"<node id={quoteattr(node_id)}" in s)


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_a_repeated_node_id_is_refused(g, tmp_path, ext):
    """GEXF merged the two nodes silently (networkx keeps the last); GraphML kept both rows."""
    def repeat(lines):
        i = _node_line(lines, "conv1:2")
        return lines[: i + 1] + [lines[i]] + lines[i + 1 :]

    with pytest.raises(BadFileError, match=r"edited\.%s.*declares node 'conv1:2' twice" % ext) as err:
        gephi.read(_edited(g, tmp_path, ext, repeat))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_an_edge_to_an_undeclared_node_is_refused(g, tmp_path, ext):
    """read_gexf invented the node (and, for a new layer name, the layer); read_graphml refused it
    with another message and another error class."""
    e = int(np.flatnonzero(g.dst == g.index_of("logits:1"))[0])

    def retarget(lines):  # the edge goes to "ghost:7" instead, and no node ghost:7 exists
        target = f"target={quoteattr('logits:1')}"
        i = next(i for i, s in enumerate(lines) if f"source={quoteattr(str(g.node_ids[g.src[e]]))}" in s
                 and target in s)
        return lines[:i] + [lines[i].replace(target, f"target={quoteattr('ghost:7')}")] + lines[i + 1 :]

    with pytest.raises(BadFileError, match="to node 'ghost:7', which the file does not declare"):
        gephi.read(_edited(g, tmp_path, ext, retarget))


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_a_long_repeated_node_id_is_clipped_in_the_message(tmp_path, ext):
    """The message quotes the id cut short: a file may hold an id of megabytes."""
    long_id = "a:" + "7" * 100_000
    nodes = f'<node id="{long_id}"/><node id="{long_id}"/><node id="b:0"/>'
    path = (_graphml(tmp_path, "", nodes) if ext == "graphml"
            else _gexf(tmp_path, "", nodes, ""))
    with pytest.raises(BadFileError, match=r"declares node 'a:7777.*\.\.\. twice") as err:
        gephi.read(path)
    assert len(str(err.value)) < 300


def _graphml(tmp_path: Path, keys: str, body: str, name: str = "t.graphml") -> Path:
    path = tmp_path / name
    path.write_text('<?xml version="1.0"?><graphml xmlns="http://graphml.graphdrawing.org/xmlns">' + keys
                    + f'<graph edgedefault="directed">{body}</graph></graphml>', encoding="utf-8")
    return path


def _gexf(tmp_path: Path, attributes: str, nodes: str, edges: str, name: str = "t.gexf") -> Path:
    path = tmp_path / name
    path.write_text('<?xml version="1.0"?><gexf xmlns="http://www.gexf.net/1.3" version="1.3">'
                    f'<graph defaultedgetype="directed"><attributes class="node">{attributes}</attributes>'
                    f'<nodes>{nodes}</nodes><edges>{edges}</edges></graph></gexf>', encoding="utf-8")
    return path


def _index_file(tmp_path: Path, ext: str, index: str) -> Path:
    """Nodes n0 (layer a, the given index) -> n1 (layer b, index 0), with layer/index columns."""
    if ext == "graphml":
        return _graphml(tmp_path, '<key id="l" for="node" attr.name="layer" attr.type="string"/>'
                                  '<key id="i" for="node" attr.name="index" attr.type="double"/>',
                        f'<node id="n0"><data key="l">a</data><data key="i">{index}</data></node>'
                        '<node id="n1"><data key="l">b</data><data key="i">0</data></node>'
                        '<edge source="n0" target="n1"/>')
    return _gexf(tmp_path, '<attribute id="l" title="layer" type="string"/>'
                           '<attribute id="i" title="index" type="double"/>',
                 f'<node id="n0"><attvalues><attvalue for="l" value="a"/><attvalue for="i" value="{index}"/>'
                 '</attvalues></node><node id="n1"><attvalues><attvalue for="l" value="b"/>'
                 '<attvalue for="i" value="0"/></attvalues></node>', '<edge id="0" source="n0" target="n1"/>')


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
@pytest.mark.parametrize("index, what", [("INF", "not a whole number"), ("NaN", "not a whole number"),
                                         ("1.5", "not a whole number"), ("1e30", "beyond a 64-bit integer")])
def test_an_index_column_that_is_not_an_int64_is_refused(tmp_path, ext, index, what):
    """index=inf was an OverflowError from int(); 1.5 was read as unit 1."""
    with pytest.raises(BadFileError, match=f"node 'n0' has the index .*{what}"):
        gephi.read(_index_file(tmp_path, ext, index))


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_an_over_long_index_in_a_node_id_is_refused(tmp_path, ext):
    """A unit index beyond int64 in an id was an OverflowError from numpy."""
    huge = str(1 << 70)
    if ext == "graphml":
        path = _graphml(tmp_path, "", f'<node id="a:0"/><node id="b:{huge}"/><edge source="a:0" target="b:{huge}"/>')
    else:
        path = _gexf(tmp_path, "", f'<node id="a:0"/><node id="b:{huge}"/>',
                     f'<edge id="0" source="a:0" target="b:{huge}"/>')
    with pytest.raises(BadFileError, match=f"b:{huge}' has the index {huge}, beyond a 64-bit integer"):
        gephi.read(path)


def test_deeply_nested_meta_is_a_bad_file(g, tmp_path):
    """json.loads raised RecursionError on meta nested 100,000 deep."""
    deep = "[" * 100_000 + "]" * 100_000

    def nest(lines):
        return [s if '<data key="g0">' not in s else f'    <data key="g0">{{"model": {deep}}}</data>' for s in lines]

    with pytest.raises(BadFileError, match="meta JSON is nested too deeply"):
        gephi.read_graphml(_edited(g, tmp_path, "graphml", nest))


def test_deeply_nested_gexf_nodes_are_a_bad_file(tmp_path):
    """GEXF nests nodes in nodes (a hierarchy) and networkx reads them recursively."""
    depth = 20_000
    path = _gexf(tmp_path, "", "".join(f'<node id="a:{i}"><nodes>' for i in range(depth))
                 + "</nodes></node>" * depth, "")
    with pytest.raises(BadFileError, match="RecursionError"):
        gephi.read_gexf(path)


def test_missing_values_are_nan_and_columns_keep_their_types(tmp_path):
    """The columns are built per column now (the per-node rebuild was quadratic): a node without
    a value gets NaN and turns an int column into floats, a full int or bool column keeps its type."""
    path = _graphml(tmp_path,
                    '<key id="c" for="node" attr.name="community" attr.type="int"/>'
                    '<key id="s" for="node" attr.name="score" attr.type="int"/>'
                    '<key id="h" for="node" attr.name="hub" attr.type="boolean"/>'
                    '<key id="t" for="node" attr.name="note" attr.type="string"/>',
                    '<node id="a:0"><data key="c">2</data><data key="s">5</data><data key="h">true</data>'
                    '<data key="t">x</data></node>'
                    '<node id="a:1"><data key="c">0</data><data key="h">false</data></node>'
                    '<node id="b:0"><data key="c">1</data><data key="s">-3</data><data key="h">true</data></node>'
                    '<edge source="a:0" target="b:0"/><edge source="a:1" target="b:0"/>')
    back = gephi.read_graphml(path)
    assert back.node_attr("community").tolist() == [2, 0, 1] and back.node_attr("community").dtype == np.int64
    np.testing.assert_array_equal(back.node_attr("score"), [5.0, np.nan, -3.0])
    assert back.node_attr("hub").tolist() == [True, False, True] and back.node_attr("hub").dtype == bool
    assert "note" not in back.node_attrs  # text columns are not data


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_non_finite_weights_are_read_as_they_are_with_a_warning(g, tmp_path, ext):
    """NaN and inf weights came back without a word; they still come back exactly, with a
    warning naming the file and the count per layer pair (node attributes: inf only)."""
    w = g.weight.copy()
    pick = {int(np.flatnonzero((g.node_layer[g.src] == 0) & (g.node_layer[g.dst] == 1))[k]): v
            for k, v in enumerate([np.nan, np.inf])}
    pick[int(np.flatnonzero(g.node_layer[g.dst] == 3)[0])] = -np.inf
    w[list(pick)] = list(pick.values())
    attribution = g.node_attr("attribution").copy()
    attribution[[0, 4]] = [np.inf, np.nan]  # NaN in a node column means "no value": not counted
    bad = dataclasses.replace(g, weight=w).with_node_attrs(attribution=attribution)
    path = tmp_path / f"nan.{ext}"
    (io.write_graphml if ext == "graphml" else io.write_gexf)(bad, path)
    with pytest.warns(UserWarning) as rec:
        back = gephi.read(path)
    msg = " ".join(str(r.message) for r in rec)
    src_layer = g.layers[int(g.node_layer[g.src[list(pick)[-1]]])].name
    assert f"{str(path)!r} holds non-finite values: 3 edge weights (input->conv1: 2, {src_layer}->logits: 1)" in msg
    assert "1 infinite values of node attribute 'attribution' (input: 1)" in msg
    np.testing.assert_array_equal(back.weight, w)  # NaN, inf and -inf read back as themselves
    np.testing.assert_array_equal(back.node_attr("attribution"), attribution)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was(g, tmp_path, enabled):
    """The readers pause the cyclic collector while they build their tables."""
    import gc

    io.write_graphml(g, tmp_path / "g.graphml")
    (tmp_path / "bad.gexf").write_text("<gexf><graph><nodes><node id='a:0'/><node id='a:0'/></nodes></graph></gexf>")
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        gephi.read_graphml(tmp_path / "g.graphml")
        assert gc.isenabled() is enabled
        with pytest.raises(BadFileError, match="twice"):
            gephi.read_gexf(tmp_path / "bad.gexf")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_an_unknown_xml_encoding_is_a_bad_file(g, tmp_path, ext):
    """An XML declaration naming an encoding Python lacks raised LookupError out of read_graphml."""
    (io.write_graphml if ext == "graphml" else io.write_gexf)(g, tmp_path / f"g.{ext}")
    text = (tmp_path / f"g.{ext}").read_bytes()
    head, sep, rest = text.partition(b"?>")
    assert sep and b"encoding=" in head
    (tmp_path / f"bogus.{ext}").write_bytes(b'<?xml version="1.0" encoding="no-such-codec"?>' + rest)
    with pytest.raises(BadFileError, match=rf"bogus\.{ext}' as {ext.upper() if ext == 'gexf' else 'GraphML'} "
                                           r"\(LookupError: unknown encoding: no-such-codec\)"):
        gephi.read(tmp_path / f"bogus.{ext}")


@pytest.mark.parametrize("ext", ["graphml", "gexf"])
def test_a_graph_without_layers_exports_and_reads_back(tmp_path, ext):
    """A file may hold a graph of no layers: the export raised a numpy TypeError (an empty
    float array of layer sizes given to np.repeat)."""
    empty = Connectome.from_edges(layers=[], edges=[])
    (io.write_graphml if ext == "graphml" else io.write_gexf)(empty, tmp_path / f"e.{ext}")
    back = gephi.read(tmp_path / f"e.{ext}")
    assert (back.num_nodes, back.num_edges, back.layers) == (0, 0, ())
