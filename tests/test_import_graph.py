"""The package's import graph, read from the source: no circles, and no arrow pointing up a floor.

Every ``import`` of a connectome module counts, at the top of a file or inside a function (a
function-local import that dodges a circle is still a circle); imports under
``if TYPE_CHECKING:`` do not (they never run). Floors are the package's layers, lowest first:
a module may import modules on its own floor or below, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "connectome"

#: Module (or package prefix) -> floor. The longest matching prefix decides.
FLOORS: dict[str, int] = {
    # 0: leaves that know no graph: errors, text, kinds, one layer, colours, reading images, models
    "connectome.errors": 0, "connectome._text": 0, "connectome._typing": 0, "connectome._image": 0,
    "connectome._safety": 0, "connectome._version": 0, "connectome._igraph": 0, "connectome.kinds": 0,
    "connectome.layer": 0, "connectome.palette": 0, "connectome.example_slots": 0, "connectome.viz._mpl": 0,
    "connectome.zoo": 0, "connectome.extract.attention": 0, "connectome.extract.data": 0,
    "connectome.extract.labels": 0, "connectome.extract.topk": 0, "connectome.extract.targets": 0,
    # 1: the graph and what one graph's file and drawing need
    "connectome._files": 1, "connectome.graph": 1, "connectome.npzformat": 1, "connectome.drawing": 1,
    "connectome.modelspec": 1,
    # 2: files of graphs and folders of them
    "connectome.patches": 2, "connectome.gephi": 2, "connectome.store": 2, "connectome.io": 2,
    # 3: analyses of graphs (no model runs)
    "connectome.analysis": 3,
    # 4: from a model to graphs
    "connectome.extract": 4,
    # 5: analyses that run the model (and the analysis package, which exports them)
    "connectome.analysis.__init__": 5, "connectome.analysis.ablation": 5, "connectome.analysis.activations": 5,
    "connectome.analysis.faithfulness": 5, "connectome.analysis.functional": 5, "connectome.analysis.lesion": 5,
    "connectome.analysis.matching": 5,
    # 6: drawing and pages; 7: reports; 8: the programs
    "connectome.viz": 6, "connectome.reporting": 7,
    "connectome.cli": 8, "connectome.demo": 8, "connectome.__main__": 8, "connectome.__init__": 8,
}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, packages named by their ``__init__`` (``connectome.viz.__init__``)."""
    return {".".join(p.relative_to(root.parent).with_suffix("").parts): p for p in root.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str | None:
    """The module ``name`` (or ``name``'s package, or the module a ``from`` name lives in) refers to."""
    while name:
        if name in known:
            return name
        if f"{name}.__init__" in known:
            return f"{name}.__init__"
        name = name.rpartition(".")[0]
    return None


def _package(name: str) -> str:
    return name[: -len(".__init__")] if name.endswith(".__init__") else name.rpartition(".")[0]


def imports(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere but under ``if TYPE_CHECKING``)."""
    known = set(files)
    out: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()

        def visit(node: ast.AST) -> None:
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                    for sub in ch.orelse:
                        visit(sub)
                    continue
                if isinstance(ch, ast.ImportFrom):
                    base = ch.module or ""
                    if ch.level:  # relative: from the importing module's package
                        pkg = _package(name).split(".")
                        base = ".".join(pkg[: len(pkg) - ch.level + 1] + ([base] if base else []))
                    if base.split(".")[0] == "connectome":
                        for a in ch.names:
                            t = _resolve(f"{base}.{a.name}", known)
                            if t is not None:
                                found.add(t)
                elif isinstance(ch, ast.Import):
                    for a in ch.names:
                        if a.name.split(".")[0] == "connectome" and (t := _resolve(a.name, known)) is not None:
                            found.add(t)
                visit(ch)

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found.discard(name)
        out[name] = found
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def floor(name: str) -> int:
    best = max((k for k in FLOORS if name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise KeyError(name)
    return FLOORS[best]


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
                  for a, bs in graph.items() for b in bs if floor(b) > floor(a))


GRAPH = imports(modules())


def test_every_module_has_a_floor():
    missing = []
    for m in GRAPH:
        try:
            floor(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"add these modules to FLOORS: {missing}"


def test_no_import_circles():
    assert circles(GRAPH) == [], "import circles (break each by moving what both sides need to a lower module)"


def test_no_upward_imports():
    assert upward(GRAPH) == []


def test_the_checks_can_fail():
    """The readers and checks find what they must: a planted circle, an upward arrow, a function-local
    import, a relative import, and skip an import under TYPE_CHECKING."""
    g = {"connectome.graph": {"connectome.io"}, "connectome.io": {"connectome.store"},
         "connectome.store": {"connectome.graph"}, "connectome.kinds": set()}
    assert circles(g) == [["connectome.graph", "connectome.io", "connectome.store"]]
    assert upward({"connectome.graph": {"connectome.viz.charts"}}) == [
        "connectome.graph (floor 1) imports connectome.viz.charts (floor 6)"]
    assert upward({"connectome.viz.charts": {"connectome.graph"}}) == []


def test_imports_are_read_from_everywhere(tmp_path):
    pkg = tmp_path / "connectome"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from connectome.b import x\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from connectome.a import f\n")
    (pkg / "sub" / "c.py").write_text("from . import d\nfrom ..a import f\nimport connectome.b\n")
    (pkg / "sub" / "d.py").write_text("")
    g = imports(modules(pkg))
    assert g["connectome.a"] == {"connectome.b"}
    assert g["connectome.b"] == set()
    assert g["connectome.sub.c"] == {"connectome.sub.d", "connectome.a", "connectome.b"}


if __name__ == "__main__":  # print the graph
    for m in sorted(GRAPH):
        print(f"{m} [{floor(m)}] -> {', '.join(sorted(GRAPH[m]))}")
    pytest.main([__file__])
