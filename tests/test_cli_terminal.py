"""Names from folders and graph files never act on the terminal: every command prints them
through ``connectome._text.printable`` (control characters and bidi controls as escapes)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import connectome as cn
from connectome._text import printable, printable_lines
from connectome.cli import main
from connectome.graph import Connectome, Layer

TITLE = "title\x1b]0;pwned\x07"  # retitles the window
CLEAR = "\x1b[2Jclear"  # clears the screen
CLIP = "clip\x1b]52;c;cHduZWQ=\x07"  # writes the clipboard (OSC 52)
BIDI = "rtl\u202egnp.exe"  # shows as "rtlexe.png"
NAMES = [TITLE, CLEAR, CLIP, BIDI]
#: what must never reach the terminal from a name: C0/C1 controls but line breaks, DEL, bidi controls
ACTIVE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _inert(text: str) -> None:
    # tqdm redraws its bar with CR: the only control character besides LF that is the program's own
    found = sorted({f"U+{ord(c):04X}" for c in ACTIVE.findall(text.replace("\r", ""))})
    assert not found, f"{found} reached the terminal: {text!r}"


@pytest.mark.parametrize("name, shown", [
    (TITLE, "title\\x1b]0;pwned\\x07"),
    (CLEAR, "\\x1b[2Jclear"),
    (BIDI, "rtl\\u202egnp.exe"),
    ("tab\there\nnew\rline\x7f\x9b\u2066x\u2069", "tab\\there\\nnew\\rline\\x7f\\x9b\\u2066x\\u2069"),
    ("évier 猫 🐈 ZWJ\u200dkept", "évier 猫 🐈 ZWJ\u200dkept"),  # letters of any script and emoji stay
    ("bad\udcffname", "bad\ufffdname"),  # a non-UTF-8 byte of a file name
])
def test_printable_escapes_controls_and_keeps_letters(name, shown):
    assert printable(name) == shown
    _inert(printable(name))
    assert printable(Path("a") / name) == printable(os.path.join("a", name))


def test_printable_lines_keeps_line_breaks_only():
    assert printable_lines(f"a {TITLE}\nb\t{BIDI}") == "a title\\x1b]0;pwned\\x07\nb\\trtl\\u202egnp.exe"


def _folder(root: Path, names: list[str], n: int = 2) -> tuple[str, Path]:
    """An ImageFolder with one folder per name and a model file with one output per name."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / "imgs" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "imgs" / name / f"{i}.png")
    (root / "m.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        f"                         nn.Flatten(), nn.Linear(4, {len(names)}))\n"
    )
    return f"{root / 'm.py'}:build", root / "imgs"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """One graph file per hostile category, with dataset examples (written here, so that the
    tests below do not depend on how ``extract`` lays out its output folder)."""
    import torch.nn as nn

    from connectome.extract.data import default_transform

    root = tmp_path_factory.mktemp("hostile")
    _, imgs = _folder(root, NAMES)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, len(NAMES))).eval()
    graphs = cn.extract.attribution_by_category(model, str(imgs), transform=default_transform(8), progress=False,
                                                device="cpu", examples=2, num_workers=0)
    files = {}
    for i, (cname, g) in enumerate(sorted(graphs.items())):
        files[cname] = root / f"g{i}.npz"
        g.save(files[cname])
    return files


def test_extract_prints_folder_names_inert(tmp_path, capsys):
    model, imgs = _folder(tmp_path, NAMES)
    # with progress bars: their descriptions name the category
    assert main(["extract", model, str(imgs), "--out", str(tmp_path / "g"), "--image-size", "8", "--device", "cpu",
                 "--num-workers", "0"]) == 0
    cap = capsys.readouterr()
    _inert(cap.out + cap.err)
    for name in NAMES:
        assert printable(name) in cap.out  # one line per category, recognisable
    assert "attribution title\\x1b]0;pwned\\x07" in cap.err  # the progress bar's description
    assert "title\\x1b]0;pwned\\x07 -> unit" in cap.err


