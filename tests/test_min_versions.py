"""tools/min_versions.py pins exactly the floors pyproject.toml declares (the install itself is `make mincheck`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tool():
    pytest.importorskip("tomllib")  # Python >= 3.11; the tool takes tomli on 3.10
    spec = importlib.util.spec_from_file_location("min_versions", ROOT / "tools" / "min_versions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_declared_floor_is_pinned(tool):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    # independent reading: the text after ">=" of each requirement, in order
    expected = [(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0], r.split(">=")[1].strip()) for r in reqs]
    assert tool.read_floors() == expected
    assert ("torch", "2.10") in expected


def test_requirement_forms(tool):
    assert tool.floor_of("igraph >= 1.0") == ("igraph", "1.0")
    assert tool.floor_of("pillow[xmp]>=12.1.1,<14 ; python_version >= '3.10'") == ("pillow", "12.1.1")
    for bad in ("numpy", "numpy==1.26", "numpy<2", "numpy>=1.23,>=1.25"):
        with pytest.raises(tool.FloorError, match="floor"):
            tool.floor_of(bad)


def test_subset_names_files_that_exist(tool):
    assert [f for f in tool.SUBSET if not (ROOT / f).is_file()] == []


@pytest.mark.parametrize("a, b, same", [("2.10", "2.10.0", True), ("4.60", "4.60.0", True), ("1.23.2", "1.23", False),
                                        ("2.10.0+cu128", "2.10", True), ("3.0.2", "3.0.20", False)])
def test_installed_version_equals_floor(tool, a, b, same):
    assert (tool._release(a) == tool._release(b)) is same
