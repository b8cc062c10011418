"""Drift detection in `safedl serve`: windows of the served traffic (rejected images included) tested against the
bundle's drift reference, globally and per key; alerts of the input_drift / prediction_drift rules in the summary,
Prometheus gauges; a bundle without a reference is served with drift off."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _monitor_helpers import npy, write_config  # noqa: E402
from _serve_helpers import make_bundle  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.monitor import DEFAULT_RULES, load_monitor_config  # noqa: E402

OFF = {"stateful": {"enabled": False}, "prada": {"enabled": False}, "volume": {"enabled": False},
       "copycat": {"enabled": False}, "sybil": {"enabled": False}}
WINDOW = 60


def _rule(name, metric, scope):
    return {"name": name, "metric": metric, "scope": scope, "window": {"count": 1}, "comparison": "<=",
            "threshold": 0.005}


RULES = [_rule("input_drift", "input_drift_p", "global"), _rule("prediction_drift", "prediction_drift_p", "global"),
         _rule("key_input_drift", "input_drift_p", "key")]


@pytest.fixture(scope="module")
def drift_bundle(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("drift") / "bundle", drift=True)


class Served:
    def __init__(self, tmp_path, bundle_dir, *, per_key=True):
        keys = KeyStore(tmp_path / "keys.db", create=True)
        self.tokens = {n: keys.create(name=n, tier="full", rate_per_s=1e4, burst=10_000)[1] for n in ("a", "b")}
        self.tokens["ops"] = keys.create(name="ops", scopes=("admin",))[1]
        self.ids = {k.name: k.key_id for k in keys.list()}
        cfg = write_config(tmp_path / "m.yml", calibration=None, rules=RULES, detectors=OFF,
                           drift={"window": WINDOW, "permutations": 199, "per_key": per_key})
        self.app = create_app(bundle=load_bundle(bundle_dir), keys=keys, audit=AuditStore(tmp_path / "a.db"),
                              monitor_config=load_monitor_config(cfg))
        self.monitor = self.app.state.service.monitor
        self.client = TestClient(self.app).__enter__()

    def send(self, who, x, per_request=20):
        rejected = 0
        for i in range(0, len(x), per_request):
            r = self.client.post("/v1/predict", content=npy(x[i:i + per_request]), headers={
                "Authorization": f"Bearer {self.tokens[who]}", "Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
            rejected += sum(res["rejected"] for res in r.json()["results"])
        return rejected

    def summary(self):
        assert self.monitor.flush()
        return self.client.get("/v1/monitor/summary", headers={"Authorization": f"Bearer {self.tokens['ops']}"}).json()

    def firing(self):
        return {(a["rule"], a["key_id"]) for a in self.summary()["alerts"] if a["state"] == "firing"}

    def close(self):
        self.client.__exit__(None, None, None)


@pytest.fixture
def served(tmp_path, drift_bundle):
    s = Served(tmp_path, drift_bundle)
    yield s
    s.close()


def test_clean_traffic_raises_no_alarm_inverted_traffic_does(served, digits_splits):
    x = digits_splits.test.x
    served.send("a", x[:2 * WINDOW])            # two clean windows
    s = served.summary()
    assert s["drift"]["enabled"] and s["drift"]["reference_images"] == len(digits_splits.val)
    assert s["drift"]["latest"]["input"]["p_value"] > 0.005 and not served.firing()
    served.send("a", 1.0 - x[2 * WINDOW:3 * WINDOW])  # an inverted window: input drift, globally and on key a
    firing = served.firing()
    assert ("input_drift", None) in firing and ("key_input_drift", served.ids["a"]) in firing
    assert served.summary()["drift"]["latest"]["input"]["p_value"] == pytest.approx(1 / 200)
    metrics = served.client.get("/metrics", headers={"Authorization": f"Bearer {served.tokens['ops']}"}).text
    assert 'safedl_drift_p_value{test="input"} 0.005' in metrics
    assert 'safedl_drift_windows_total{outcome="ok",scope="global",test="input"} 2.0' in metrics
    served.send("a", x[3 * WINDOW:4 * WINDOW])  # clean again: the next window's test resolves the alert
    assert ("input_drift", None) not in served.firing()


def test_a_class_prior_shift_is_prediction_drift(served, digits_splits):
    x, y = digits_splits.test.x, digits_splits.test.y
    served.send("b", x[(y < 3)][:WINDOW])  # only digits 0-2
    firing = served.firing()
    assert ("prediction_drift", None) in firing


def test_windows_count_images_rejected_ones_included_and_keys_separately(tmp_path, tiny_model, digits_splits):
    strict = make_bundle(tiny_model, digits_splits, tmp_path / "strict", fpr=0.5, drift=True)  # rejects about half
    served = Served(tmp_path, strict)
    try:
        x = digits_splits.test.x
        rejected = served.send("a", x[:WINDOW - 10])
        assert rejected > 0  # the bundle's detector rejected some of them; they count all the same
        assert served.summary()["drift"]["filled"] == WINDOW - 10 and not served.summary()["drift"]["latest"]
        served.send("b", x[WINDOW:WINDOW + 10])
        s = served.summary()["drift"]
        assert s["filled"] == 0 and s["latest"]["input"]["n"] == WINDOW  # the global window filled and was tested
        assert served.monitor.drift.latest_p("input", served.ids["a"]) is None  # key a: 50 of its 60 so far
        assert served.monitor.drift.latest_p("input", served.ids["b"]) is None and s["keys_tracked"] == 2
    finally:
        served.close()


def test_a_bundle_without_reference_is_served_with_drift_off(tmp_path, tiny_model, digits_splits):
    plain = make_bundle(tiny_model, digits_splits, tmp_path / "plain")
    s = Served(tmp_path, plain)
    try:
        s.send("a", digits_splits.test.x[:WINDOW])
        summary = s.summary()
        assert summary["drift"]["enabled"] is False and not summary["drift"]["latest"]
    finally:
        s.close()


def test_the_default_rules_have_drift_rules():
    cfg = load_monitor_config(DEFAULT_RULES)
    rules = {r.name: r for r in cfg.rules}
    assert rules["input_drift"].metric == "input_drift_p" and rules["prediction_drift"].metric == "prediction_drift_p"
    assert rules["input_drift"].scope == "global" and rules["key_input_drift"].scope == "key"
    assert cfg.drift.window == 200 and cfg.drift.enabled


def test_a_swapped_bundle_restarts_every_window_with_its_own_reference(drift_bundle, digits_splits):
    import dataclasses

    from safedl.serve.monitor.config import Drift
    from safedl.serve.monitor.drift import DriftMonitor

    first = load_bundle(drift_bundle)
    mon = DriftMonitor(Drift(window=WINDOW))
    x = digits_splits.test.x
    assert mon.observe("k", x[:WINDOW - 5], bundle=first) == []
    assert mon.snapshot()["filled"] == WINDOW - 5
    half = first.drift.features[: len(first.drift.features) // 2]
    smaller = dataclasses.replace(first.drift, features=half, pred_labels=first.drift.pred_labels[:len(half)],
                                  labels=first.drift.labels[:len(half)])
    second = dataclasses.replace(first, version="other", drift=smaller)
    assert mon.observe("k", x[:10], bundle=second) == []  # the open windows were dropped, not completed
    s = mon.snapshot()
    assert s["filled"] == 10 and s["reference_images"] == len(half) and s["keys_tracked"] == 1
    done = mon.observe("k", x[10:WINDOW], bundle=second)
    assert {(k, t) for k, t, _ in done} == {(None, "input"), (None, "prediction"), ("k", "input"),
                                            ("k", "prediction")}
