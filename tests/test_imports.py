"""The package's modules import one another without a circle.

Every `import` / `from ... import` in labpal_fast/ is read with `ast`, those inside functions
included (they run later, but they still tie the modules together); only imports under
`if TYPE_CHECKING:` are left out (they never run). Relative imports are resolved against the
importing module; `from package import name` counts as an import of the submodule
`package.name` when there is one, else of the package. Then a depth-first walk of the graph
looks for a cycle.
"""
import ast
import os
from typing import Dict, List, Optional, Set

import labpal_fast

PACKAGE = "labpal_fast"
ROOT = os.path.dirname(labpal_fast.__file__)


def _modules(root: str) -> Dict[str, str]:
    """Module name -> path, for every .py file of the package (a package is its __init__)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = os.path.join(folder, name)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> List[ast.stmt]:
    """Every Import / ImportFrom in the tree, at any depth, except under `if TYPE_CHECKING:`."""
    out: List[ast.stmt] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module a `from` import names (None: outside the package)."""
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == PACKAGE else None
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(module: str, path: str, known: Set[str]) -> Set[str]:
    """The package's modules that `module` imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    out: Set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
            continue
        base = _base(module, is_package, node)
        if base is None:
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != module}


def graph(root: str = ROOT) -> Dict[str, Set[str]]:
    modules = _modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def walk(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def all_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Cycles until none is left, each broken (its closing edge dropped) once found."""
    edges = {k: set(v) for k, v in edges.items()}
    found = []
    cycle = find_cycle(edges)
    while cycle is not None:
        found.append(cycle)
        edges[cycle[-2]].discard(cycle[-1])
        cycle = find_cycle(edges)
    return found


def test_the_package_has_no_import_cycle():
    cycles = all_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_local_relative_and_submodule_imports(tmp_path):
    """The graph reader on a made-up package: a function-local relative import closes a
    cycle, `from . import sub` names the submodule, a TYPE_CHECKING import is left out."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .. import a\n"
        "def f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import os\nfrom labpal_fast.a import x\n")
    edges = graph(str(pkg))
    assert edges[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.sub.c"}  # not .a: TYPE_CHECKING
    assert edges[f"{PACKAGE}.a"] == {f"{PACKAGE}.sub.b"}
    assert find_cycle(edges) == [f"{PACKAGE}.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.sub.c",
                                 f"{PACKAGE}.a"]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert find_cycle(graph(str(pkg))) is None
