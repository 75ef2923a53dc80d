#!/usr/bin/env python3
"""Install the oldest versions pyproject.toml admits, in a venv of their own, and run a fast test subset.

Each floor in ``pyproject.toml`` claims that connectome works with that release; a floor no
test has run on is a guess. This script turns every ``name>=X`` of ``[project] dependencies``
and of the ``test`` extra into ``name==X`` (the list is read from pyproject.toml, never kept
twice), installs them together with the package, checks that each floor is what got installed,
and runs the tests in ``SUBSET`` (``-m "not slow and not gpu"``).

Wheels only: a floor that has no wheel for this Python fails at install instead of compiling
for an hour. Not part of ``make test``: the venv is a few GB, since torch from PyPI is a CUDA
build. ``make mincheck`` runs it.

Usage::

    python tools/min_versions.py [--venv DIR] [--python EXE] [--fresh] [--list] [PYTEST_ARG ...]

Exit status: 0 when the floors install and the tests pass, 1 when a test fails or an
installed version is not its floor, 2 for a pyproject.toml that cannot be read this way or a
failed install.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test",)
# One file per dependency that imports it, plus the command line end to end; together about a
# minute on two cores.
SUBSET = (
    "tests/test_graph.py",            # numpy, scipy sparse, networkx and igraph converters
    "tests/test_io.py",               # .npz without pickle, GraphML/GEXF
    "tests/test_safety.py",           # the torch floor guard
    "tests/analysis/test_communities.py",  # leidenalg
    "tests/analysis/test_isomorphism.py",  # igraph LAD/VF2
    "tests/extract/test_extract_flow.py",  # torch autograd, torch.fx
    "tests/extract/test_extract_data.py",  # torchvision ImageFolder, pillow
    "tests/viz/test_viz.py",          # matplotlib
    "tests/test_cli.py",              # everything, end to end (tqdm)
)

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


class FloorError(Exception):
    """pyproject.toml has a requirement this script cannot turn into one pinned version."""


def floor_of(requirement: str) -> tuple[str, str]:
    """``"numpy>=1.23"`` -> ``("numpy", "1.23")``; a requirement without ``>=`` is an error.

    Examples
    --------
    >>> floor_of("torch>=2.10")
    ('torch', '2.10')
    >>> floor_of("pillow >= 12.1.1, <14")
    ('pillow', '12.1.1')
    """
    m = _REQ.match(requirement)
    if m is None:
        raise FloorError(f"cannot read requirement {requirement!r} in pyproject.toml")
    name, spec = m.group(1), m.group(3)
    floors = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
    if len(floors) != 1:
        raise FloorError(
            f"requirement {requirement!r} in pyproject.toml has no single floor; write it as "
            f"'{name}>=VERSION' (the oldest version the tests pass with)"
        )
    return name, floors[0]


def read_floors(pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, str]]:
    """Every (name, floor) of the runtime dependencies and of the ``test`` extra, in file order."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [floor_of(r) for r in reqs]


def _release(version: str) -> tuple[int, ...]:
    """``"2.10"`` and ``"2.10.0"`` compare equal: pip's ``==2.10`` installs 2.10.0."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _run(cmd: list[str], **kw) -> int:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, **kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=str(ROOT / ".venv-min"), help="where to build the venv (default: .venv-min)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: this one)")
    p.add_argument("--fresh", action="store_true", help="delete the venv first instead of reusing it")
    p.add_argument("--list", action="store_true", help="print the pinned floors and stop")
    p.add_argument("pytest_args", nargs="*", help=f"pytest arguments instead of the subset ({len(SUBSET)} files)")
    a = p.parse_args(argv)

    try:
        floors = read_floors()
    except (FloorError, KeyError) as exc:
        print(f"min_versions: error: {exc}", file=sys.stderr)
        return 2
    pins = [f"{name}=={version}" for name, version in floors]
    if a.list:
        print("\n".join(pins))
        return 0

    venv = Path(a.venv)
    if a.fresh and venv.exists():
        shutil.rmtree(venv)
    py = venv / "bin" / "python"
    if not py.exists() and _run([a.python, "-m", "venv", str(venv)]) != 0:
        return 2
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    if _run(pip + ["install", "-q", "--upgrade", "pip"]) != 0:
        return 2
    # One resolver run for the pins and the package: it refuses pins that contradict each other
    # or the package's own requirements, instead of quietly upgrading one of them.
    if _run(pip + ["install", "-q", "--only-binary=:all:", "-e", f"{ROOT}[{','.join(EXTRAS)}]", *pins]) != 0:
        print("min_versions: error: the floors in pyproject.toml do not install together on "
              f"{a.python}; raise the one pip names above", file=sys.stderr)
        return 2
    if _run(pip + ["check"]) != 0:
        return 2

    names = [n for n, _ in floors]
    got = subprocess.run(
        [str(py), "-c", "import sys, importlib.metadata as m; print(*(m.version(n) for n in sys.argv[1:]))", *names],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    pyver = subprocess.run([str(py), "-c", "import platform; print(platform.python_version())"],
                           check=True, capture_output=True, text=True).stdout.strip()
    print(f"python {pyver}")
    wrong = []
    for (name, floor), version in zip(floors, got):
        ok = _release(version) == _release(floor)
        print(f"{name:14s} floor {floor:10s} installed {version}{'' if ok else '  <-- NOT THE FLOOR'}")
        wrong += [] if ok else [name]
    if wrong:
        print(f"min_versions: error: {', '.join(wrong)} installed above the floor (a constraint file?)", file=sys.stderr)
        return 1

    args = a.pytest_args or ["-q", "-m", "not slow and not gpu", *SUBSET]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # test the venv's install
    env.setdefault("MPLBACKEND", "Agg")
    return _run([str(py), "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
