"""`safedl monitor report`: per-day counts, the attack rate with its interval, alerts by rule, time to detect and
to mitigate computed from planted audit rows, alerts and key actions (SQLite and PostgreSQL), the files it
writes, and its refusals (exit 2)."""
from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from safedl.cli import app as cli
from safedl.serve.audit import AuditStore
from safedl.serve.keys import KeyStore
from safedl.serve.monitor.store import AlertStore
from safedl.serve.stores import engine as engines
from safedl.serve.stores.schema import key_actions
from safedl.utils.stats import wilson_interval

DAY1 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture(params=["sqlite", "postgresql"])
def dbs(request, tmp_path):
    """(audit PATH_OR_URL, keys PATH_OR_URL): two SQLite files, or one PostgreSQL database for both."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.db"), str(tmp_path / "keys.db")
    url = request.getfixturevalue("pg_cluster").database()
    return url, url


def _row(ts, rid, key, *, rejected=False, image=True):
    return {"ts": ts, "request_id": rid, "key_id": key, "endpoint": "/v1/predict", "http_status": 200,
            "image_index": 0 if image else None, "rejected": rejected if image else None,
            "reason": "detector:d" if rejected else None}


def _alert(alert_id, rule, key, start, severity="high"):
    return {"alert_id": alert_id, "rule": rule, "severity": severity, "key_id": key, "state": "resolved",
            "started_at": start, "resolved_at": start + 60, "last_at": start + 60, "value": 1.0, "events": 1,
            "metric": "m", "threshold": 0.5}


def _plant(audit_db, keys_db):
    t = DAY1 + 10 * 3600  # 2026-12-01 10:00 UTC
    audit = AuditStore(audit_db)
    audit.start()
    audit.submit([_row(DAY1 - 5 * 86400, "old", "k1", rejected=True),  # before the period: not counted
                  _row(t - 60, "a", "k1"), _row(t, "b", "k1", rejected=True), _row(t + 30, "c", "k1"),
                  _row(t + 40, "d", "k2"), _row(t + 50, "e", "k2"), _row(t + 55, "f", "k2", image=False),
                  _row(DAY1 + 86400 + 100, "g", "k2")]).result(30)
    audit.close()
    alerts = AlertStore(audit_db)
    alerts.upsert(_alert("al1", "key_rejection_rate", "k1", t + 120))
    alerts.upsert(_alert("al2", "global_volume_anomaly", None, DAY1 + 86400 + 200, severity="medium"))
    alerts.close()
    KeyStore(keys_db, create=True).close()
    eng = engines.open_engine(keys_db, flag="--keys")
    with eng.begin() as conn:
        conn.execute(sa.insert(key_actions).values(key_id="k1", action="block", actor="monitor", reason="r",
                                                   alert_id="al1", params="{}", created_at=t + 150))
    eng.dispose()


def test_report_counts_rates_alerts_and_response_times(dbs, tmp_path):
    audit_db, keys_db = dbs
    _plant(audit_db, keys_db)
    out = tmp_path / "rep"
    res = CliRunner().invoke(cli, ["monitor", "report", "--db", audit_db, "--keys", keys_db, "--days", "2",
                                   "--until", "2026-12-02", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "ops_report.json").read_text())
    d1, d2 = data["days"]
    assert (d1["date"], d1["requests"], d1["images"], d1["blocked"], d1["flagged_keys"]) == ("2026-12-01", 6, 5, 1, 1)
    assert d1["attack_rate"] == {"value": 0.2, "ci95": list(wilson_interval(1, 5)), "n": 5}
    assert d1["alerts"] == {"global_volume_anomaly": 0, "key_rejection_rate": 1}
    assert (d2["requests"], d2["blocked"], d2["alerts"]["global_volume_anomaly"]) == (1, 0, 1)
    assert d2["severity"] == {"high": 0, "medium": 1}
    (timing,) = data["timings"]  # the global alert has no key: not timed
    assert (timing["alert_id"], timing["ttd_s"], timing["ttm_s"]) == ("al1", 120.0, 150.0)
    assert data["summary"]["ttm_n"] == 1 and data["summary"]["not_mitigated"] == 0
    md = (out / "ops_report.md").read_text()
    assert "| 2026-12-01 | 6 | 5 | 1 | 0.200 [" in md and "time to detect, median: 120.0 s (n=1)" in md
    html = (out / "ops_report.html").read_text()
    for name in ("requests", "blocked", "attack_rate", "flagged_keys", "alerts", "response_times"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}.png" in md and f'src="figures/{name}.png"' in html


def test_an_alert_without_an_action_is_not_mitigated(tmp_path):
    audit_db = str(tmp_path / "a.db")
    _plant(audit_db, str(tmp_path / "k.db"))
    res = CliRunner().invoke(cli, ["monitor", "report", "--db", audit_db, "--days", "2", "--until", "2026-12-02",
                                   "--out", str(tmp_path / "r")])  # no --keys: the audit file has no key actions
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r" / "ops_report.json").read_text())
    assert data["timings"][0]["ttm_s"] is None and data["summary"]["not_mitigated"] == 1


@pytest.mark.parametrize("args, message", [(["--days", "0"], "--days 0"), (["--until", "yesterday"], "--until"),
                                           (["--db", "nowhere.db"], "no such audit database")])
def test_bad_options_exit_2_and_write_nothing(tmp_path, args, message):
    audit_db = str(tmp_path / "a.db")
    _plant(audit_db, str(tmp_path / "k.db"))
    base = {"--db": audit_db, "--days": "7", "--out": str(tmp_path / "r")}
    base.update(dict(zip(args[::2], args[1::2])))
    if base["--db"] == "nowhere.db":
        base["--db"] = str(tmp_path / "nowhere.db")
    res = CliRunner().invoke(cli, ["monitor", "report", *[x for kv in base.items() for x in kv]])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r").exists()
