"""The package's layers, read from its source (ast, imports inside functions included): no import
cycle, no forbidden edge (docs/architecture.md, "Layers"), no function longer than 60 lines; in
the engine, no function over 40 lines, no module over 300, and the user's speed switches read
only by the plan (engine/plan.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "amusd_viz"
HEAVY = {"torch", "transformers", "textual"}
# Modules that must load on a machine without models: replay, stats and trace export.
LIGHT = ("amusd_viz.config", "amusd_viz.events", "amusd_viz.eventlog", "amusd_viz.stats",
         "amusd_viz.trace", "amusd_viz.summary")
MAX_FUNCTION_LINES = 60
MAX_ENGINE_FUNCTION_LINES = 40
MAX_ENGINE_MODULE_LINES = 300
# the user's switches (RunConfig's and EngineConfig's names); a loop or policy reads the plan
SWITCHES = {"adaptive", "spec_cache", "siblings", "tree", "draft_lookup", "lend_core", "lookup",
            "lend", "wait_steps"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def imports_of(tree: ast.Module, known: set[str]) -> set[str]:
    """Every module this one imports, anywhere in it: package modules by full name, others by
    their top-level name."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from amusd_viz.engine import loops` imports the module amusd_viz.engine.loops
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            out.add(name if name.startswith("amusd_viz") else name.split(".")[0])
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports_of(tree, known) for name, tree in trees.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(w for w in edges.get(v, ()) if w in edges)
    return seen


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_engine_and_models_never_import_the_ui():
    edges = graph()
    for name, deps in edges.items():
        if name.startswith(("amusd_viz.engine", "amusd_viz.models")):
            assert not {d for d in deps if d.startswith("amusd_viz.ui")}, name


def test_the_ui_never_imports_the_command_line():
    edges = graph()
    for name, deps in edges.items():
        if name.startswith("amusd_viz.ui"):
            assert not deps & {"amusd_viz.cli", "amusd_viz.commands"}, name


@pytest.mark.parametrize("light", LIGHT)
def test_light_modules_import_no_torch_transformers_or_textual(light):
    edges = graph()
    for name in reachable(edges, light):
        assert not edges[name] & HEAVY, f"{light} reaches {name}, which imports {edges[name] & HEAVY}"


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def engine_modules() -> dict[str, ast.Module]:
    return {name: tree for name, tree in modules().items() if name.startswith("amusd_viz.engine")}


def long_functions(trees: dict[str, ast.Module], limit: int) -> list[str]:
    return [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in trees.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_engine_function_is_longer_than_40_lines():
    assert long_functions(engine_modules(), MAX_ENGINE_FUNCTION_LINES) == []


def test_no_engine_module_is_longer_than_300_lines():
    sizes = {name: len((PACKAGE.parent / (name.replace(".", "/") + ".py")).read_text()
                       .splitlines()) for name in engine_modules() if name != "amusd_viz.engine"}
    assert {name: n for name, n in sizes.items() if n > MAX_ENGINE_MODULE_LINES} == {}


def switch_reads(tree: ast.Module) -> list[str]:
    """`x.adaptive` and the like, loaded anywhere in a module (a field's definition is not a
    read), and getattr(x, "adaptive")."""
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in SWITCHES
                and isinstance(node.ctx, ast.Load)):
            out.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "getattr" and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in SWITCHES):
            out.append(f"line {node.lineno}: getattr {node.args[1].value}")
    return out


def test_only_the_plan_reads_the_users_speed_switches():
    found = {name: reads for name, tree in engine_modules().items()
             if name != "amusd_viz.engine.plan" and (reads := switch_reads(tree))}
    assert found == {}


def test_the_switch_finder_finds_reads():
    assert switch_reads(ast.parse("x = cfg.adaptive and req.lookup")) == [
        "line 1: .adaptive", "line 1: .lookup"]
    assert switch_reads(ast.parse("getattr(cfg, 'tree')")) == ["line 1: getattr tree"]
    assert switch_reads(ast.parse("class A:\n    adaptive: bool = True\nA().adaptive = 1")) == []
