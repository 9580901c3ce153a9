"""Import cycles and deferred imports among ``megatron_opd`` modules (static, with ``ast``).

    python tools/import_cycles.py [PACKAGE_DIR]

Prints three lists:

1. cycles of the module-level import graph (what runs at import time; ``if TYPE_CHECKING:``
   imports excluded, parent packages included, since importing ``a.b`` runs ``a/__init__``);
2. cycles of the same graph with the ``TYPE_CHECKING`` and function-level imports added: the
   modules that depend on each other, whatever dodges the cycle at import time;
3. deferred imports: function-level ``megatron_opd`` imports whose target reaches the importing
   module through module-level (or ``TYPE_CHECKING``) imports, i.e. imports moved into a function
   because at the top of the module they would close a cycle. Other function-level imports
   (deferred to keep a module light, e.g. off torch or megatron) are counted, not listed.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT_PACKAGE = "megatron_opd"


def module_names(package_dir: Path) -> dict[str, Path]:
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, module: str, is_package: bool, known: set[str]) -> list[tuple[str, str, int]]:
    """(kind, target module, line) for every ``megatron_opd`` import; kind: top | typing | function."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str, int]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        source = resolve(node)
        out = [source]
        out += [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
        return out

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    if target == ROOT_PACKAGE or target.startswith(ROOT_PACKAGE + "."):
                        found.append((kind, target, child.lineno))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test) and kind == "top":
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), kind)
            else:
                visit(child, kind)

    visit(tree, "top")
    return found


def with_parents(target: str, known: set[str]) -> list[str]:
    """``a.b.c`` -> the known modules among ``a``, ``a.b``, ``a.b.c`` (importing one runs its parents)."""
    parts = target.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in known]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        for w in graph.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def main(package_dir: Path) -> None:
    names = module_names(package_dir)
    known = set(names)
    runtime: dict[str, set[str]] = defaultdict(set)
    typed: dict[str, set[str]] = defaultdict(set)
    everything: dict[str, set[str]] = defaultdict(set)
    function_level: list[tuple[str, int, str]] = []
    for module, path in sorted(names.items()):
        for kind, target, line in imports(path, module, path.name == "__init__.py", known):
            for dep in with_parents(target, known):
                if dep == module or module.startswith(dep + "."):
                    continue  # a package's own parents are already running
                everything[module].add(dep)
                if kind == "top":
                    runtime[module].add(dep)
                if kind in ("top", "typing"):
                    typed[module].add(dep)
            if kind == "function":
                function_level.append((module, line, target))

    print("1. cycles among module-level imports:")
    for component in cycles(runtime) or [["(none)"]]:
        print("   " + " <-> ".join(component))
    print("2. cycles with TYPE_CHECKING and function-level imports added:")
    for component in cycles(everything) or [["(none)"]]:
        print("   " + " <-> ".join(component))
    deferred = [
        (m, line, t)
        for m, line, t in function_level
        if any(reaches(typed, dep, m) for dep in with_parents(t, known) if dep != m)
    ]
    print(f"3. deferred imports that dodge a cycle ({len(deferred)} of {len(function_level)} function-level imports):")
    for module, line, target in deferred or [("(none)", 0, "")]:
        print(f"   {names.get(module, module)}:{line}: {target}" if line else "   (none)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / ROOT_PACKAGE))
