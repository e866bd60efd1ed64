"""The package's layering: no import cycle, the library never imports the CLI, one way to do a job."""

from __future__ import annotations

import ast
import pkgutil
import re
from pathlib import Path

import clc_dask

PACKAGE = Path(clc_dask.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    out = {"clc_dask": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="clc_dask."):
        path = PACKAGE.joinpath(*info.name.split(".")[1:])
        out[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return out


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere — at the top or inside functions — except
    under ``if TYPE_CHECKING:`` (never executed)."""
    tree = ast.parse(path.read_text("utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skipped |= {id(n) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: imported_modules(name, path, names) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 30 and "clc_dask.run.execute" in graph
    assert cycles(graph) == []


def test_the_library_never_imports_the_cli():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("clc_dask.cli"))
                 for m, deps in graph.items() if not m.startswith("clc_dask.cli")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_one_atomic_writer_and_one_zarr_format():
    """Directory stores are swapped into place only by clc_dask.stores; every Zarr store is
    written in its one format."""
    swaps = re.compile(r"os\.replace\(|os\.rename\(|shutil\.move\(|mkdtemp\(|zarr_format=\d")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "stores.py" and "demo" not in p.parts and swaps.search(p.read_text("utf-8"))]
    assert offenders == []


def test_one_season_table_and_one_composite_table():
    seasons = re.compile(r"\{\s*\"april\":\s*4")
    composites = re.compile(r"\"nrg\":\s*\(\"B08\"")
    season_tables = [p.name for p in PACKAGE.rglob("*.py") if seasons.search(p.read_text("utf-8"))]
    composite_tables = [p.name for p in PACKAGE.rglob("*.py") if composites.search(p.read_text("utf-8"))]
    assert season_tables == ["seasons.py"] and composite_tables == ["items.py"]
