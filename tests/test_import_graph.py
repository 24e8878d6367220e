"""The library's modules import each other without a cycle (the redesign's target: a cycle makes import order matter
and forces imports into function bodies to dodge it).

The graph is read from the source with ``ast``: every import statement, at module level or inside a function, is an
edge. ``from pkg import name`` points at the submodule ``pkg.name`` when there is one, else at ``pkg``. A package's
own ``__init__`` running before its submodules is not an edge (every package would otherwise cycle with its
submodules); a submodule that imports its *own package* does count, because that import runs the package's
``__init__``, which imports the submodules back.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_lm"


def module_files(package: Path) -> dict[str, Path]:
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_files(package)
    root = package.name

    def known(name: str) -> str | None:  # the longest prefix of a dotted name that is one of our modules
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                found = known(target) if target.split(".")[0] == root else None
                if found and found != module:
                    graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")  # the kind of import that hides a cycle
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import g\n")
    (pkg / "sub" / "c.py").write_text("from .d import h\n")
    (pkg / "sub" / "d.py").write_text("h = 1\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_library_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "rlhf_lm.rewards.loading" in graph and graph["rlhf_lm.stages.grpo"]  # the graph was read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
