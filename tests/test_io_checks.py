"""What ``load`` checks beyond the format: the example metadata the patch code trusts, and
non-finite weights (kept, but said)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import connectome as cn
from connectome.cli import main
from connectome.errors import BadFileError
from connectome.graph import Connectome, Layer
from connectome.patches import crop_box, example_columns

K = 2
#: conv: a 6x6 map of 3x3 windows at stride 1 from -1 on a 6x6 image (a 3x3 conv, padding 1)
FIELD = [1, -1, 3, 1, -1, 3, 6, 6]


def with_examples() -> Connectome:
    """input (3) -> conv (2) -> logits (1), with K examples per unit and a receptive field per layer."""
    g = Connectome.from_edges([("input", "input", 3), ("conv", "conv", 2), ("logits", "output", 1)],
                              [("input:0", "conv:0", 1.0), ("input:2", "conv:1", -2.0), ("conv:0", "logits:0", 0.5),
                               ("conv:1", "logits:0", 1.5)])
    rng = np.random.default_rng(0)
    index = rng.integers(-1, 5, (6, K))
    value = np.where(index >= 0, rng.normal(size=(6, K)), np.nan)
    pos = np.where(index >= 0, rng.integers(0, 36, (6, K)), -1)  # positions on the 6x6 map
    pos[4, 0] = 35  # the last one: its window reaches past the image's corner, still overlaps it
    cols = {**example_columns("example", index, value, pos), **example_columns("example_attr", index, value, pos)}
    meta = {"k": K, "fields": {"input": [1, 0, 1, 1, 0, 1, 6, 6], "conv": FIELD, "logits": None},
            "input_size": [6, 6], "lists": ["activation", "attribution"], "index": "dataset",
            "dataset": "ImageFolder", "paths": {"0": "/data/a.png", "3": "/data/b.png"}, "data": "/data"}
    return g.with_node_attrs(**cols).with_meta(examples=meta)


def test_genuine_example_metadata_loads_and_crops(tmp_path):
    g = with_examples()
    g.save(tmp_path / "g.npz")
    back = cn.load(tmp_path / "g.npz")
    assert back.equals(g)
    # the position the check lets through at the corner crops to the image's last 2x2 pixels
    assert back.node_attr("example_pos_0")[back.index_of("conv:1")] == 35
    assert crop_box(back, "conv:1", 35) == (4, 6, 4, 6)


def _field(**kw: int) -> list[int]:
    names = ["jump_y", "start_y", "size_y", "jump_x", "start_x", "size_x", "height", "width"]
    return [kw.get(n, v) for n, v in zip(names, FIELD)]


CRAFTED = {  # change to meta["examples"] -> the field the error must name
    "input_size zero (ZeroDivisionError in view)": ({"input_size": [0, 0]}, "input_size"),
    "input_size huge (MemoryError in view)": ({"input_size": [10**6, 10**6]}, "input_size"),
    "input_size one number": ({"input_size": [6]}, "input_size"),
    "input_size floats": ({"input_size": [6.0, 6.0]}, "input_size"),
    "k text": ({"k": "x"}, "k"),
    "k zero": ({"k": 0}, "k"),
    "fields a list": ({"fields": [FIELD]}, "fields"),
    "field of 7": ({"fields": {"conv": FIELD[:7]}}, "fields"),
    "field with a float": ({"fields": {"conv": [1.5] + FIELD[1:]}}, "fields"),
    "field jump 0": ({"fields": {"conv": _field(jump_x=0)}}, "fields"),
    "field size 0": ({"fields": {"conv": _field(size_y=0)}}, "fields"),
    "field width 0": ({"fields": {"conv": _field(width=0)}}, "fields"),
    "field value 2^40": ({"fields": {"conv": _field(height=1 << 40)}}, "fields"),
    "field off the image (ZeroDivisionError in view)": ({"fields": {"conv": _field(start_y=500)}}, "fields"),
    "field before the image": ({"fields": {"conv": _field(start_x=-500)}}, "fields"),
    "map smaller than the stored positions": ({"fields": {"conv": _field(height=2, width=2)}}, "fields"),
    "lists unknown": ({"lists": ["activation", "bogus"]}, "lists"),
    "index a number": ({"index": 5}, "index"),
    "data a list": ({"data": ["/data"]}, "data"),
    "paths a list (AttributeError in export)": ({"paths": ["/data/a.png"]}, "paths"),
    "path a number": ({"paths": {"0": 7}}, "paths"),
    "stamps a list (AttributeError in view, report, export)": ({"stamps": [10, 20]}, "stamps"),
    "stamps text": ({"stamps": "x"}, "stamps"),
}


@pytest.mark.parametrize("change, field", list(CRAFTED.values()), ids=list(CRAFTED))
def test_crafted_example_metadata_is_one_bad_file_error(tmp_path, change, field):
    """view, report and export trusted meta['examples'] and failed deep inside (MemoryError,
    ZeroDivisionError, AttributeError); load now names the file and the field."""
    g = with_examples()
    bad = g.with_meta(examples={**g.meta["examples"], **change})
    path = tmp_path / "crafted.npz"
    bad.save(path)
    with pytest.raises(BadFileError, match=rf"crafted\.npz' has damaged example metadata: meta\['examples'\]\['{field}'\]") as err:
        cn.load(path)
    assert "\n" not in str(err.value)


def test_example_metadata_that_is_not_an_object(tmp_path):
    with_examples().with_meta(examples=5).save(tmp_path / "five.npz")
    with pytest.raises(BadFileError, match=r"five\.npz' has damaged example metadata: meta\['examples'\] is a int"):
        cn.load(tmp_path / "five.npz")


def test_a_stored_position_off_the_map_is_refused(tmp_path):
    """The meta is fine but a position column points beyond the unit's 6x6 map."""
    g = with_examples()
    pos = np.array(g.node_attr("example_attr_pos_1"))
    pos[g.index_of("conv:0")] = 36
    g.with_node_attrs(example_attr_pos_1=pos).save(tmp_path / "p.npz")
    with pytest.raises(BadFileError, match=r"'conv' puts position 36 \(column 'example_attr_pos_1'\) off its 6x6 map"):
        cn.load(tmp_path / "p.npz")


