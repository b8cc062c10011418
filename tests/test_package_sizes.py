"""Issue 29's size limits, read from the source: no module over 450 lines (profile.py and cli.py split into one
module per command group before they pass it) and no function over 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "safedl"
MAX_FILE, MAX_FUNCTION = 450, 80
MODULES = sorted(SRC.rglob("*.py"))


def test_no_module_is_longer_than_450_lines():
    assert len(MODULES) > 100 and (SRC / "profile.py") in MODULES and (SRC / "cli.py") in MODULES
    long = {str(p.relative_to(SRC)): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_FILE}
    assert long == {}


def test_no_function_is_longer_than_80_lines():
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION:
                    long[f"{path.relative_to(SRC)}:{node.name}"] = node.end_lineno - start + 1
    assert long == {}
