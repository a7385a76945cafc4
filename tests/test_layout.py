"""The package's shape: its import graph has no cycles and no long chains, and no file is long.

The graph is computed from the source with `ast`: one node per module of
`dilated_compile`, one edge per import of another module of the package,
whether at module level or inside a function (a deferred import is still a
dependency, and counts for cycles); the longest chain is measured on
module-level imports, what importing a module runs. Imports under
``if TYPE_CHECKING:`` are left out: they never run.
``from package import name`` is an edge to ``package.name`` when that is a
module, else to the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import dilated_compile

ROOT = Path(dilated_compile.__file__).resolve().parent
PACKAGE = ROOT.name
MAX_CHAIN = 8  # modules in the longest import chain
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def _deferred(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside function bodies (run when the function is called)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in node.body:
                inside.update(id(n) for n in ast.walk(inner))
    return inside


def _imports(path: Path, name: str, modules: set[str], deferred: bool) -> set[str]:
    """The package modules `path` (module `name`) imports (`deferred`: also inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_only(tree) | (set() if deferred else _deferred(tree))
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a package module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(deferred: bool = True) -> nx.DiGraph:
    """Module -> module it imports, over every module of the package (`deferred`: imports
    inside functions count too)."""
    paths = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(paths)
    for name, path in paths.items():
        graph.add_edges_from((name, target) for target in _imports(path, name, set(paths), deferred))
    return graph


def test_the_import_graph_is_seen():
    """The graph holds what the package is known to import (so the checks below can fail)."""
    graph = import_graph()
    assert graph.has_edge(f"{PACKAGE}.passes.rewrite", f"{PACKAGE}.lowering.targets")
    assert graph.has_edge(f"{PACKAGE}.lowering.dilated.attention", f"{PACKAGE}.lowering.dilated.op")
    assert graph.has_edge(f"{PACKAGE}.lowering.common.combine", f"{PACKAGE}.lowering.common.combine_kernel")
    assert graph.number_of_nodes() > 40


def test_no_import_cycles():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_longest_import_chain():
    """What importing one module imports, transitively, at most MAX_CHAIN modules deep.
    Imports inside functions run later, when the function is first called (the
    registry loads each strategy's kernels so): they count for cycles, not here."""
    path = nx.dag_longest_path(import_graph(deferred=False))
    assert len(path) <= MAX_CHAIN, f"{len(path)} modules: " + " -> ".join(path)


def test_no_file_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_every_attention_kind_of_the_policy_is_one_registered_strategy():
    from dilated_compile.lowering.registry import STRATEGIES
    from dilated_compile.policy import ATTENTION_KINDS

    assert tuple(STRATEGIES) == tuple(ATTENTION_KINDS)
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name
