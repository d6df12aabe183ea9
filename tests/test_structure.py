"""The shape of the code: no import cycle between the project's own modules, no oversized library file."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qinco_jax", "train", "eval")
LIBRARY = "qinco_jax"
MAX_LINES = 450


def module_name(path: Path, root: Path = ROOT) -> str:
    """'qinco_jax.ptload' for qinco_jax/ptload/__init__.py, 'qinco_jax.ptload.v1' for qinco_jax/ptload/v1.py."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Every module of the project's packages by its dotted name."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _known_prefix(name: str, modules) -> str | None:
    """The longest dotted prefix of name that is a project module (None for other libraries)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(name: str, path: Path, modules) -> list[tuple[str, int]]:
    """(imported project module, line) for every import of the file, at module level or inside a
    function; `from package import sub` names the submodule when there is one."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [_known_prefix(a.name, modules) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else _known_prefix(base, modules))
        else:
            continue
        found += [(t, node.lineno) for t in targets if t is not None and t != name]
    return found


def import_graph(files: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    graph = {}
    for name, path in files.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, files):
            edges[target] = min(line, edges.get(target, line))
        graph[name] = edges
    return graph


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    out.append(sorted(comp))
    return out


def shortest_cycle(graph, start: str, within: set) -> list[str]:
    """The shortest import path from start back to start inside one component."""
    prev = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if child in within and child not in prev:
                prev[child] = node
                queue.append(child)
    return [start]


def cycles(files: dict[str, Path], root: Path = ROOT) -> list[str]:
    """One shortest cycle per strongly connected component of the import graph, with the import
    lines it goes through; empty when there is none."""
    graph = import_graph(files)
    out = []
    for comp in strongly_connected(graph):
        if len(comp) > 1:
            cycle = shortest_cycle(graph, comp[0], set(comp))
            steps = [f"{a} -> {b} ({files[a].relative_to(root)}, line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
            out.append(" -> ".join(cycle) + ":\n    " + "\n    ".join(steps))
    return out


def test_no_import_cycle_between_project_modules():
    files = project_files()
    assert {"qinco_jax", "qinco_jax.codec", "train.loop", "eval.main"} <= set(files)  # the walk found the project
    found = cycles(files)
    assert not found, f"{len(found)} import cycle(s) between the project's modules:\n" + "\n".join(found)


def test_the_cycle_finder_sees_local_and_relative_imports(tmp_path):
    """The graph of a made-up package: a cycle through a function-local relative import is found; a
    package __init__ that imports its submodules is no cycle with the modules that import them."""
    files = {
        "pkg/__init__.py": "from pkg.sub import c\n",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def f():\n    from .a import x\n",
        "pkg/sub/__init__.py": "from pkg.sub.c import y\nfrom . import d\n",
        "pkg/sub/c.py": "from pkg.sub.d import z\n",
        "pkg/sub/d.py": "import numpy as np\nimport pkg.a\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = project_files(tmp_path, ("pkg",))
    graph = import_graph(modules)
    assert graph["pkg"] == {"pkg.sub.c": 1}
    assert graph["pkg.b"] == {"pkg.a": 2} and graph["pkg.sub"] == {"pkg.sub.c": 1, "pkg.sub.d": 2}
    assert graph["pkg.a"] == {"pkg.b": 2} and graph["pkg.sub.d"] == {"pkg.a": 2}
    assert [c.split(":")[0] for c in cycles(modules, tmp_path)] == ["pkg.a -> pkg.b -> pkg.a"]


def test_library_files_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in sorted((ROOT / LIBRARY).rglob("*.py"))}
    assert len(sizes) > 10
    big = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not big, f"library files over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in big.items())
