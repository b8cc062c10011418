"""The service's offline commands on hostile values: CSV injection in the audit export, key limits that are not
finite positive numbers, and database URLs where this version takes only SQLite file paths."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safedl.cli import app as cli
from safedl.errors import UserError
from safedl.serve.audit import AuditStore, export_rows
from safedl.serve.keys import KeyStore

URLS = ["postgresql://u@h/db", "sqlite:///keys.db", "./x/postgresql://u@h/db", "postgres://u:pw@10.0.0.1:5432/k"]


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- 6: CSV injection ---------------------------------------------------------------------------------------------
def _audit_db(path: Path, rows: list[dict]) -> Path:
    store = AuditStore(path)
    store.start()
    store.submit(rows).result(timeout=10)
    store.close()
    return path


def test_csv_export_neutralizes_formula_cells_and_keeps_numbers(tmp_path):
    hostile = {"client": "=1+2", "error": "+cmd|' /C calc'!A0", "reason": "@SUM(A1:A9)", "key_id": "-2+3",
               "endpoint": "\t=HYPERLINK(\"http://x\")", "class_name": "\r=1", "tier": "=", "bundle_version": "ok=1"}
    db = _audit_db(tmp_path / "a.db", [{"ts": 1.0, "request_id": "r1", "http_status": 200, "label": -1,
                                        "confidence": -0.25, "latency_ms": 3.5, **hostile}])
    assert export_rows(db, tmp_path / "out.csv", fmt="csv") == 1
    with open(tmp_path / "out.csv", newline="") as f:
        row = next(csv.DictReader(f))
    for col, value in hostile.items():
        want = value if col == "bundle_version" else "'" + value
        assert row[col] == want, col
    assert (row["label"], row["confidence"], row["latency_ms"], row["http_status"]) == ("-1", "-0.25", "3.5", "200")
    export_rows(db, tmp_path / "out.jsonl", fmt="jsonl")  # JSONL is data, not a spreadsheet: left exact
    got = json.loads((tmp_path / "out.jsonl").read_text())
    assert {c: got[c] for c in hostile} == hostile and got["confidence"] == -0.25
