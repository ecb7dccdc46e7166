"""The package's import graph: no circles, and no part of the package treated as optional.

Every module under ``ipu_sparse/`` is parsed with ``ast`` (nothing is imported); each
``import``/``from ... import`` of our own package, at module level or inside a function,
is an edge. A module's own ancestor packages are left out (Python initialises them first
either way); every other package on the way to a target is an edge too, since importing
``a.b.c`` runs ``a/b/__init__.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

PKG = "ipu_sparse"
ROOT = Path(__file__).resolve().parents[2] / PKG


def module_files() -> Dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom) -> Optional[str]:
    """Absolute name of the module a ``from X import ...`` reads X from (None if not ours)."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{node.module}" if node.module else pkg
    return base if base == PKG or base.startswith(PKG + ".") else None


def _with_packages(target: str) -> List[str]:
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(module: str, tree: ast.AST) -> List[Tuple[str, ast.AST]]:
    """(our module, node) for every import of our package anywhere in ``tree``."""
    found = []
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == PKG or a.name.startswith(PKG + ".")]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            if base is None:
                continue
            targets = [base]
            # ``from pkg import sub`` imports the submodule ``pkg.sub``.
            targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        for target in targets:
            found += [(t, node) for t in _with_packages(target) if t in MODULES]
    return found


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        ancestors = set(_with_packages(module))
        graph[module] = {t for t, _ in imported_modules(module, tree) if t not in ancestors}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    comps: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    if handler.type is None:
        return True
    for t in (handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]):
        if isinstance(t, ast.Name):
            names.append(t.id)
        elif isinstance(t, ast.Attribute):
            names.append(t.attr)
    return bool({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names))


def _top_level_names(module: str) -> Set[str]:
    tree = ast.parse(MODULES[module].read_text())
    names: Set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def imported_python_modules(module: str, tree: ast.AST) -> List[Tuple[str, ast.AST]]:
    """Like ``imported_modules`` but only the module each import is for, not the packages on the
    way; ``from pkg import name`` where ``name`` is neither a Python module nor defined in
    ``pkg`` is a compiled extension (the C++ kernel, optional by design) and is left out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            if base is None or base not in MODULES:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    found.append((sub, node))
                elif not _is_package(base) or a.name in _top_level_names(base) or a.name == "*":
                    found.append((base, node))
    return found


def guarded_own_imports() -> List[str]:
    """``file:line`` of every import of our package inside a ``try`` whose handler catches ImportError."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try) or not any(_catches_import_error(h) for h in node.handlers):
                continue
            body = ast.Module(body=node.body, type_ignores=[])
            for _, imp in imported_python_modules(module, body):
                bad.append(f"{path.relative_to(ROOT.parent)}:{imp.lineno}")
            # importlib.import_module / find_spec of our own modules count too.
            for call in ast.walk(body):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                        and call.func.attr in ("import_module", "find_spec"):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{call.lineno}")
    return sorted(set(bad))


def test_graph_sees_every_module_and_known_edges():
    graph = import_graph()
    assert len(graph) == len(MODULES) > 30
    # A sanity check of the parser itself: edges every version of the package has.
    assert "ipu_sparse.config" in graph["ipu_sparse.model"]
    assert "ipu_sparse.errors" in graph["ipu_sparse.cli"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import circles among our modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_own_modules_are_never_optional():
    bad = guarded_own_imports()
    assert bad == [], "imports of our own package under `except ImportError`: " + ", ".join(bad)


def private_names_imported() -> List[str]:
    """``file:line name`` of every ``_private`` name one of our modules imports from another
    (a name shared between modules is public, or it belongs in the module that uses it)."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve_from(module, node) is not None:
                base = _resolve_from(module, node)
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and f"{base}.{a.name}" not in MODULES:
                        if not (_is_package(base) and a.name not in _top_level_names(base)):  # compiled extension
                            bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {a.name}")
    return sorted(bad)


def test_no_private_names_across_modules():
    bad = private_names_imported()
    assert bad == [], "private names imported from another module: " + ", ".join(bad)
