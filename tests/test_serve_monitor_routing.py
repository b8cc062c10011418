"""Alert routing and grading of the security monitor (issue 31): fingerprints, suppression of flapping alerts,
allow-listed keys, grouping across keys, severity graded from bands with escalation, time to mitigate."""
from __future__ import annotations

import hashlib

import pytest

from _alerting_helpers import make_harness
from safedl.serve.monitor.channels import slack_message
from safedl.serve.monitor.config import Rule

RULE = {"name": "query_attack", "metric": "stateful_flags", "window": {"count": 10}, "threshold": 3,
        "severity": "critical"}


def _attack(h, key: str = "k1", n: int = 3, **kw) -> None:
    h.detector.attacking.add(key)
    for _ in range(n):
        h.send(key, **kw)


def _calm(h, key: str = "k1", n: int = 10) -> None:
    h.detector.attacking.discard(key)
    for _ in range(n):
        h.send(key)


def _metric(h, line: str) -> float:
    return next((float(x.split()[-1]) for x in h.metrics().splitlines() if x.startswith(line + " ")), 0.0)


@pytest.fixture
def harness():
    made = []

    def make(rules, **config):
        h = make_harness(rules, **config)
        made.append(h)
        return h

    yield make
    for h in made:
        h.monitor.close()


def test_every_notification_carries_the_alerts_stable_fingerprint(harness):
    h = harness([RULE, dict(RULE, name="global_attack", scope="global")], routing={"suppress_s": 0})
    _attack(h)
    _calm(h)
    fps = {(p["event"], p["alert"]["rule"]): p["alert"]["fingerprint"] for p in h.notifications}
    want = hashlib.sha256(b"query_attack\x00k1").hexdigest()[:16]
    assert fps[("alert_fired", "query_attack")] == fps[("alert_resolved", "query_attack")] == want
    assert fps[("alert_fired", "global_attack")] == hashlib.sha256(b"global_attack\x00<global>").hexdigest()[:16]
    assert all(a["fingerprint"] for a in h.monitor.snapshot()["alerts"])


def test_an_attack_that_pauses_briefly_pages_once(harness):
    h = harness([RULE], routing={"suppress_s": 300})
    _attack(h)
    _calm(h)  # resolved ...
    (first,) = h.monitor.alerts.rows.values()
    assert first["state"] == "resolved"
    h.advance(120)  # ... and back within suppress_s
    _attack(h)
    assert h.events() == [("alert_fired", "k1")]  # one notification: the same alert goes on
    (again,) = h.monitor.alerts.rows.values()
    assert again["alert_id"] == first["alert_id"] and again["state"] == "firing" and again["resolved_at"] is None
    assert _metric(h, 'safedl_alerts_suppressed_total{rule="query_attack"}') == 1
    assert _metric(h, 'safedl_alerts_fired_total{rule="query_attack",severity="critical"}') == 1
    assert _metric(h, 'safedl_alerts_firing{rule="query_attack",severity="critical"}') == 1
    _calm(h)
    h.advance(299)
    assert h.events() == [("alert_fired", "k1")]  # resolution announced only once it stayed resolved
    h.advance(2)
    assert h.events() == [("alert_fired", "k1"), ("alert_resolved", "k1")]
    _attack(h)  # after the window: a new alert, notified
    assert h.events()[-1] == ("alert_fired", "k1")
    assert len({p["alert"]["alert_id"] for p in h.notifications}) == 2


def test_a_held_resolution_is_announced_at_shutdown():
    h = make_harness([RULE], routing={"suppress_s": 300})
    _attack(h)
    _calm(h)
    h.monitor.close()
    assert h.events() == [("alert_fired", "k1"), ("alert_resolved", "k1")]


def test_allow_listed_keys_by_id_or_name_are_never_alerted_or_acted_on(harness):
    h = harness([dict(RULE, action="block")], routing={"allow_keys": ["scanner-key", "canary"]})
    _attack(h, "scanner-key")
    _attack(h, "k9", name="canary")
    assert h.notifications == [] and h.monitor.alerts.rows == {} and h.monitor.actions.rows == []
    _attack(h, "k1")
    assert h.events() == [("alert_fired", "k1")]
    assert [(a.key_id, a.action) for a in h.monitor.actions.rows] == [("k1", "block")]


