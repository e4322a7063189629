"""The import rules of docs/architecture.md, checked on the import graph of ``ptqat_fx``
built from the source (``ast``): every import counts, at module level or inside a function,
except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "ptqat_fx"
ORCHESTRATION = ("passes", "api", "cli", "train", "export", "views")


def _module_name(path: Path) -> str:
    parts = ["ptqat_fx", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every run-time import in ``tree``."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> tuple[nx.DiGraph, dict[str, list[tuple[str, list[str]]]]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    imports = {}
    for name, path in modules.items():
        imports[name] = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        for target, names in imports[name]:
            # "from . import x" imports the module x when there is one.
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            for resolved in targets:
                while resolved and resolved not in modules:
                    resolved = resolved.rpartition(".")[0]
                if resolved and resolved != name:
                    graph.add_edge(name, resolved)
    return graph, imports


GRAPH, IMPORTS = _graph()


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_the_package():
    assert {"ptqat_fx.runtime.quantizer", "ptqat_fx.passes.freeze", "ptqat_fx.layer_kinds"} <= set(GRAPH)
    assert GRAPH.has_edge("ptqat_fx.passes.freeze", "ptqat_fx.layer_kinds")


def test_no_import_cycle():
    # Package __init__ files re-export public names; a cycle through one is still a cycle.
    assert list(nx.simple_cycles(GRAPH)) == []


def test_runtime_imports_no_orchestration():
    offending = [
        (source, target) for source, target in GRAPH.edges
        if _area(source) == "runtime" and _area(target) in ORCHESTRATION
    ]
    assert offending == []


def test_no_module_imports_another_pass_modules_private_names():
    offending = []
    for module, found in IMPORTS.items():
        for target, names in found:
            if target.startswith("ptqat_fx.passes.") and target != module:
                offending += [(module, target, n) for n in names if n.startswith("_")]
    assert offending == []


def test_library_never_imports_examples():
    offending = [(m, t) for m, found in IMPORTS.items() for t, _ in found if t.split(".")[0] in ("examples", "bench", "tests")]
    assert offending == []
    touches_sys_path = [
        (path.name, node.lineno) for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "path"
        and isinstance(node.value, ast.Name) and node.value.id == "sys"
    ]
    assert touches_sys_path == []


def test_a_planted_cycle_and_a_planted_runtime_import_are_caught():
    # The checks above must be able to fail: plant both faults in a copy of the graph.
    planted = GRAPH.copy()
    planted.add_edge("ptqat_fx.runtime.quantizer", "ptqat_fx.passes.freeze")
    assert list(nx.simple_cycles(planted))
    assert any(_area(s) == "runtime" and _area(t) in ORCHESTRATION for s, t in planted.edges)
    relative = _imports(ast.parse("from ..passes.convert import _private"), "ptqat_fx.runtime.x", False)
    assert relative == [("ptqat_fx.passes.convert", ["_private"])]
