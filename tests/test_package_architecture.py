"""The package's dependency rules, read from the source (function-local imports counted):
cli -> run -> evaluate -> {attacks, defenses, deploy, report}; run -> decide; report -> decide; nothing imports
run/ but the CLI and safedl/__init__.py; no import cycle; only rundir.py spells the run directory's file names."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "safedl"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = ["safedl", *f.relative_to(SRC).with_suffix("").parts]
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """Every safedl module ``module`` imports (anywhere in the file), resolved to the longest existing module."""
    f = MODULES[module]
    out = set()
    for n in ast.walk(ast.parse(f.read_text())):
        names: list[str] = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg = module.split(".") if f.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - (n.level - 1)] + ([n.module] if n.module else []))
            names = [f"{base}.{a.name}" for a in n.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("safedl"):
                out.add(name)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _in(module: str, *layers: str) -> bool:
    return _layer(module) in layers


@pytest.mark.parametrize("layer,forbidden", [
    ("evaluate", ("run", "cli", "serve")),
    ("decide", ("run", "evaluate", "report", "attacks", "defenses", "deploy", "serve", "executors", "cli")),
    ("report", ("run", "evaluate", "serve", "cli")),
    ("deploy", ("run", "evaluate", "serve", "cli")),
    ("attacks", ("run", "evaluate", "decide", "report", "serve", "cli")),
    ("defenses", ("run", "evaluate", "decide", "report", "serve", "cli")),
    ("executors", ("run", "evaluate", "decide", "report", "serve", "cli")),
])
def test_layers_import_only_downwards(layer, forbidden):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if _in(m, layer) for t in ts if _in(t, *forbidden))
    assert bad == []


def test_nothing_but_the_cli_and_the_package_imports_run():
    allowed = {"safedl", "safedl.cli"}
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
                 if _in(t, "run") and not _in(m, "run") and m not in allowed)
    assert bad == []


def test_no_import_cycle():
    graph = {m: {t for t in ts if t != "safedl"} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_graph_reads_real_edges():
    """The rules above check a real graph (not an empty one): the CLI imports run, run imports evaluate."""
    assert "safedl.run" in GRAPH["safedl.cli"] or any(_in(t, "run") for t in GRAPH["safedl.cli"])
    assert any(_in(t, "evaluate") for t in GRAPH["safedl.run.stages"])


LAYOUT_NAMES = r'"(results\.json|stage\.json|state\.pt|safedl-run\.json|report\.md|report\.html|gate\.json)"'


def test_only_rundir_spells_the_run_directory_layout():
    hits = sorted(f"{f.relative_to(SRC)}:{i}" for m, f in MODULES.items() if m != "safedl.rundir"
                  and not _in(m, "serve")
                  for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(LAYOUT_NAMES, line)
                  or re.search(r'/ "(stages|artifacts)"|joinpath\("(stages|artifacts)"', line))
    assert hits == []
