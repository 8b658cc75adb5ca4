"""The layering rules of docs/ARCHITECTURE.md, checked on the source (no import of it).

**Import graph.** Nodes are the modules of ``python/dnntrace``; an edge ``a -> b`` is an import
of ``b`` that runs when ``a`` is imported: an ``import``/``from ... import`` statement at module
level, also inside ``if``/``try``/``with`` blocks and class bodies. Not counted:

- imports inside functions (they run when called, after every module is loaded; this is how a
  module may reach "up" lazily, e.g. ``dnntrace.__init__``'s PEP 562 names);
- imports under ``if TYPE_CHECKING:`` (never run);
- ``importlib.import_module(...)`` calls (the extension registry's lazy built-ins);
- the implicit import of a parent package (Python runs it before any submodule).

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The
graph must be acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "python"
NATIVE = {"dnntrace._C"}  # compiled: no source, imports nothing of dnntrace


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(
    tree: ast.Module, functions: bool = False
) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, ast.Import | ast.ImportFrom):
                found.append(st)
            elif isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef):
                if functions:
                    visit(st.body)
            elif isinstance(st, ast.If):
                if not _is_type_checking(st.test):
                    visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.ClassDef):
                visit(st.body)
            elif isinstance(st, ast.Try | ast.TryStar):
                visit(st.body)
                for h in st.handlers:
                    visit(h.body)
                visit(st.orelse)
                visit(st.finalbody)
            elif isinstance(st, ast.With | ast.AsyncWith | ast.For | ast.While):
                visit(st.body)
                visit(getattr(st, "orelse", []))

    visit(tree.body)
    return found


def import_graph(root: Path, package: str, functions: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` its module-level imports load (docstring's rules);
    ``functions=True`` also counts the imports inside functions."""
    mods = _modules(root, package)
    known = set(mods) | {m for m in NATIVE if m.startswith(package + ".")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level_imports(tree, functions):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = name.split(".")
                    if not is_pkg:
                        base_parts = base_parts[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in known else base)
            for t in targets:
                # ``import a.b.c`` loads a, a.b and a.b.c: the deepest known one is the edge
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name and t in mods:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                c = dfs(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = dfs(n)
            if c:
                return c
    return None


def test_no_import_cycle_in_dnntrace() -> None:
    graph = import_graph(ROOT, "dnntrace")
    assert "dnntrace.capture.tracer" in graph and "dnntrace.ops" in graph  # the walk found them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_even_through_function_imports_in_capture_ops_stats() -> None:
    """Inside capture/, ops.py and stats/ not even a lazy import closes a cycle (the tracer once
    imported its extensions in functions while they imported it, and ops.py imported the
    tracer): the built-in extensions come through the registry's ``importlib`` instead."""
    full = import_graph(ROOT, "dnntrace", functions=True)
    core = ("dnntrace.capture", "dnntrace.ops", "dnntrace.stats")
    sub = {m: {t for t in e if t.startswith(core)} for m, e in full.items() if m.startswith(core)}
    cycle = find_cycle(sub)
    assert cycle is None, "import cycle (counting imports in functions): " + " -> ".join(
        cycle or []
    )


def test_cycle_finder_finds_cycles(tmp_path: Path) -> None:
    """The check itself can fail: a package with a cycle through a relative import, one under
    TYPE_CHECKING and one inside a function (only the first counts)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import c\n"
        "def f():\n    from ..c import C\nB = 1\n"
    )
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == set()
    assert find_cycle(graph) is None
    (pkg / "sub" / "b.py").write_text(
        "try:\n    from ..c import C\nexcept ImportError:\n    pass\n"
    )
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c"}


BUILTIN_EXTENSIONS = ("units", "anomaly", "distributed", "spectral")


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add(("." * node.level) + (node.module or ""))
            out.update(("." * node.level) + (node.module or "") + "." + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("module", ["tracer", "contract", "config", "pipeline"])
def test_tracer_and_contract_import_no_extension(module: str) -> None:
    """The tracer resolves extensions through the registry (``capture.contract``), even in
    functions it imports none of them."""
    imports = _all_imports(ROOT / "dnntrace" / "capture" / f"{module}.py")
    ours = [i for i in imports if i.startswith((".", "dnntrace"))]  # not torch.distributed
    for ext in BUILTIN_EXTENSIONS:
        hits = [i for i in ours if i.endswith(f".{ext}") or f".{ext}." in i]
        assert not hits, (module, hits)


@pytest.mark.parametrize("ext", BUILTIN_EXTENSIONS)
def test_builtin_extensions_use_only_the_contract(ext: str) -> None:
    """No private attribute of the tracer (``tracer._slot``, ``tr._pipe``, ...) and no import of
    ``capture.tracer``: a built-in extension does only what a user's can."""
    path = ROOT / "dnntrace" / "capture" / f"{ext}.py"
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            v = node.value
            if (isinstance(v, ast.Name) and v.id in ("tracer", "tr")) or (
                isinstance(v, ast.Attribute) and v.attr == "_tracer"
            ):
                bad.append(f"line {node.lineno}: .{node.attr}")
    assert not bad, bad
    assert not any(i.endswith(".tracer") or ".tracer." in i for i in _all_imports(path))


def test_torch_ops_enable_is_set_by_the_package() -> None:
    """``ops.py`` imports nothing of capture (it sat in the cycle ops -> capture.tracer)."""
    imports = _all_imports(ROOT / "dnntrace" / "ops.py")
    assert not any("capture" in i for i in imports), sorted(imports)
    assert "_expose_torch_ops" in (ROOT / "dnntrace" / "__init__.py").read_text()
