"""The library's import graph: no cycles, function-level imports included, and those left are optional extras.

Built from every module's AST (nothing is imported), so an import hidden inside a function counts as much as one
at the top of a file.  ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
the implicit import of a parent package (``import a.b`` runs ``a/__init__``) is not an edge, as a package's
``__init__`` only re-exports what lies below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "lmforge"

# What a function may import lazily: optional dependencies (extras in pyproject.toml) and the standard library's
# heavier corners.  Anything from lmforge itself is imported at the top of its module.
OPTIONAL = {"transformers", "peft", "trl", "lm_eval", "datasets", "pyarrow", "matplotlib", "tensorboard", "torch.utils.tensorboard"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported lmforge module, node, at function level) for every import statement of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level are module level too
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base) + (f".{node.module}" if node.module else "")
            else:
                base_name = node.module or ""
            names = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in MODULES else base_name for a in node.names]
        else:
            continue
        for name in names:
            found.append((name, node, id(node) not in top))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(module, path):
            target = _resolve(name) if name.startswith("lmforge") else None
            if target and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_is_seen() -> None:
    assert {"lmforge.apps.cli", "lmforge.train.trainer", "lmforge.core.io"} <= set(MODULES)
    assert "lmforge.core" in _graph()["lmforge.train.trainer"] or any(
        m.startswith("lmforge.core") for m in _graph()["lmforge.train.trainer"])


def test_no_import_cycle_between_library_modules() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_function_level_imports_are_optional_extras_with_a_comment() -> None:
    bad = []
    for module, path in sorted(MODULES.items()):
        lines = path.read_text(encoding="utf-8").splitlines()
        where = path.relative_to(ROOT.parent)
        for name, node, nested in _imports(module, path):
            if not nested:
                continue
            if not any(name == o or name.startswith(o + ".") for o in OPTIONAL):
                bad.append(f"{where}:{node.lineno} imports {name} inside a function (import it at the top)")
                continue
            comment = " ".join(lines[max(node.lineno - 2, 0): node.lineno])
            if "pip install" not in comment:
                bad.append(f"{where}:{node.lineno} imports {name} (optional) without a comment naming its extra")
    assert not bad, "\n".join(dict.fromkeys(bad))
