"""The security monitor of `safedl serve` (issue 13): per-key query detectors in the service, alert rules, alert
state in the audit database, sinks, automatic key actions reversible with `safedl keys`, the summary endpoint."""
from __future__ import annotations

import base64
import json
import sqlite3
import time

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _monitor_helpers import WebhookReceiver, near_duplicates, npy, write_config  # noqa: E402
from _serve_helpers import make_bundle  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.errors import UserError  # noqa: E402
from safedl.serve import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.monitor import DEFAULT_RULES, load_monitor_config  # noqa: E402
from safedl.serve.monitor.calibration import quantize  # noqa: E402

ATTACK_RULE = {"name": "query_attack", "metric": "stateful_flags", "scope": "key", "window": {"count": 50},
               "threshold": 5, "severity": "critical"}


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("monitor") / "bundle")


@pytest.fixture(scope="module")
def calibration(bundle_dir, tmp_path_factory):
    """Thresholds measured by `safedl monitor calibrate` on benign streams of the digits training split (seed 0)."""
    out = tmp_path_factory.mktemp("calib") / "calibration.json"
    res = CliRunner().invoke(cli_app, ["monitor", "calibrate", str(bundle_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_calibration_is_measured_for_the_bundle_and_refuses_other_detector_settings(calibration, bundle_dir,
                                                                                      tmp_path):
    rec = json.loads(calibration.read_text())
    assert rec["bundle_version"] == load_bundle(bundle_dir).version and rec["streams"] == [3500, 2000, 2000]
    assert rec["stateful"]["threshold"] > 0 and 0 < rec["prada"]["delta"] < 1
    path = write_config(tmp_path / "m.yml", calibration=calibration, rules=[ATTACK_RULE],
                        detectors={"stateful": {"k": 20}})
    with pytest.raises(UserError, match="k = 20.*k = 50"):
        create_app(bundle=load_bundle(bundle_dir), keys=KeyStore(tmp_path / "k.db", create=True),
                   audit=AuditStore(tmp_path / "a.db"), monitor_config=load_monitor_config(path))


class Mon:
    """The app with a monitor, three keys (benign and attacker: full tier; ops: admin scope)."""

    def __init__(self, tmp_path, bundle_dir, calibration, rules, **extra):
        self.keys_db, self.audit_db = tmp_path / "keys.db", tmp_path / "audit.db"
        self.keys = KeyStore(self.keys_db, create=True)
        self.tokens = {n: self.keys.create(name=n, tier="full", rate_per_s=1e4, burst=10_000)[1]
                       for n in ("benign", "attacker")}
        self.tokens["ops"] = self.keys.create(name="ops", scopes=("admin",))[1]
        self.ops = {"Authorization": f"Bearer {self.tokens['ops']}"}
        self.ids = {k.name: k.key_id for k in self.keys.list()}
        self.config_path = write_config(tmp_path / "monitor.yml", calibration=calibration, rules=rules, **extra)
        self.app = create_app(bundle=load_bundle(bundle_dir), keys=self.keys, audit=AuditStore(self.audit_db),
                              monitor_config=load_monitor_config(self.config_path))
        self.monitor = self.app.state.service.monitor

    def predict(self, who: str, x: torch.Tensor):
        return self.client.post("/v1/predict", content=npy(x), headers={
            "Authorization": f"Bearer {self.tokens[who]}", "Content-Type": "application/x-npy"})

    def summary(self) -> dict:
        self.monitor.flush()
        r = self.client.get("/v1/monitor/summary", headers={"Authorization": f"Bearer {self.tokens['ops']}"})
        assert r.status_code == 200, r.text
        return r.json()

    def alerts(self) -> list[dict]:
        conn = sqlite3.connect(self.audit_db)
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM monitor_alerts ORDER BY started_at")]
        conn.close()
        return rows


@pytest.fixture
def mon_factory(tmp_path, bundle_dir, calibration):
    made = []

    def make(rules, **extra):
        m = Mon(tmp_path, bundle_dir, calibration, rules, **extra)
        m.client = TestClient(m.app).__enter__()
        made.append(m)
        return m

    yield make
    for m in made:
        m.client.__exit__(None, None, None)


def _attack(m: Mon, digits_splits, n: int, *, per_request: int = 1, seed: int = 0):
    x = near_duplicates(quantize(digits_splits.test.x[0]), n, eps=0.1, seed=seed)
    for i in range(0, n, per_request):
        r = m.predict("attacker", x[i:i + per_request])
        if r.status_code != 200:
            return r
    return r


def _benign(m: Mon, digits_splits, n: int, per_request: int = 4):
    x = quantize(digits_splits.test.x[:n])
    for i in range(0, n, per_request):
        assert m.predict("benign", x[i:i + per_request]).status_code == 200


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("text, where", [
    ("rules: [{name: r, metric: nope, window: {count: 5}, threshold: 1}]", "rules[0].metric"),
    ("rules: [{name: r, metric: flags, window: {count: 5, seconds: 3}, threshold: 1}]", "rules[0].window"),
    ("rules: [{name: r, metric: flags, scope: global, window: {count: 5}, threshold: 1, action: block}]",
     "rules[0]"),
    ("rules: [{name: r, metric: flags, window: {count: 5}, threshold: high}]", "rules[0].threshold"),
    ("detectors: {stateful: {k: 0}}", "detectors.stateful.k"),
    ("sinks: {webhook: {url: 'ftp://x'}}", "sinks.webhook.url"),
    ("rules: [{name: r, metric: flags, window: {count: 5}, threshold: 1, colour: red}]", "rules[0].colour"),
    ("rules: [oops", "not valid YAML"),
])
def test_a_bad_monitor_config_is_one_error_naming_file_key_and_value(tmp_path, text, where):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_monitor_config(path)
    msg = str(err.value)
    assert str(path) in msg and where in msg, msg


def test_serve_exits_2_on_a_bad_monitor_config(tmp_path, bundle_dir):
    path = tmp_path / "bad.yml"
    path.write_text("rules: [{name: r, metric: flags, window: {count: 5}, threshold: 1, severity: loud}]")
    KeyStore(tmp_path / "keys.db", create=True)
    res = CliRunner().invoke(cli_app, ["serve", str(bundle_dir), "--keys", str(tmp_path / "keys.db"),
                                       "--monitor-config", str(path)])
    assert res.exit_code == 2
    assert "rules[0].severity" in res.output and "loud" in res.output and str(path) in res.output


def test_serve_exits_2_when_a_sink_names_an_unset_secret_variable(tmp_path, bundle_dir, calibration, monkeypatch):
    monkeypatch.delenv("SAFEDL_TEST_NO_SUCH_VAR", raising=False)
    path = write_config(tmp_path / "m.yml", calibration=calibration, rules=[ATTACK_RULE],
                        sinks={"pagerduty": {"routing_key_env": "SAFEDL_TEST_NO_SUCH_VAR"}})
    KeyStore(tmp_path / "keys.db", create=True)
    res = CliRunner().invoke(cli_app, ["serve", str(bundle_dir), "--keys", str(tmp_path / "keys.db"),
                                       "--audit", str(tmp_path / "a.db"), "--monitor-config", str(path)])
    assert res.exit_code == 2, res.output
    assert "sinks.pagerduty.routing_key_env" in res.output and "SAFEDL_TEST_NO_SUCH_VAR" in res.output


def test_the_shipped_default_config_is_valid_and_names_every_detector():
    cfg = load_monitor_config(DEFAULT_RULES)
    assert {r.metric for r in cfg.rules} >= {"stateful_flags", "prada_flags", "volume_flags", "rejection_rate"}
    assert not any(r.action for r in cfg.rules if r.metric == "prada_flags")  # PRADA false-alarms on retry bursts


def test_a_detector_without_threshold_or_calibration_is_refused(tmp_path, bundle_dir):
    path = write_config(tmp_path / "m.yml", calibration=None, rules=[ATTACK_RULE])
    keys = KeyStore(tmp_path / "k.db", create=True)
    with pytest.raises(UserError, match="detectors.stateful.threshold"):
        create_app(bundle=load_bundle(bundle_dir), keys=keys, audit=AuditStore(tmp_path / "a.db"),
                   monitor_config=load_monitor_config(path))


# ---------------------------------------------------------------------------------------------- detection

def test_near_duplicate_stream_is_flagged_and_alerted_once_benign_stream_is_not(mon_factory, digits_splits):
    m = mon_factory([ATTACK_RULE, {"name": "extraction", "metric": "prada_flags", "window": {"count": 50},
                                   "threshold": 1}])
    _benign(m, digits_splits, 200)
    _attack(m, digits_splits, 150)
    s = m.summary()
    keys = {k["name"]: k for k in s["keys"]}
    assert keys["benign"]["flags"] == {"stateful": None, "prada": None, "volume": None, "copycat": None,
                                        "sybil": None}
    first = keys["attacker"]["flags"]["stateful"]
    assert first is not None and 50 < first <= 60  # k = 50 neighbours needed before the first judgement
    alerts = m.alerts()
    assert {(a["rule"], a["key_id"]) for a in alerts} <= {("query_attack", m.ids["attacker"]),
                                                          ("extraction", m.ids["attacker"])}
    qa = [a for a in alerts if a["rule"] == "query_attack"]
    assert len(qa) == 1 and qa[0]["state"] == "firing"
    assert qa[0]["events"] > 50  # one alert, every further flagged request counted as an event
    assert s["flagged_inputs"] and all(g["key_id"] == m.ids["attacker"] for g in s["flagged_inputs"])
    png = base64.b64decode(s["flagged_inputs"][0]["png_base64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = m.client.get("/metrics", headers=m.ops).text
    assert 'safedl_query_flags_total{detector="stateful"} 1.0' in metrics
    assert 'safedl_alerts_firing{rule="query_attack",severity="critical"} 1.0' in metrics


def test_summary_matches_the_contract_and_needs_the_admin_scope(mon_factory, digits_splits):
    m = mon_factory([ATTACK_RULE])
    _benign(m, digits_splits, 8)
    s = m.summary()
    assert set(s) == {"now", "bundle_version", "alerts", "keys", "series", "flagged_inputs", "drift"}
    assert s["drift"]["enabled"] is False  # this bundle was exported without a drift reference
    assert set(s["series"]) == {"bucket_s", "t", "queries", "rejected", "flags", "alerts"}
    assert sum(s["series"]["queries"]) == 8 and len(s["series"]["t"]) == 3600 // s["series"]["bucket_s"]
    assert set(s["keys"][0]) == {"key_id", "name", "queries", "rejected", "tier", "action", "flags"}
    r = m.client.get("/v1/monitor/summary", headers={"Authorization": f"Bearer {m.tokens['benign']}"})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    assert m.client.get("/v1/monitor/summary").status_code == 401


def test_an_alert_resolves_when_its_time_window_clears(mon_factory, digits_splits):
    rule = dict(ATTACK_RULE, window={"seconds": 1.0}, threshold=1)
    m = mon_factory([rule], routing={"suppress_s": 0})  # announce the resolution at once (no flapping hold)
    _attack(m, digits_splits, 69)
    t_last = time.time()
    _attack(m, digits_splits, 1, seed=1)
    m.monitor.flush()
    assert [a["state"] for a in m.alerts()] == ["firing"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and m.alerts()[0]["state"] == "firing":
        time.sleep(0.2)
    (a,) = m.alerts()
    assert a["state"] == "resolved" and a["resolved_at"] >= t_last + 1.0
    jsonl = m.config_path.with_suffix(".jsonl")
    # the sinks are told right after the database is: give the JSONL line a moment
    _poll(lambda: jsonl.read_text().count("\n") >= 2, timeout=5.0)  # two complete lines
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(x["event"], x["alert"]["alert_id"]) for x in lines] == [("alert_fired", a["alert_id"]),
                                                                     ("alert_resolved", a["alert_id"])]


def test_the_webhook_gets_the_alert_and_retries_after_a_500(mon_factory, digits_splits):
    with WebhookReceiver(fail=1) as hook:
        m = mon_factory([ATTACK_RULE], sinks={"log": True, "webhook": {"url": hook.url, "retries": 2,
                                                                        "backoff_s": 0.05, "timeout_s": 2}})
        _attack(m, digits_splits, 80)
        m.monitor.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not hook.bodies:
            time.sleep(0.05)
        assert hook.statuses == [500, 200]
        (body,) = hook.bodies
        assert body["event"] == "alert_fired" and body["alert"]["key_id"] == m.ids["attacker"]
        assert body["alert"]["rule"] == "query_attack"
        metrics = m.client.get("/metrics", headers=m.ops).text
        assert 'safedl_alert_notifications_total{outcome="retry",sink="webhook"} 1.0' in metrics
        assert 'safedl_alert_notifications_total{outcome="ok",sink="webhook"} 1.0' in metrics


# ---------------------------------------------------------------------------------------------- actions

def test_block_refuses_the_key_and_keys_restore_lets_it_back_both_audited(mon_factory, digits_splits):
    m = mon_factory([dict(ATTACK_RULE, action="block")])
    refused_during_attack = _attack(m, digits_splits, 70).status_code == 403  # the monitor acts asynchronously
    m.monitor.flush()
    r = m.predict("attacker", quantize(digits_splits.test.x[:1]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_blocked"
    assert "safedl keys restore" in r.json()["error"]["message"]
    assert m.predict("benign", quantize(digits_splits.test.x[:1])).status_code == 200
    (alert,) = m.alerts()
    listed = CliRunner().invoke(cli_app, ["keys", "actions", "--db", str(m.keys_db), "--json"])
    (row,) = [json.loads(line) for line in listed.output.splitlines()]
    assert (row["name"], row["action"], row["actor"], row["alert_id"]) == ("attacker", "block", "monitor",
                                                                            alert["alert_id"])
    assert "query_attack" in row["reason"] and row["restored_at"] is None
    res = CliRunner().invoke(cli_app, ["keys", "restore", "attacker", "--db", str(m.keys_db)])
    assert res.exit_code == 0 and "block" in res.output
    assert m.predict("attacker", quantize(digits_splits.test.x[:1])).status_code == 200
    hist = CliRunner().invoke(cli_app, ["keys", "actions", "--db", str(m.keys_db), "--all", "--json"])
    (row,) = [json.loads(line) for line in hist.output.splitlines()]
    assert row["restored_at"] is not None and row["restored_by"].startswith("cli:")
    assert 'safedl_key_actions_total{action="block"} 1.0' in m.client.get("/metrics", headers=m.ops).text
    conn = sqlite3.connect(m.audit_db)
    codes = [c for (c,) in conn.execute("SELECT error FROM audit WHERE key_id=? ORDER BY id", (m.ids["attacker"],))]
    conn.close()
    assert codes.count("key_blocked") == 1 + refused_during_attack and codes[-1] is None


def test_labels_only_and_throttle_change_what_the_key_gets(mon_factory, digits_splits):
    m = mon_factory([dict(ATTACK_RULE, action="labels_only"),
                     dict(ATTACK_RULE, name="slow_down", action="throttle")],
                    actions={"throttle_factor": 0.0001})
    _attack(m, digits_splits, 70)
    m.monitor.flush()
    time.sleep(1.1)  # throttled to 1 request/s, burst 1: one token back
    rs = [m.predict("attacker", quantize(digits_splits.test.x[:1])) for _ in range(3)]
    assert [r.status_code for r in rs] == [200, 429, 429]
    assert rs[0].json()["tier"] == "label" and rs[0].json()["results"][0]["probabilities"] is None
    assert all(m.predict("benign", quantize(digits_splits.test.x[:1])).status_code == 200 for _ in range(3))
    assert {k["name"]: k["action"] for k in m.summary()["keys"]}["attacker"] == "labels_only"


# ---------------------------------------------------------------------------------------------- scenario

def _poll(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        out = fn()
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_scenario_square_and_copycat_keys_are_flagged_and_alerted_the_benign_key_is_not(
        tmp_path, bundle_dir, calibration, digits_splits):
    """Issue 13 "Done when": `safedl serve` runs; a benign client streams test images; one key runs safedl's square
    attack (scores) and another a copycat extraction, both through HTTP; each attack key is flagged and alerted
    once per rule, the benign key is not; the webhook receives the alerts; /metrics and the audit database show it."""
    import threading

    import httpx

    from _serve_helpers import ServerProcess
    from safedl import registry
    from safedl.attacks.extraction.base import ExtractionOracle
    from safedl.serve.client import RemoteClassifier, ServiceClient, TierError

    keys = KeyStore(tmp_path / "keys.db", create=True)
    tok = {n: keys.create(name=n, tier="full", rate_per_s=1000, burst=1000)[1] for n in ("benign", "square", "copycat")}
    tok["ops"] = keys.create(name="ops", scopes=("admin",))[1]
    ids = {k.name: k.key_id for k in keys.list()}
    rules = [dict(ATTACK_RULE, action="labels_only"),
             {"name": "extraction_suspected", "metric": "prada_flags", "window": {"count": 50}, "threshold": 1},
             {"name": "key_volume", "metric": "volume_flags", "window": {"seconds": 10}, "threshold": 1},
             {"name": "global_volume", "metric": "volume_flags", "scope": "global", "window": {"seconds": 10},
              "threshold": 1}]
    # a key without a minute of its own history is compared with 100 images per 2 s (Poisson), alert at 3 sigma
    volume = {"bucket_s": 2, "warmup_buckets": 30, "prior_rate": 100, "sigma": 3}
    with WebhookReceiver() as hook:
        cfg = write_config(tmp_path / "monitor.yml", calibration=calibration, rules=rules,
                           detectors={"volume": volume},
                           sinks={"log": True, "jsonl": str(tmp_path / "alerts.jsonl"), "webhook": {"url": hook.url}})
        with ServerProcess(bundle_dir, tmp_path / "keys.db", tmp_path / "audit.db", "--monitor-config",
                           str(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            srv.wait_ready()

            benign_x, stop, benign_status = quantize(digits_splits.test.x[:240]), threading.Event(), []

            def benign():  # about 20 images/s, two per request, in order
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    for i in range(0, len(benign_x), 2):
                        if stop.is_set():
                            return
                        r = c.post("/v1/predict", content=npy(benign_x[i:i + 2]), headers={
                            "Authorization": f"Bearer {tok['benign']}", "Content-Type": "application/x-npy"})
                        benign_status.append(r.status_code)
                        time.sleep(0.1)

            t = threading.Thread(target=benign)
            t.start()
            try:
                sq = RemoteClassifier(ServiceClient(srv.url, token=tok["square"]), max_queries=300, num_classes=10,
                                      on_reject="uniform")
                square = registry.create("evasion", "square", eps=0.1, max_queries=150)
                x, y = quantize(digits_splits.test.x[:20]), digits_splits.test.y[:20]
                try:
                    for i in range(len(x)):
                        if sq.queries_ + 150 > 300:
                            break
                        square(sq, x[i:i + 1], y[i:i + 1])
                except TierError:  # the monitor switched the key to labels only: no more scores to climb
                    pass
                cc = RemoteClassifier(ServiceClient(srv.url, token=tok["copycat"]), max_queries=600, num_classes=10,
                                      on_reject="uniform")
                thief = registry.create("extraction", "copycat", surrogate="tiny_cnn", epochs=2, seed=0)
                stolen = thief.extract(ExtractionOracle(cc, budget=600, output="scores"), digits_splits.train.x,
                                       num_classes=10)
            except BaseException:
                stop.set()
                raise
            finally:
                t.join(60)  # the benign client streams its 240 images to the end
            ops = {"Authorization": f"Bearer {tok['ops']}"}

            def summary_when_flagged():
                s = http.get("/v1/monitor/summary", headers=ops).json()
                k = {r["name"]: r for r in s["keys"]}
                done = {"square", "copycat"} <= set(k) and k["square"]["flags"]["stateful"] and \
                    k["copycat"]["flags"]["volume"]
                return s if done else None

            s = _poll(summary_when_flagged)
            assert s, http.get("/v1/monitor/summary", headers=ops).text
            _poll(lambda: len(hook.bodies) >= 3)
            metrics = http.get("/metrics", headers=ops).text
    k = {r["name"]: r for r in s["keys"]}
    assert set(benign_status) == {200} and k["benign"]["queries"] == len(benign_x)
    assert k["benign"]["flags"] == {"stateful": None, "prada": None, "volume": None, "copycat": None,
                                        "sybil": None}
    assert k["square"]["flags"]["stateful"] <= 60 and k["square"]["tier"] == "label"  # labels_only after the alert
    assert stolen.log.x.shape[0] == 600
    conn = sqlite3.connect(tmp_path / "audit.db")
    alerts = conn.execute("SELECT rule, key_id, state, events, action FROM monitor_alerts").fetchall()
    audited = dict(conn.execute("SELECT key_id, COUNT(*) FROM audit WHERE endpoint='/v1/predict' GROUP BY key_id"))
    conn.close()
    per = {}
    for rule, key_id, state, events, action in alerts:
        per.setdefault((rule, key_id), []).append(events)
    assert all(len(v) == 1 for v in per.values()), per  # one alert per (rule, key), not one per request
    assert ids["benign"] not in {key_id for _, key_id in per}
    assert ("query_attack", ids["square"]) in per and per[("query_attack", ids["square"])][0] > 1
    assert ("key_volume", ids["copycat"]) in per
    fired = {(b["alert"]["rule"], b["alert"]["key_id"]) for b in hook.bodies if b["event"] == "alert_fired"}
    assert {("query_attack", ids["square"]), ("key_volume", ids["copycat"])} <= fired
    assert audited[ids["copycat"]] == 600 and audited[ids["benign"]] == len(benign_x)
    assert 'safedl_alerts_fired_total{rule="query_attack",severity="critical"} 1.0' in metrics
    assert 'safedl_key_actions_total{action="labels_only"} 1.0' in metrics
    assert 'safedl_query_flags_total{detector="stateful"} 1.0' in metrics  # the square key only


def test_batches_that_would_overfill_the_monitor_queue_are_dropped_and_counted(mon_factory, digits_splits):
    m = mon_factory([ATTACK_RULE], queue_mb=0.0001)  # 105 bytes: not even one 8x8 float image
    _benign(m, digits_splits, 8)
    assert m.summary()["keys"] == []
    assert "safedl_monitor_dropped_total 2.0" in m.client.get("/metrics", headers=m.ops).text


def test_alerts_left_firing_by_a_previous_run_are_resolved_at_start(tmp_path, bundle_dir, calibration,
                                                                     digits_splits):
    m = Mon(tmp_path, bundle_dir, calibration, [ATTACK_RULE])
    with TestClient(m.app) as client:
        m.client = client
        _attack(m, digits_splits, 60)
        m.monitor.flush()
        assert [a["state"] for a in m.alerts()] == ["firing"]
    assert [a["state"] for a in m.alerts()] == ["firing"]  # a stop does not resolve: the attack may go on
    again = create_app(bundle=load_bundle(bundle_dir), keys=KeyStore(m.keys_db), audit=AuditStore(m.audit_db),
                       monitor_config=load_monitor_config(m.config_path))
    with TestClient(again):
        (a,) = m.alerts()
        assert a["state"] == "resolved" and a["resolved_at"] is not None


def test_windows_sum_the_last_n_requests_and_the_last_seconds():
    from safedl.serve.monitor.windows import FIELDS, Windows

    w = Windows(max_count=3, max_seconds=10)
    one = tuple(1 if f in ("requests", "flags") else 0 for f in FIELDS)
    for t in (100.0, 101.5, 105.0, 109.9):
        w.add(t, one)
    assert w.sums(count=2, now=110)["requests"] == 2 and w.sums(count=50, now=110)["requests"] == 3
    assert w.sums(seconds=5, now=110.0)["flags"] == 2      # 105.0 and 109.9 (buckets 105.., 109..)
    assert w.sums(seconds=5, now=111.0)["flags"] == 1      # bucket 105 no longer overlaps [106, 111]
    assert w.sums(seconds=10, now=130.0)["requests"] == 0


def test_for_s_delays_the_alert_until_the_condition_has_held_that_long(mon_factory, digits_splits):
    m = mon_factory([dict(ATTACK_RULE, for_s=30)])
    _attack(m, digits_splits, 70)
    m.monitor.flush()
    assert m.alerts() == []
    m.monitor.clock = lambda: time.time() + 31
    m.monitor.tick()
    (a,) = m.alerts()
    assert a["state"] == "firing" and a["rule"] == "query_attack"


def test_a_webhook_that_keeps_failing_is_given_up_after_its_retries(mon_factory, digits_splits):
    with WebhookReceiver(fail=10) as hook:
        m = mon_factory([ATTACK_RULE], sinks={"log": False, "webhook": {"url": hook.url, "retries": 1,
                                                                         "backoff_s": 0.01}})
        _attack(m, digits_splits, 60)
        m.monitor.flush()
        deadline = time.monotonic() + 10
        failed = 'safedl_alert_notifications_total{outcome="failed",sink="webhook"}'
        while time.monotonic() < deadline and failed not in m.client.get("/metrics", headers=m.ops).text:
            time.sleep(0.05)
        assert hook.statuses == [500, 500] and hook.bodies == []
        assert 'safedl_alert_notifications_total{outcome="failed",sink="webhook"} 1.0' in m.client.get("/metrics", headers=m.ops).text
    assert m.predict("attacker", quantize(digits_splits.test.x[:1])).status_code == 200  # the service is unaffected


def test_monitor_state_is_bounded_by_max_keys_and_a_forgotten_keys_alert_resolves(mon_factory, digits_splits):
    m = mon_factory([ATTACK_RULE], max_keys=1)
    _attack(m, digits_splits, 60)
    m.monitor.flush()
    assert [a["state"] for a in m.alerts()] == ["firing"]
    _benign(m, digits_splits, 4)
    m.monitor.flush()
    m.monitor.tick()
    assert [k["name"] for k in m.summary()["keys"]] == ["benign"]
    assert [a["state"] for a in m.alerts()] == ["resolved"]
