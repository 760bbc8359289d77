"""pqcompile's modules import each other without cycles: every module imports in a fresh interpreter, and the
package's own import graph (read from the source, function-level imports included) has no cycle, so no
import order can find a module half-initialized."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pqcompile"


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """{dotted name: (file, is a package)} for every .py file under pqcompile/."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Imports under `if TYPE_CHECKING:` never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(n for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _imported(module: str, is_pkg: bool, node: ast.AST) -> list[str]:
    """Dotted names an import statement names, resolved against `module` (relative imports)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
    else:
        base = node.module.split(".")
    target = ".".join(base)
    return [target] + [f"{target}.{a.name}" for a in node.names]  # `from . import x`: x may be a module


def import_graph() -> dict[str, set[str]]:
    """module -> the pqcompile modules its import statements run. Importing a.b.c runs a.b's __init__ first,
    unless the importer lives inside a.b (then a.b is already initializing)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if node in skipped:
                continue
            for name in _imported(module, is_pkg, node):
                parts = name.split(".")
                for i in range(2, len(parts) + 1):  # skip the root package: its __init__ imports little
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                        graph[module].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for root in sorted(graph):
        if state[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"pqcompile.report", "pqcompile.report_html", "pqcompile.passes.common"} <= set(graph)
    assert "pqcompile.report_html" in graph["pqcompile.report"]  # the graph sees relative imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported')"
    # from the repo root: this checkout's pqcompile (sys.path[0] is the working directory with -c)
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "imported"