def test_five_keys_firing_one_rule_within_group_s_are_one_notification(harness):
    h = harness([RULE], routing={"group_s": 30})
    keys = [f"k{i}" for i in range(5)]
    for i, key in enumerate(keys):
        _attack(h, key)
        h.advance(5)
    assert h.notifications == []  # the group is open for 30 s after its first alert
    h.advance(6)
    (p,) = h.notifications
    assert p["event"] == "alert_fired" and p["group"]["rule"] == "query_attack" and p["group"]["count"] == 5
    assert p["group"]["keys"] == keys and len({a["alert_id"] for a in p["group"]["alerts"]}) == 5
    body = slack_message(p)
    assert "5 keys (k0, k1, k2, k3, k4)" in body["text"]
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in body["blocks"][1]["fields"]}
    assert fields["*Keys (5)*"] == ", ".join(f"`{k}`" for k in keys)
    _attack(h, "k5")  # a later alert opens a new group
    h.advance(31)
    assert len(h.notifications) == 2 and "group" not in h.notifications[1]
    assert h.notifications[1]["alert"]["key_id"] == "k5"


def test_severity_is_graded_from_bands_and_escalates_while_firing(harness):
    bands = {"low": 2, "medium": 4, "high": 6, "critical": 8}
    h = harness([{"name": "qa", "metric": "stateful_flags", "window": {"count": 20}, "bands": bands}])
    _attack(h, n=2)
    assert [(p["event"], p["alert"]["severity"]) for p in h.notifications] == [("alert_fired", "low")]
    _attack(h, n=1)
    assert len(h.notifications) == 1  # 3: still low
    _attack(h, n=3)
    _attack(h, n=4)
    assert [(p["event"], p["alert"]["severity"]) for p in h.notifications] == [
        ("alert_fired", "low"), ("alert_escalated", "medium"), ("alert_escalated", "high"),
        ("alert_escalated", "critical")]
    _calm(h, n=3)  # the value falls: the level stays at its peak while firing
    assert len(h.notifications) == 4 and h.monitor.snapshot()["alerts"][0]["severity"] == "critical"
    assert _metric(h, 'safedl_alerts_fired_total{rule="qa",severity="low"}') == 1
    assert _metric(h, 'safedl_alert_escalations_total{rule="qa",severity="critical"}') == 1
    assert _metric(h, 'safedl_alerts_firing{rule="qa",severity="critical"}') == 1
    assert _metric(h, 'safedl_alerts_firing{rule="qa",severity="low"}') == 0


def test_bands_respect_the_comparison_direction_and_fixed_severities_stay_valid():
    low_is_bad = Rule.model_validate({"name": "r", "metric": "detection_rate", "window": {"count": 5},
                                      "comparison": "<", "bands": {"low": 0.5, "high": 0.2, "critical": 0.05}})
    assert low_is_bad.threshold == 0.5
    assert [low_is_bad.graded(v) for v in (0.4, 0.2, 0.1, 0.01)] == ["low", "low", "high", "critical"]
    old = Rule.model_validate({"name": "r", "metric": "flags", "window": {"count": 5}, "threshold": 1,
                               "severity": "warning"})
    assert old.graded(100) == "warning"
    with pytest.raises(ValueError, match="shrink"):
        Rule.model_validate({"name": "r", "metric": "flags", "window": {"count": 5}, "comparison": "<=",
                             "bands": {"low": 1, "high": 2}})


def test_time_to_mitigate_is_from_the_first_flag_to_the_automatic_action(harness):
    h = harness([dict(RULE, action="labels_only")])
    h.detector.attacking.add("k1")
    for _ in range(3):  # flags at t, t+1.5, t+3.0; the third one fires the rule and the action
        h.send("k1")
        h.now[0] += 1.5
    assert [a.action for a in h.monitor.actions.rows] == ["labels_only"]
    assert _metric(h, 'safedl_time_to_mitigate_seconds_count{action="labels_only"}') == 1
    assert _metric(h, 'safedl_time_to_mitigate_seconds_sum{action="labels_only"}') == pytest.approx(3.0)
    assert _metric(h, 'safedl_time_to_mitigate_seconds_bucket{action="labels_only",le="2.5"}') == 0
    assert _metric(h, 'safedl_time_to_mitigate_seconds_bucket{action="labels_only",le="5.0"}') == 1
