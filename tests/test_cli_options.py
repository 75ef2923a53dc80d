"""The options of report, compare, export and zoo train: circuits, centralities, formats, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest

import connectome as cn
from connectome import cli
from connectome.cli import main


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs")
    assert main(["extract", "--layout", "npz", "zoo:smallresnet", "zoo:shapes:3", "--out", str(out), "--quiet", "--device", "cpu",
                 "--categories", "circle,ring"]) == 0
    return out


def _report_json(args, capsys) -> dict:
    assert main(["report", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_report_circuit_options(graphs, capsys):
    g = str(graphs / "circle.npz")
    d = _report_json([g, "--top-k", "2", "--max-units", "0"], capsys)
    assert d["circuit"]["top_k"] == 2 and d["circuit"]["mass"] is None and not d["circuit"]["capped"]
    hidden = {k: v for k, v in d["circuit"]["sizes"].items() if k != "logits"}
    assert max(hidden.values()) <= 2
    full = _report_json([g, "--mass", "0.9", "--max-units", "0"], capsys)["circuit"]
    capped = _report_json([g, "--mass", "0.9", "--max-units", "8"], capsys)["circuit"]
    n_layers = len(cn.load(graphs / "circle.npz").layers)
    assert capped["units"] <= max(8, n_layers) < full["units"] and capped["capped"] and capped["max_units"] == 8
    assert max(capped["sizes"].values()) == 1  # 7 units for more than 7 layers: one per layer
    assert _report_json([g, "--mass", "0.3", "--max-units", "0"], capsys)["circuit"]["units"] < full["units"]


def test_report_measures_and_betweenness_samples(graphs, capsys):
    d = _report_json([str(graphs / "circle.npz"), "--measures", "strength,betweenness", "--betweenness-samples", "5"],
                     capsys)
    assert d["betweenness_samples"] == 5
    d = _report_json([str(graphs / "circle.npz"), "--measures", "betweenness", "--betweenness-samples", "exact"], capsys)
    assert d["betweenness_samples"] is None
    assert "betweenness_samples" not in _report_json([str(graphs / "circle.npz")], capsys)


@pytest.mark.parametrize("args,message", [
    (["--mass", "1.5"], "--mass"), (["--top-k", "0"], "--top-k"), (["--max-units", "1"], "--max-units"),
    (["--betweenness-samples", "many"], "--betweenness-samples"), (["--betweenness-samples", "1"], "--betweenness-samples"),
    (["--measures", "fame"], "unknown measure"),
])
def test_report_bad_options_are_one_line_errors(graphs, capsys, args, message):
    assert main(["report", str(graphs / "circle.npz"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_report_html_reads_well(graphs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(graphs / "circle.npz"), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "<pre><code>Connectome(" in html  # the summary keeps its lines
    assert "communities</caption>" in html and ("largest of" in html or "all " in html)


def test_compare_options_and_figures(graphs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(graphs / "circle.npz"), str(graphs / "ring.npz"), "--mass", "0.5",
                 "--time-budget", "2", "--out", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["summary"]["mass"] == 0.5
    html = (out / "report.html").read_text()
    assert (out / "comparison.png").is_file() and 'data-file="comparison.png"' in html
    assert "<pre><code>Comparison(" in html
    assert main(["compare", str(graphs / "circle.npz"), str(graphs / "ring.npz"), "--time-budget", "0"]) == 2


def test_export_infers_the_format_and_drops_zero_edges(graphs, tmp_path):
    g = cn.load(graphs / "circle.npz")
    for ext, read in ((".gexf", nx.read_gexf), (".graphml", nx.read_graphml)):
        out = tmp_path / f"g{ext}"
        assert main(["export", str(graphs / "circle.npz"), "--prune-top-k", "4", "--out", str(out)]) == 0
        G = read(out)
        kept = g.prune(top_k=4)
        assert G.number_of_edges() == int((kept.weight != 0).sum())
        assert all(d["weight"] > 0 for _, _, d in G.edges(data=True))


def test_export_without_a_known_extension_asks_for_the_format(graphs, tmp_path, capsys):
    assert main(["export", str(graphs / "circle.npz"), "--out", str(tmp_path / "g.xml")]) == 2
    assert "--format" in capsys.readouterr().err
    assert not (tmp_path / "g.xml").exists()
    assert main(["export", str(graphs / "circle.npz"), "--format", "graphml", "--out", str(tmp_path / "g.xml")]) == 0


def test_export_annotate_carries_the_analysis(graphs, tmp_path):
    out = tmp_path / "g.graphml"
    assert main(["export", str(graphs / "circle.npz"), "--annotate", "--prune-top-k", "4", "--out", str(out)]) == 0
    attrs = next(iter(nx.read_graphml(out).nodes(data=True)))[1]
    for key in ("community", "centrality_pagerank", "centrality_strength", "centrality_flow", "in_circuit"):
        assert key in attrs


def test_export_warns_before_a_big_file(graphs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "EXPORT_WARN_BYTES", 1000)
    out = tmp_path / "g.gexf"
    assert main(["export", str(graphs / "circle.npz"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "MB" in err and "--prune-top-k" in err
    # the estimate is of the right size: within a factor 2 of the file written
    est = cli._export_size(cn.load(graphs / "circle.npz"))
    assert 0.5 < est / out.stat().st_size < 2.0


def test_zoo_train_refuses_the_installed_package(tmp_path, capsys):
    from connectome import zoo

    package = Path(zoo.__file__).parent
    for target in (package, package / "weights"):
        assert main(["zoo", "train", "--out", str(target)]) == 2
        assert "installed package" in capsys.readouterr().err
    assert cli._parser().parse_args(["zoo", "train"]).out == "zoo_weights"


@pytest.mark.parametrize("command", ["report", "compare", "export", "zoo"])
def test_every_option_has_help(command):
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