def test_report_compare_export_view_print_names_inert(hostile, tmp_path, capsys):
    files = hostile
    assert sorted(files) == sorted(NAMES)
    capsys.readouterr()
    out_dir = tmp_path / f"out{CLEAR}"  # the paths printed are names too
    out_dir.mkdir()
    runs = [
        ["report", str(files[TITLE]), "--top", "3"],
        ["report", str(files[CLIP]), "--out", str(out_dir / f"rep{TITLE}")],
        ["compare", str(files[TITLE]), str(files[BIDI])],
        ["export", str(files[CLEAR]), "--out", str(out_dir / f"g{BIDI}.graphml"),
         "--examples", str(out_dir / f"ex{CLIP}")],
        ["view", *map(str, files.values()), "--out", str(out_dir / f"v{TITLE}.html")],
    ]
    for argv in runs:
        assert main(argv) == 0, argv
        cap = capsys.readouterr()
        _inert(cap.out + cap.err)
        assert cap.out + cap.err, argv
    assert main(runs[0]) == 0
    assert "title\\x1b]0;pwned\\x07" in capsys.readouterr().out  # the category, shown escaped


def _hostile_graph() -> Connectome:
    """A weight graph whose model, category, layer names and labels all carry escapes."""
    layers = (Layer("input", "input", 2), Layer(f"conv{CLEAR}", "conv", 2),
              Layer("logits", "output", 2, labels=(TITLE, BIDI)))
    src = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    dst = np.array([2, 3, 2, 3, 4, 5, 4, 5])
    w = np.array([1.0, -0.5, 0.25, 2.0, 1.5, -1.0, 0.5, 0.75])
    return Connectome(layers=layers, node_units=np.array([0, 1, 0, 1, 0, 1]), src=src, dst=dst, weight=w,
                      meta={"model": CLIP, "category": TITLE, "method": "weights"})


def test_report_of_a_crafted_graph_prints_it_inert(tmp_path, capsys):
    _hostile_graph().save(tmp_path / "g.npz")
    assert main(["report", str(tmp_path / "g.npz"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    _inert(out)
    assert "conv\\x1b[2Jclear:0" in out  # the layer name, in the hub table
    assert main(["report", str(tmp_path / "g.npz"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["graph"]["meta"]["model"] == printable(CLIP)


def test_errors_naming_a_file_or_category_are_inert(tmp_path, capsys):
    missing = tmp_path / f"nope{TITLE}.npz"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    _inert(err)
    assert "nope" in err and "pwned" in err and len(err.strip().splitlines()) == 1
    model, imgs = _folder(tmp_path, [TITLE, BIDI], n=1)
    assert main(["extract", model, str(imgs), "--out", str(tmp_path / "g"), "--quiet",
                 "--device", "cpu", "--categories", f"absent{CLIP}"]) == 2
    err = capsys.readouterr().err
    _inert(err)
    assert "absent" in err and len(err.strip().splitlines()) == 1


def test_warnings_quoting_names_are_inert(monkeypatch, capsys):
    from connectome import cli

    def warns(_args):
        warnings.warn(f"image {TITLE}/{BIDI}.png changed", UserWarning)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "zoo", warns)
    assert main(["zoo", "list"]) == 0
    err = capsys.readouterr().err
    _inert(err)
    assert "image title\\x1b]0;pwned\\x07/rtl\\u202egnp.exe.png changed" in err
    assert warnings.showwarning is not cli._show_warning  # restored after the command



def test_usage_errors_quoting_arguments_are_inert(capsys):
    with pytest.raises(SystemExit) as info:
        main(["zoo", "list", TITLE])  # argparse: "unrecognized arguments: ..."
    assert info.value.code == 2
    err = capsys.readouterr().err
    _inert(err)
    assert "unrecognized arguments: title\\x1b]0;pwned\\x07" in err
