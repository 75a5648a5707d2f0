"""The import graph of the project's code (`mmrlhf_lite/`, `bench/`, `app.py`) read from the source (an AST
walk, no import runs): no cycle among the modules, and no private name (`_x`) imported from another
package. A name used outside its package is public and documented; inside one package (or subpackage)
private helpers may be shared.

Every import counts, also one inside a function: a lazy import hides a cycle from the interpreter, not
from a reader.

    python -m pytest tests/test_architecture.py -q
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("mmrlhf_lite", "bench", "app.py")


@dataclass(frozen=True)
class Import:
    importer: str      # dotted module name
    target: str        # dotted module the names come from (a project module or a third-party one)
    name: str | None   # the imported name (`from target import name`), None for `import target`
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str, is_package: bool) -> str:
    """The package a module belongs to: itself for a package's `__init__`, else its parent ('' at top)."""
    return module if is_package else module.rpartition(".")[0]


def read_imports(root: Path, sources=SOURCES) -> tuple[dict[str, Path], list[Import]]:
    files = []
    for entry in sources:
        p = root / entry
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    imports = []
    for mod, f in modules.items():
        pkg = package_of(mod, f.name == "__init__.py")
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                imports += [Import(mod, a.name, None, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".") if pkg else []
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    # `from pkg import submodule` imports the submodule
                    sub = f"{target}.{a.name}" if target else a.name
                    if sub in modules:
                        imports.append(Import(mod, sub, None, node.lineno))
                    else:
                        imports.append(Import(mod, target, a.name, node.lineno))
    return modules, imports


def cycles(modules: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules:
            edges[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                found.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return found


def private_imports_across_packages(modules: dict[str, Path], imports: list[Import], root: Path = ROOT) -> list[str]:
    bad = []
    for imp in imports:
        if imp.name is None or not imp.name.startswith("_") or imp.name.startswith("__"):
            continue
        importer_pkg = package_of(imp.importer, modules[imp.importer].name == "__init__.py")
        target_file = modules.get(imp.target)
        target_pkg = package_of(imp.target, target_file is not None and target_file.name == "__init__.py")
        if target_file is None or importer_pkg != target_pkg:
            bad.append(f"{modules[imp.importer].relative_to(root)}:{imp.line}: from {imp.target} import {imp.name}")
    return bad


def test_the_project_has_no_import_cycle():
    modules, imports = read_imports(ROOT)
    assert len(modules) > 80  # the walk found the project
    found = cycles(modules, imports)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_is_imported_from_another_package():
    modules, imports = read_imports(ROOT)
    bad = private_imports_across_packages(modules, imports)
    assert not bad, "private names imported across packages (make them public, or keep the use inside):\n" + \
        "\n".join(bad)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checks_find_a_lazy_cycle_and_a_private_reach_in(tmp_path):
    """The walk itself: a cycle closed by an import inside a function, `from . import submodule`, relative
    imports two levels up, a private name shared inside a package (fine) and taken from another (not)."""
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\n_helper = 1\n",
        "pkg/c.py": "from .a import _helper\n",                      # same package: fine
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from .. import a\n",          # lazy: still a cycle a -> sub.b -> a
        "pkg/sub/d.py": "from ..a import _helper\nfrom os import _exit\n",  # another package, and third-party
        "pkg/e.py": "import pkg.c\n",
    })
    modules, imports = read_imports(root, ("pkg",))
    assert cycles(modules, imports) == [["pkg.a", "pkg.sub.b"]]
    bad = private_imports_across_packages(modules, imports, root)
    assert bad == ["pkg/sub/d.py:1: from pkg.a import _helper", "pkg/sub/d.py:2: from os import _exit"]
