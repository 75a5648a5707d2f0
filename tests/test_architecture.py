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


# ---- the distributed seam: stage modules ask `mmrlhf_lite.distributed` only what its SEAM names

STAGE_MODULES = ("mmrlhf_lite/cache/reference.py", "mmrlhf_lite/reward/scorer.py", "mmrlhf_lite/cache/sharded.py",
                 "mmrlhf_lite/cache/store.py", "mmrlhf_lite/evaluate/pipeline.py", "mmrlhf_lite/training.py",
                 "mmrlhf_lite/dpo/trainer.py", "mmrlhf_lite/reward/trainer.py", "mmrlhf_lite/rounds/__init__.py",
                 "mmrlhf_lite/rounds/round.py", "mmrlhf_lite/rounds/sampling.py")


def distributed_uses(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted name) of every use of `torch.distributed` or of a name of `mmrlhf_lite.distributed` (or of
    its submodules) in a module: the names it imports from there and the attributes it reads off them."""
    mod = module_name(path, root)
    pkg = package_of(mod, path.name == "__init__.py")
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}
    uses: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.startswith("torch.distributed"):
                    uses.append((node.lineno, a.name))
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{target}.{a.name}"
                aliases[a.asname or a.name] = full
                if full.startswith(("torch.distributed", "mmrlhf_lite.distributed.")):
                    uses.append((node.lineno, full))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            full = f"{aliases.get(node.value.id, node.value.id)}.{node.attr}"
            if full.startswith(("torch.distributed", "mmrlhf_lite.distributed.")):
                uses.append((node.lineno, full))
    return uses


def seam_violations(paths, seam, root: Path = ROOT) -> list[str]:
    bad = []
    for p in paths:
        for line, name in distributed_uses(p, root):
            inside = name.removeprefix("mmrlhf_lite.distributed.")
            if name.startswith("torch.distributed") or inside not in seam:
                bad.append(f"{p.relative_to(root)}:{line}: {name}")
    return bad


def test_stage_modules_ask_the_distributed_package_only_what_its_seam_offers():
    """A stage reads as if it ran in one process: no `torch.distributed`, no lockstep or FSDP internals, only
    `distributed.SEAM` (documented in mmrlhf_lite/distributed/__init__.py and docs/distributed.md)."""
    from mmrlhf_lite.distributed import SEAM

    paths = [ROOT / p for p in STAGE_MODULES]
    assert sum(len(distributed_uses(p)) for p in paths) >= 10      # the walk sees the stages' seam calls
    bad = seam_violations(paths, set(SEAM))
    assert not bad, "stage modules reaching past the distributed seam:\n" + "\n".join(bad)


def test_the_seam_check_finds_internals_and_torch_distributed(tmp_path):
    root = _tree(tmp_path, {
        "mmrlhf_lite/__init__.py": "",
        "mmrlhf_lite/stage.py": ("from . import distributed\nfrom .distributed.lockstep import work_split\n"
                                 "import torch.distributed as dist\n"
                                 "def f(m):\n    distributed.forward(m, f)\n    distributed.is_main()\n"
                                 "    dist.get_world_size()\n"),
    })
    bad = seam_violations([root / "mmrlhf_lite/stage.py"], {"forward"}, root)
    assert bad == ["mmrlhf_lite/stage.py:2: mmrlhf_lite.distributed.lockstep.work_split",
                   "mmrlhf_lite/stage.py:3: torch.distributed", "mmrlhf_lite/stage.py:6: mmrlhf_lite.distributed.is_main",
                   "mmrlhf_lite/stage.py:7: torch.distributed.get_world_size"]


def test_each_stage_module_says_what_it_reads_and_writes_in_the_run_folder_and_its_command():
    """A reader opening a stage's module learns first what it reads and writes in the run folder and the
    command that exercises it (the stages of train.STAGE_RUNNERS, and the data preparation)."""
    from mmrlhf_lite.train import STAGE_RUNNERS

    modules = [runner.split(":")[0] for runner in STAGE_RUNNERS.values()] + ["mmrlhf_lite.data"]
    for mod in modules:
        rel = mod.replace(".", "/")
        path = ROOT / (rel + ".py") if (ROOT / (rel + ".py")).exists() else ROOT / rel / "__init__.py"
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        words = set(doc.split())
        assert "In the run folder" in doc and {"reads", "writes"} <= words, (mod, doc[:200])
        assert "python -m mmrlhf_lite." in doc, mod
