"""The package's shape, checked: subpackages by stage, no import cycle, modules and functions small
enough to read at once. Read from the source with ast: nothing is imported."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "m2f_cli"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# the top of the package: public API, CLI, recipe, config, errors, records (README "Architecture")
MAX_TOP_MODULES = 14
STAGES = ("inputs", "model", "postprocess", "tiling", "tracking", "outputs", "engines", "tools", "cli")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Every m2f_cli module path imports: at module level, inside functions and under
    TYPE_CHECKING alike (a cycle is a cycle in the design, however it is deferred)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package imports absolutely: m2f_cli.*)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("m2f_cli"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("m2f_cli")}
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_and_nothing_imports_the_package_root():
    """The package root (m2f_cli/__init__.py) is the public facade: its lazy attributes reach the
    whole library, so no module may import from it (m2f_cli.version holds the version)."""
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    importers = sorted(name for name, deps in graph.items() if "m2f_cli" in deps and name != "m2f_cli")
    assert importers == []
    graph = {name: deps - {"m2f_cli"} for name, deps in graph.items() if name != "m2f_cli"}
    assert cycles(graph) == []


def test_modules_are_small_and_the_top_holds_the_api_the_cli_and_the_recipe():
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(STAGES)


def _body_lines(fn: ast.AST) -> int:
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return fn.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_body_over_60_lines(path):
    long = [(node.name, _body_lines(node)) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_FUNCTION_LINES]
    assert long == []
