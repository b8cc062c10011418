"""The service's offline commands on hostile values: CSV injection in the audit export, key limits that are not
finite positive numbers, and database values that are neither a file path nor a supported URL."""
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

URLS = ["mysql://u@h/db", "postgres://u:pw@10.0.0.1:5432/k", "./x/postgresql://u@h/db", "postgresql+asyncpg://u@h/db",
        "sqlite://", "oracle://u:pw@h/db"]


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


# -- 7: key limits ------------------------------------------------------------------------------------------------
BAD_LIMITS = [("--rate", "inf"), ("--rate", "nan"), ("--rate", "-1"), ("--rate", "0"), ("--rate", "1e309"),
              ("--rate", "-inf"), ("--rate", "1e300"), ("--burst", "0"), ("--burst", "-5"),
              ("--burst", "100000000000000000000"), ("--quota", "0"), ("--quota", "-1"),
              ("--quota", "100000000000000000000")]


@pytest.mark.parametrize("flag,value", BAD_LIMITS)
def test_keys_create_refuses_limits_that_are_not_finite_and_positive(tmp_path, flag, value):
    db = tmp_path / "k.db"
    res = _invoke("keys", "create", "--db", db, "--name", "ci", flag, value)
    assert res.exit_code == 2, res.output
    msg = res.output.strip().splitlines()[-1]
    assert msg.startswith(f"error: {flag} ") and "allowed" in msg and "Traceback" not in res.output, msg
    assert not db.exists()  # nothing half-written


def test_keys_create_api_refuses_the_same_limits(tmp_path):
    store = KeyStore(tmp_path / "k.db", create=True)
    for kw in ({"rate_per_s": math.inf}, {"rate_per_s": math.nan}, {"rate_per_s": 0}, {"burst": 0},
               {"burst": 2.5}, {"burst": True}, {"daily_quota": 10**20}, {"daily_quota": -1}, {"rate_per_s": "5"}):
        with pytest.raises(UserError, match="allowed"):
            store.create(name="k", **kw)
    assert store.list() == []
    key, _ = store.create(name="k", rate_per_s=0.5, burst=1, daily_quota=1)
    assert (key.rate_per_s, key.burst, key.daily_quota) == (0.5, 1, 1)


def test_keys_create_accepts_large_finite_limits(tmp_path):
    res = _invoke("keys", "create", "--db", tmp_path / "k.db", "--name", "big", "--rate", "1e6", "--burst",
                  "1000000", "--quota", "1000000000")
    assert res.exit_code == 0, res.output


# -- 8: database URLs ---------------------------------------------------------------------------------------------
def _commands(url: str) -> list[list[str]]:
    return [["keys", "create", "--db", url, "--name", "ci"], ["keys", "list", "--db", url],
            ["keys", "revoke", "ci", "--db", url], ["keys", "actions", "--db", url],
            ["keys", "restore", "ci", "--db", url], ["audit", "export", "--db", url, "--out", "out.csv"],
            ["db", "upgrade", url]]


@pytest.mark.parametrize("url", URLS)
def test_every_db_option_refuses_unsupported_urls_and_creates_nothing(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    for args in _commands(url):
        res = _invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        msg = res.output.strip().splitlines()[-1]
        flag = "PATH_OR_URL" if args[0] == "db" else "--db"
        assert msg.startswith(f"error: {flag} ") and "postgresql://" in msg and "sqlite:///" in msg, msg
        assert url.replace(":pw@", ":***@") in msg and ":pw@" not in msg, msg  # the value, its password hidden
        assert list(tmp_path.iterdir()) == [], (args, list(tmp_path.iterdir()))


@pytest.mark.parametrize("url", URLS + ["postgresql://u@h/db"])
def test_stores_refuse_urls_given_as_paths_or_unsupported(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    # Path() collapses '//' ("postgresql:/u@h/db"): a URL given as a Path is refused, never taken for a file
    values = ([Path(url)] if url.startswith("postgresql://") else [url] if url.startswith("./")
              else [url, Path(url)])
    for value in values:
        for open_store in (lambda v: KeyStore(v, create=True), KeyStore, AuditStore):
            with pytest.raises(UserError, match="not a supported database|needs a file path"):
                open_store(value)
    assert list(tmp_path.iterdir()) == []


def test_sqlite_urls_are_files_and_unreachable_postgres_exits_2_fast(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    res = _invoke("keys", "create", "--db", "sqlite:///sub/keys.db", "--name", "ci")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sub" / "keys.db").is_file()
    assert _invoke("keys", "list", "--db", "sub/keys.db").stdout.split()[1] == "ci"
    t0 = time.monotonic()
    res = _invoke("keys", "list", "--db", "postgresql://u:secret@127.0.0.1:1/db")  # nothing listens on port 1
    assert res.exit_code == 2 and "cannot open the key database" in res.output, res.output
    assert "secret" not in res.output and time.monotonic() - t0 < 10


@pytest.mark.parametrize("path", ["keys.db", "sub/dir/keys.db", "weird:name.db", "a/b:/c.db"])
def test_file_paths_with_colons_are_still_accepted(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    res = _invoke("keys", "create", "--db", path, "--name", "ci")
    assert res.exit_code == 0, res.output
    assert (tmp_path / path).is_file()