@pytest.mark.parametrize("command", ["view", "report", "export"])
def test_commands_on_crafted_examples_exit_2_with_one_line(tmp_path, capsys, command):
    g = with_examples()
    path = tmp_path / "crafted.npz"
    g.with_meta(examples={**g.meta["examples"], "input_size": [0, 0]}).save(path)
    out = tmp_path / ("out.html" if command == "view" else "out.graphml" if command == "export" else "rep")
    assert main([command, str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"connectome {command}: error: ") and "\n" not in err
    assert "meta['examples']['input_size']" in err and not out.exists()


# ----------------------------------------------------------------------------- non-finite values
def _non_finite(tmp_path: Path) -> tuple[Connectome, Path]:
    g = with_examples()
    w = g.weight.copy()
    w[[0, 1, 3]] = [np.nan, np.inf, -np.inf]  # input->conv twice, conv->logits once
    attribution = np.array([0.0, np.inf, 1.0, np.nan, -np.inf, 2.0])  # NaN: "no value", not counted
    bad = dataclasses.replace(g, weight=w).with_node_attrs(attribution=attribution)
    path = tmp_path / "nan.npz"
    bad.save(path)
    return bad, path


def test_non_finite_weights_load_exactly_with_a_warning(tmp_path):
    """They loaded without a word and were drawn as 0; they still load as they are (npz keeps
    them exactly), with a warning naming the file and the count per layer pair."""
    bad, path = _non_finite(tmp_path)
    with pytest.warns(UserWarning) as rec:
        back = cn.load(path)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert msg.startswith(f"{str(path)!r} holds non-finite values: 3 edge weights (input->conv: 2, conv->logits: 1); "
                          "2 infinite values of node attribute 'attribution' (input: 1, conv: 1);")
    assert rec[0].filename == __file__  # points at the caller's line
    assert back.equals(bad)


def test_nan_in_node_attributes_alone_is_not_warned(tmp_path):
    g = with_examples()  # NaN example values ("no example") and a NaN statistic
    g = g.with_node_attrs(activation_max=np.array([np.nan, np.nan, np.nan, 1.0, 2.0, 3.0]))
    g.save(tmp_path / "g.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cn.load(tmp_path / "g.npz")


def test_report_shows_the_warning_line(tmp_path):
    """``connectome report`` prints the load warning (the warning filter of the command line)."""
    _, path = _non_finite(tmp_path)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "connectome", "report", str(path)], capture_output=True, text=True,
                         cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    line = next((s for s in run.stderr.splitlines() if "holds non-finite values" in s), None)
    assert line is not None, run.stderr
    assert f"UserWarning: {str(path)!r} holds non-finite values: 3 edge weights (input->conv: 2, conv->logits: 1)" in line


def test_graphml_examples_are_checked_as_at_load(tmp_path):
    """GraphML carries meta (and so meta['examples']) and the example columns back."""
    from connectome import gephi

    g = with_examples()
    cn.io.write_graphml(g, tmp_path / "g.graphml")
    back = gephi.read_graphml(tmp_path / "g.graphml")
    assert back.meta["examples"] == g.meta["examples"]
    np.testing.assert_array_equal(back.node_attr("example_attr_pos_1"), g.node_attr("example_attr_pos_1"))
    crafted = g.with_meta(examples={**g.meta["examples"], "fields": {"conv": _field(start_y=500)}})
    cn.io.write_graphml(crafted, tmp_path / "crafted.graphml")
    with pytest.raises(BadFileError, match=r"crafted\.graphml' has damaged example metadata: meta\['examples'\]\['fields'\]"):
        gephi.read_graphml(tmp_path / "crafted.graphml")


@pytest.mark.parametrize("dropped", ["example_pos_1", "example_value_0", "example_attr_index_1"])
def test_an_example_slot_missing_a_column_is_refused(tmp_path, dropped):
    """index, value and pos of a slot are read together (a KeyError deep in view/report/export);
    a Gephi user may delete one, or retype it as text, which the GraphML reader drops."""
    from connectome import gephi

    g = with_examples()
    g = dataclasses.replace(g, node_attrs={k: v for k, v in g.node_attrs.items() if k != dropped})
    g.save(tmp_path / "g.npz")
    with pytest.raises(BadFileError, match=rf"g\.npz' has the example column '[a-z_]+_{dropped[-1]}' without '{dropped}'"):
        cn.load(tmp_path / "g.npz")
    full = tmp_path / "full.graphml"
    cn.io.write_graphml(with_examples(), full)
    retyped = re.sub(rf'(<key [^>]*attr.name="{dropped}" attr.type=)"[a-z]+"', r'\1"string"', full.read_text())
    assert retyped != full.read_text()
    (tmp_path / "retyped.graphml").write_text(retyped)
    with pytest.raises(BadFileError, match=rf"retyped\.graphml' has the example column .* without '{dropped}'"):
        gephi.read_graphml(tmp_path / "retyped.graphml")
