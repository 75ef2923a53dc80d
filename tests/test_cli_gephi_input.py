"""The commands that read one graph also read the Gephi files ``export`` writes (they said
"BadZipFile ... write it again with Connectome.save" before)."""
from __future__ import annotations

import numpy as np
import pytest

import connectome as cn
from connectome.cli import main


def _graph() -> cn.Connectome:
    layers = [("input", "input", 3), ("conv", "conv", 4), ("logits", "output", 2)]
    rng = np.random.default_rng(0)
    ids = [f"{n}:{u}" for n, _, size in layers for u in range(size)]
    edges = [(s, t, float(rng.normal())) for s in ids[:3] for t in ids[3:7]] + \
            [(s, t, float(rng.normal())) for s in ids[3:7] for t in ids[7:]]
    return cn.Connectome.from_edges(layers=layers, edges=edges, meta={"model": "toy", "category": "circle"},
                                    node_attrs={"attribution": rng.normal(size=len(ids))})


@pytest.mark.parametrize("fmt", ["graphml", "gexf"])
def test_report_compare_and_view_read_gephi_files(tmp_path, capsys, fmt):
    g = _graph()
    g.save(tmp_path / "g.npz")
    path = tmp_path / f"g.{fmt}"
    assert main(["export", str(tmp_path / "g.npz"), "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["report", str(path)]) == 0
    from_gephi = capsys.readouterr().out
    assert main(["report", str(tmp_path / "g.npz")]) == 0
    from_npz = capsys.readouterr().out
    if fmt == "gexf":  # GEXF has no place for the graph's meta: compare all but that line
        from_npz = "".join(line for line in from_npz.splitlines(True) if not line.lstrip().startswith("meta:"))
    assert from_gephi == from_npz  # the same graph, whichever file it came from
    assert main(["compare", str(path), str(tmp_path / "g.npz")]) == 0
    assert main(["view", str(path), "--out", str(tmp_path / "v.html")]) == 0
    assert (tmp_path / "v.html").stat().st_size > 0


def test_a_damaged_gephi_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "g.graphml"
    bad.write_text("<graphml><graph>")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BadZipFile" not in err
