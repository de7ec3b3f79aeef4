"""The package layout's rule: imports point one way, api -> service -> sched -> (runner, memory)
-> models, everything may import the shared vocabulary (settings, durations) and the process
tree (procs), and no module import circle exists (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ollamad"
SHARED = {"ollamad", "ollamad.settings", "ollamad.durations", "ollamad.procs"}  # importable from anywhere
# which layers each layer may import, besides itself and SHARED
MAY_IMPORT = {
    "api": {"service", "sched", "runner", "memory", "models"},
    "service": {"sched", "runner", "memory", "models"},
    "sched": {"runner", "memory", "models"},
    "runner": {"models"},
    "memory": {"models"},
    "models": set(),
}
TOP = {"ollamad.app", "ollamad.cli"}  # wiring: may import anything


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ollamad module ``path`` imports, at any depth of its code."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ollamad")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "ollamad":
                continue
            for a in node.names:  # `from ollamad.models import store` imports the module store
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute ollamad.* imports")
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else None


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in g.items():
        if src in TOP:
            continue
        src_layer = layer(src)
        for dst in deps:
            if dst in SHARED:
                continue
            dst_layer = layer(dst)
            if src_layer is None:  # settings/durations may only import each other
                bad.append(f"{src} -> {dst}")
            elif dst_layer != src_layer and dst_layer not in MAY_IMPORT[src_layer]:
                bad.append(f"{src} ({src_layer}) -> {dst} ({dst_layer})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                found.append([*stack[stack.index(d):], d])
            elif d in g and d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return found


def test_every_module_sits_in_a_known_place() -> None:
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "settings", "durations", "procs", "app", "cli"}
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(MAY_IMPORT)
    for name in packages:
        assert ast.get_docstring(ast.parse((PKG / name / "__init__.py").read_text())), f"{name} has no docstring"


def test_imports_point_one_way() -> None:
    assert violations(graph()) == []


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_no_module_over_450_lines() -> None:
    long = {module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_no_route_module_imports_another() -> None:
    routes = {"ollamad.api.native", "ollamad.api.manage", "ollamad.api.embed", "ollamad.api.openai_compat"}
    g = graph()
    assert {(m, d) for m in routes for d in g[m] if d in routes} == set()


@pytest.mark.parametrize(("edge", "caught"), [
    ({"ollamad.models.catalog": {"ollamad.sched.core"}}, True),
    ({"ollamad.runner.child": {"ollamad.memory.fit"}}, True),
    ({"ollamad.sched.core": {"ollamad.api.common"}}, True),
    ({"ollamad.settings": {"ollamad.models.plan"}}, True),
    ({"ollamad.api.native": {"ollamad.models.plan", "ollamad.settings"}}, False),
])
def test_the_checker_catches_an_upward_import(edge: dict[str, set[str]], caught: bool) -> None:
    assert bool(violations(edge)) is caught


def test_the_checker_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
