"""Alert hysteresis (issue 26): a rule's ``clear_s`` keeps one continuous attack with quiet spells one firing alert
(no fire / resolve / fire in the alert store), and it still resolves once the key stays quiet that long."""
from __future__ import annotations

import pytest

from _alerting_helpers import make_harness
from safedl.serve.monitor.config import MonitorConfig

RULE = {"name": "query_attack", "metric": "stateful_flags", "window": {"count": 10}, "threshold": 3,
        "severity": "critical"}


def _run(h, attacking: bool, n: int, key: str = "k1", step_s: float = 1.0) -> None:
    (h.detector.attacking.add if attacking else h.detector.attacking.discard)(key)
    for _ in range(n):
        h.send(key)
        h.advance(step_s)


def _states(h) -> list[tuple[str, str]]:
    return [(a["alert_id"], a["state"]) for a in h.monitor.alerts.rows.values()]


@pytest.mark.parametrize("clear_s,expect_alerts", [(0.0, 2), (60.0, 1)])
def test_an_attack_with_a_quiet_spell_is_one_alert_only_with_clear_s(clear_s, expect_alerts):
    h = make_harness([dict(RULE, clear_s=clear_s)], routing={"suppress_s": 0})
    try:
        _run(h, True, 5)
        _run(h, False, 12)   # 12 s quiet: the count window empties, the condition stops holding
        _run(h, True, 5)
        assert len(h.monitor.alerts.rows) == expect_alerts
        if clear_s:
            assert _states(h)[0][1] == "firing"
            assert [e for e, _ in h.events()] == ["alert_fired"]
    finally:
        h.monitor.close()


def test_clear_s_still_resolves_after_the_key_stays_quiet():
    h = make_harness([dict(RULE, clear_s=30.0)], routing={"suppress_s": 0})
    try:
        _run(h, True, 5)
        _run(h, False, 12)
        assert _states(h)[0][1] == "firing"
        h.advance(10.0)   # the tick re-evaluates firing alerts with time alone
        assert _states(h)[0][1] == "firing"
        h.advance(15.0)   # more than 30 s after the condition stopped
        assert _states(h)[0][1] == "resolved"
    finally:
        h.monitor.close()


def test_a_negative_clear_s_is_refused_with_its_key():
    with pytest.raises(ValueError, match="clear_s"):
        MonitorConfig.model_validate({"rules": [dict(RULE, clear_s=-1)]})
