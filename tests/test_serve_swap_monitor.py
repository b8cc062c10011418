"""A bundle swap does not reset the security monitor: a key flagged before the swap stays flagged and alerted, and
its detector state carries on (the next near-duplicate query after the swap is judged against the earlier ones)."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from test_serve_monitor import ATTACK_RULE, Mon, _attack, bundle_dir, calibration  # noqa: E402,F401  (fixtures)
from test_serve_swap import _reexport  # noqa: E402


def test_flags_alerts_and_detector_state_survive_a_bundle_swap(tmp_path, bundle_dir, calibration, digits_splits):
    m = Mon(tmp_path, bundle_dir, calibration, [ATTACK_RULE])
    other = _reexport(bundle_dir, tmp_path / "b2", run={"defense": "feature_squeezing", "note": "re-export"})
    with TestClient(m.app) as m.client:
        _attack(m, digits_splits, 60)
        before = m.summary()
        first = {k["name"]: k for k in before["keys"]}["attacker"]["flags"]["stateful"]
        assert first is not None
        r = m.client.post("/v1/admin/bundle", json={"path": str(other)},
                          headers={"Authorization": f"Bearer {m.tokens['ops']}"})
        assert r.status_code == 200 and r.json()["bundle_version"] != before["bundle_version"]
        _attack(m, digits_splits, 10, seed=1)  # ten more near-duplicates of the same image, after the swap
        after = m.summary()
    keys = {k["name"]: k for k in after["keys"]}
    assert after["bundle_version"] == r.json()["bundle_version"]
    assert keys["attacker"]["flags"]["stateful"] == first and keys["attacker"]["queries"] == 70
    alerts = [a for a in m.alerts() if a["rule"] == "query_attack"]
    assert len(alerts) == 1 and alerts[0]["state"] == "firing"
    # state kept: the detector judged the post-swap queries at once (a reset key needs k = 50 queries first)
    events_before = next(a["events"] for a in before["alerts"] if a["rule"] == "query_attack")
    assert alerts[0]["events"] >= events_before + 10
