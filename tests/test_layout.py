"""The house rules of docs/architecture.md, checked on the source: every import (lazy ones inside functions
included) goes to the same or a lower floor, there is no import cycle, placement/ keeps few top-level modules, no
file is over 500 lines, and ``import placement`` pulls in nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("placement", "profiler", "ray_jobs")

# Floors, lowest first: a module may import its own floor or lower ones. Longest matching prefix wins.
FLOORS = {
    "placement.trace": 0,
    "placement.graph": 1,
    "placement.plan": 1,
    "profiler": 1,
    "placement.metrics": 2,
    "placement.timemodel": 2,
    "placement.solvers": 3,
    "placement.planner": 4,
    "placement.replan": 5,
    "placement.runtime": 6,
    "placement.deploy": 6,
    "placement.report": 6,
    "ray_jobs": 7,
    "placement.serve": 8,
    "placement.demo": 8,
    "placement.cli": 9,
    "profiler.cli": 9,
    "placement.__main__": 9,
}


def floor_of(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"{module}: no floor in tests/test_layout.py FLOORS; add its stage there")
    return FLOORS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """Project modules that ``path`` imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name refers to (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        targets = {resolve(n, modules) for n in project_imports(path)}
        graph[mod] = {t for t in targets if t and t != mod and not mod.startswith(t + ".") and t not in PACKAGES}
    return graph


def test_imports_never_go_up_a_floor():
    bad = [
        f"{mod} (floor {floor_of(mod)}) imports {t} (floor {floor_of(t)})"
        for mod, targets in import_graph().items()
        if mod not in PACKAGES  # package facades re-export lazily
        for t in sorted(targets)
        if floor_of(t) > floor_of(mod)
    ]
    assert bad == []


def test_floor_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a solver importing the CLI is reported."""
    assert floor_of("placement.solvers.affinity") < floor_of("placement.cli.plan")
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from placement.cli.plan import register\n")
    assert "placement.cli.plan" in project_imports(src)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        for t in sorted(graph.get(mod, ())):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t, [*stack, t])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def test_few_top_level_modules_and_no_long_files():
    top = [p.name for p in (REPO / "placement").glob("*.py")]
    assert len(top) <= 12, sorted(top)
    long = [
        f"{p.relative_to(REPO)}: {n}"
        for pkg in (*PACKAGES, "tests", "benchmarks")
        for p in (REPO / pkg).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    ]
    assert long == []


def test_public_api_is_lazy_and_complete():
    code = (
        "import sys, placement\n"
        "heavy = [m for m in ('torch', 'numba', 'ortools', 'pulp', 'scipy', 'ray', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from placement import make_plan, Plan, open_trace, build_graph, evaluate, PlanSpec\n"
        "assert set(placement.__all__) >= {'make_plan', 'Plan', 'open_trace', 'build_graph', 'evaluate'}\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import placement

        _ = placement.nope


def test_public_names_match_their_modules():
    import placement

    assert sorted(placement.__all__) == sorted(placement._EXPORTS)
