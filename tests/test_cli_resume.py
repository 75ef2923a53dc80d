"""Reruns into one --out: the index is merged, never reset; one writer at a time; every finished
category survives a later failure; a refused resume says what differs; file names that a
case-insensitive or normalising file system would merge stay apart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

import connectome as cn
from connectome.cli import category_files, main
from connectome.store import LOCK_NAME

from _image_folder import image_folder_model


def _run(tmp_path: Path, model: str, *extra: str, out: Path | None = None, layout: str = "npz") -> int:
    """``extract`` in the older layout (one .npz per category and index.json); the store has its tests."""
    return main(["extract", "--layout", layout, model, str(tmp_path / "imgs"), "--out", str(out or tmp_path / "graphs"),
                 "--image-size", "8", "--quiet", "--device", "cpu", *extra])


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


LAYOUTS = ["npz", "store"]


def _listed(out: Path, layout: str) -> list[str]:
    """The categories an output folder lists as complete."""
    return list(_index(out)["categories"]) if layout == "npz" else list(cn.load(out))


def _graph(out: Path, layout: str, cname: str) -> cn.Connectome:
    return cn.load(out / _index(out)["categories"][cname]["file"]) if layout == "npz" else cn.load(out)[cname]


def _listing(out: Path, layout: str) -> Path:
    return out / ("index.json" if layout == "npz" else "manifest.json")


# ---------------------------------------------------------------------- item 3: merge, never reset
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_runs_into_one_out_keep_both_runs_categories(tmp_path, capsys, layout):
    model = image_folder_model(tmp_path, ["ants", "bees", "cats"])
    out = tmp_path / "graphs"
    assert _run(tmp_path, model, "--categories", "ants", layout=layout) == 0
    first = _graph(out, layout, "ants")
    assert _run(tmp_path, model, "--categories", "bees,cats", layout=layout) == 0, capsys.readouterr().err
    assert sorted(_listed(out, layout)) == ["ants", "bees", "cats"]
    if layout == "npz":
        assert _index(out)["complete"] is True
    for cname in ["ants", "bees", "cats"]:
        assert _graph(out, layout, cname).meta["category"] == cname
    assert _graph(out, layout, "ants").equals(first)  # the first run's graph is untouched


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_failed_rerun_keeps_the_index_of_the_earlier_run(tmp_path, monkeypatch, capsys, layout):
    import connectome.extract.flow as flow

    model = image_folder_model(tmp_path, ["ants", "bees"])
    out = tmp_path / "graphs"
    assert _run(tmp_path, model, "--categories", "ants", layout=layout) == 0
    before = _listing(out, layout).read_text()

    def fail(*a, **k):
        raise cn.errors.DataError("every image is broken")

    monkeypatch.setattr(flow, "_attribution", fail)
    assert _run(tmp_path, model, layout=layout) == 2
    assert _listed(out, layout) == ["ants"]  # before: reset to nothing
    if layout == "npz":
        assert _index(out)["categories"] == json.loads(before)["categories"] and _index(out)["complete"] is False
    else:
        assert _listing(out, layout).read_text() == before
    assert not (out / LOCK_NAME).exists()  # released on failure too


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("change, word", [(["--target", "0"], "target"), ("other", "model")])
def test_a_run_of_another_model_or_target_into_the_same_out_is_refused(tmp_path, capsys, change, word, layout):
    model = image_folder_model(tmp_path, ["ants", "bees"])
    out = tmp_path / "graphs"
    assert _run(tmp_path, model, layout=layout) == 0
    before = _listing(out, layout).read_bytes()
    capsys.readouterr()
    if change == "other":
        rc = _run(tmp_path, model.replace(":build", ":other"), layout=layout)
    else:
        rc = _run(tmp_path, model, *change, layout=layout)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds graphs of another run" in err and word in err, err
    assert _listing(out, layout).read_bytes() == before


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_same_data_folder_named_two_ways_is_one_data(tmp_path, monkeypatch, capsys, layout):
    model = image_folder_model(tmp_path, ["ants", "bees"])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "graphs"
    base = ["extract", "--layout", layout, model, "--out", str(out), "--image-size", "8", "--quiet", "--device", "cpu"]
    assert main([*base[:4], "imgs", *base[4:], "--categories", "ants"]) == 0
    assert main([*base[:4], "./imgs/", *base[4:], "--categories", "bees"]) == 0, capsys.readouterr().err
    assert sorted(_listed(out, layout)) == ["ants", "bees"]


def test_a_damaged_index_is_refused_and_kept(tmp_path, capsys):
    model = image_folder_model(tmp_path, ["ants"])
    out = tmp_path / "graphs"
    out.mkdir()
    (out / "index.json").write_text("{not json")
    assert _run(tmp_path, model) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index.json is damaged" in err
    assert (out / "index.json").read_text() == "{not json"


# ---------------------------------------------------------------------- item 3: one writer at a time
def _lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": 0.0}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_second_concurrent_writer_is_refused(tmp_path, capsys, layout):
    model = image_folder_model(tmp_path, ["ants"])
    out = tmp_path / "graphs"
    _lock(out, os.getppid())  # a live process on this host holds the folder
    assert _run(tmp_path, model, layout=layout) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"being written by process {os.getppid()}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the lock kept


def test_a_lock_of_another_host_is_refused(tmp_path, capsys):
    model = image_folder_model(tmp_path, ["ants"])
    out = tmp_path / "graphs"
    _lock(out, 1, host="some-other-machine")
    assert _run(tmp_path, model) == 2
    assert "on some-other-machine" in capsys.readouterr().err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys, layout):
    model = image_folder_model(tmp_path, ["ants"])
    out = tmp_path / "graphs"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # its pid is now free (reused only after the pid space wraps)
    _lock(out, p.pid)
    capsys.readouterr()
    assert _run(tmp_path, model, layout=layout) == 0  # the CLI prints warnings on stderr (printable)
    assert f"taking over the lock of process {p.pid}" in capsys.readouterr().err
    assert _listed(out, layout) == ["ants"]
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_the_writer_lock_excludes_a_second_holder_in_one_process(tmp_path):
    from connectome.errors import ConnectomeError
    from connectome.store import WriterLock

    with WriterLock(tmp_path / "o") as first:
        holder = json.loads(first.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ConnectomeError, match="being written by process"):
            WriterLock(tmp_path / "o").acquire()
    assert not (tmp_path / "o" / LOCK_NAME).exists()
    assert not [p for p in (tmp_path / "o").iterdir()]  # no temporary file left either


# ---------------------------------------------------------------------- item 4: a late failure
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_failure_in_the_last_category_keeps_the_earlier_ones(tmp_path, monkeypatch, capsys, layout):
    import connectome.extract.flow as flow

    model = image_folder_model(tmp_path, ["ants", "bees", "cats"])
    real = flow._attribution

    def fail_on_cats(*a, **k):
        if k.get("category") == "cats":
            raise cn.errors.DataError("the last category's images are broken")
        return real(*a, **k)

    monkeypatch.setattr(flow, "_attribution", fail_on_cats)
    out = tmp_path / "graphs"
    assert _run(tmp_path, model, layout=layout) == 2
    assert "the last category's images are broken" in capsys.readouterr().err
    assert _listed(out, layout) == ["ants", "bees"]  # before: nothing at all
    if layout == "npz":
        assert _index(out)["complete"] is False
    for cname in ["ants", "bees"]:
        g = _graph(out, layout, cname)
        assert g.meta["category"] == cname and g.meta["n_images"] == 2
    # the rerun (the fault gone) adds the missing category
    monkeypatch.setattr(flow, "_attribution", real)
    assert _run(tmp_path, model, layout=layout) == 0
    assert sorted(_listed(out, layout)) == ["ants", "bees", "cats"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_corrupt_image_in_the_last_category_keeps_the_earlier_ones(tmp_path, capsys, layout):
    model = image_folder_model(tmp_path, ["ants", "bees"], n=1)
    (tmp_path / "imgs" / "bees" / "0.png").write_bytes(b"not a png")  # its only image
    out = tmp_path / "graphs"
    assert _run(tmp_path, model, layout=layout) == 2
    err = capsys.readouterr().err  # the CLI prints warnings on stderr (printable)
    assert "could not be decoded" in err and "bees" in err
    assert _listed(out, layout) == ["ants"]
    assert _graph(out, layout, "ants").meta["category"] == "ants"


# ---------------------------------------------------------------------- item 18: what differs
def test_resuming_with_other_examples_names_the_setting(tmp_path, capsys):
    model = image_folder_model(tmp_path, ["ants"])
    ck = str(tmp_path / "ck")
    assert _run(tmp_path, model, "--checkpoint", ck) == 0
    capsys.readouterr()
    assert _run(tmp_path, model, "--checkpoint", ck, "--examples", "2", out=tmp_path / "g2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # before: "checkpoint ... does not fit the model (missing entry 'examples_act')"
    assert "--examples" in err and "checkpoint 0, now 2" in err and "does not fit the model" not in err, err


def test_a_checkpoint_written_before_examples_were_fingerprinted_still_resumes(tmp_path):
    from connectome.extract.distributed import _differences

    now = {"examples": 0, "batch_size": 2}
    assert _differences({"batch_size": 2}, now) == []
    assert _differences({"batch_size": 2}, {**now, "examples": 3}) != []


# ---------------------------------------------------------------------- item 7: names a file system merges
def _fold(f: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", f).casefold())


@pytest.mark.parametrize("pair", [
    ("\u00c5ngstr\u00f6m", "\u212bngstr\u00f6m"),  # A-ring letter vs the Angstrom sign: one name in NFC
    ("\ud55c\uad6d", unicodedata.normalize("NFD", "\ud55c\uad6d")),  # Hangul NFC vs NFD (jamo are letters)
    ("Stra\u00dfe", "STRASSE"),
    ("Caf\u00e9", unicodedata.normalize("NFD", "caf\u00c9")),
])
def test_names_a_normalising_file_system_merges_get_distinct_files(pair):
    files = category_files(list(pair))
    assert len({_fold(f) for f in files.values()}) == 2, files  # before: the NFC/NFD pairs folded to one file
    assert category_files(list(pair)) == files  # stable


def test_nfc_and_nfd_category_folders_extract_to_distinct_files(tmp_path, capsys):
    nfc, nfd = "\ud55c", unicodedata.normalize("NFD", "\ud55c")
    assert nfc != nfd
    model = image_folder_model(tmp_path, [nfc, nfd])
    out = tmp_path / "graphs"
    assert _run(tmp_path, model) == 0, capsys.readouterr().err
    files = {c: e["file"] for c, e in _index(out)["categories"].items()}
    assert set(files) == {nfc, nfd} and len({_fold(f) for f in files.values()}) == 2
    for cname, f in files.items():
        assert cn.load(out / f).meta["category"] == cname


def test_a_rerun_never_gives_a_new_category_a_file_an_earlier_one_folds_to(tmp_path, capsys):
    files = category_files(["cat"], existing={"Cat": "Cat.npz"})
    assert _fold(files["cat"]) != _fold("Cat.npz")
    # end to end: a category differing in case only comes in a second run
    model = image_folder_model(tmp_path, ["Cat", "cat"])
    out = tmp_path / "graphs"
    assert _run(tmp_path, model, "--categories", "Cat") == 0
    assert _index(out)["categories"]["Cat"]["file"] == "Cat.npz"
    assert _run(tmp_path, model, "--categories", "cat") == 0, capsys.readouterr().err
    files = {c: e["file"] for c, e in _index(out)["categories"].items()}
    assert files["Cat"] == "Cat.npz" and _fold(files["cat"]) != "cat.npz"
    assert cn.load(out / files["Cat"]).meta["category"] == "Cat"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_what_the_model_spec_assumed_travels_with_every_graph(tmp_path, monkeypatch, layout):
    import dataclasses

    import connectome.modelspec as modelspec

    load = modelspec.load_model_spec
    monkeypatch.setattr(modelspec, "load_model_spec",
                        lambda *a, **k: dataclasses.replace(load(*a, **k), meta={"weights": "random init"}))
    model = image_folder_model(tmp_path, ["ants", "bees"])
    assert _run(tmp_path, model, "--examples", "1", layout=layout) == 0
    for cname in ["ants", "bees"]:
        g = _graph(tmp_path / "graphs", layout, cname)
        assert g.meta["weights"] == "random init"
        assert g.meta["examples"]["data"] == str((tmp_path / "imgs").resolve())
