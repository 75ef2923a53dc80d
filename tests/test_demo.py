"""The demo end to end, small: every section runs and the report references its figures."""

from __future__ import annotations

import json
import re

import connectome as cn
from connectome.demo import run_demo


def test_demo_writes_report_figures_and_gephi_files(tmp_path, capsys):
    path = run_demo(tmp_path / "demo", progress=False, n_per_class=4, n_random=3)
    out = tmp_path / "demo"
    html = (out / "report.html").read_text()
    files = re.findall(r'data-file="([^"]+)"', html)
    assert {"category_similarity.png", "matching.png", "two_images.png", "fidelity.png", "curves.png"} <= set(files)
    for f in files:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completeness_relative_max"] < 1e-4
    assert len(summary["fidelity"]) == 9
    for cname in summary["classes"]:
        g = cn.load(out / "gephi" / f"smallresnet_{cname}.npz")
        assert g.meta["category"] == cname
        assert (out / "gephi" / f"smallresnet_{cname}.graphml").is_file()
        assert (out / "gephi" / f"smallresnet_{cname}.gexf").is_file()
    viewer = (out / "viewer.html").read_text()
    data = json.loads(re.search(r'id="data">(.*?)</script>', viewer, re.S).group(1).replace("<\\/", "</"))
    assert [c["name"] for c in data["categories"]] == summary["classes"]
    for c in data["categories"]:  # the slider at 30% shows exactly the circuit the report counts
        j = c["levels"].index(0.3)
        assert sum(m >> j & 1 for m in c["nodes"]["mask"]) == summary["circuits"][c["name"]]["units"]
        assert c["sprite"].startswith("data:image/")  # with patches
    assert 'class="card"' in html  # unit cards with their top patches
    assert "connectome demo finished" in capsys.readouterr().out
    assert path.endswith("report.html")


def test_demo_curves_are_whole_curves_with_finite_auc():
    from types import SimpleNamespace

    import numpy as np

    from connectome import viz
    from connectome.demo import _curves

    x = np.linspace(0, 1, 11)
    fid = SimpleNamespace(curve_x=x, deletion_curve=1 - x, insertion_curve=x**2)
    curves = _curves(fid)
    assert {k: len(v[0]) for k, v in curves.items()} == {"deletion": 11, "insertion": 11}
    fig = viz.plot_curves(curves)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["deletion (AUC=0.500)", "insertion (AUC=0.335)"]
    assert _curves(SimpleNamespace(curve_x=None, deletion_curve=None, insertion_curve=None)) == {}
