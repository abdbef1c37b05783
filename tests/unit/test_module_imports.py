"""The import graph of agent/, collector/ and common/ has no cycles, counting imports made
for annotations only: a cycle means two modules share one idea that belongs in one."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "collector", "common")


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Project modules a module's source names in any import statement."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif node.module in modules:
                    found.add(node.module)
    return found


def test_project_modules_import_each_other_without_cycles() -> None:
    modules = module_files()
    graph = {
        name: imported(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
        for name, path in modules.items()
    }
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_graph_sees_imports_made_for_annotations_only() -> None:
    """The cycle test would pass vacuously if it missed TYPE_CHECKING imports."""
    modules = module_files()
    tree = ast.parse("if TYPE_CHECKING:\n    from collector.store.inventory import Entry\n")
    assert imported(tree, modules) == {"collector.store.inventory"}
