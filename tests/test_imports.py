"""Imports between flashlight's modules go one way: the graph of `flashlight.*` imports has no cycle.

Every import counts, at any depth (a function-level import that hides a cycle is still a cycle),
absolute or relative. Importing a module does not count as importing its parents' __init__.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flashlight"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set, root: Path = PACKAGE) -> set:
    """The flashlight modules `path` imports (`from pkg import mod` counts as mod when it is a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [(base, [a.name for a in node.names])]
        else:
            continue
        for base, names in targets:
            for n in names:
                if f"{base}.{n}" in modules:
                    found.add(f"{base}.{n}")
                elif base in modules:
                    found.add(base)
            if not names:  # import a.b.c: the module named
                while base and base not in modules:
                    base = base.rpartition(".")[0]
                if base:
                    found.add(base)
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, modules, root) for p in paths}


def find_cycle(graph: dict) -> list | None:
    """One cycle as [a, b, …, a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m], _ = "open", stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m], _ = "done", stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_graph_covers_the_package():
    graph = import_graph()
    assert {"flashlight", "flashlight.compiler.backend", "flashlight.harness.run", "flashlight.report.build",
            "flashlight.tune"} <= set(graph)
    assert "flashlight.compiler.runtime" in graph["flashlight.compiler.backend"]
    assert "flashlight.report.build" in graph["flashlight.harness.run"]  # a function-level import


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found(tmp_path):
    pkg = tmp_path / "flashlight"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from flashlight.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    assert find_cycle(import_graph(pkg)) in (["flashlight.a", "flashlight.sub.b", "flashlight.a"],
                                             ["flashlight.sub.b", "flashlight.a", "flashlight.sub.b"])
