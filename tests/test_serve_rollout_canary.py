"""Canary and shadow releases with automatic promotion and rollback (serve/rollout), end to end in process: tiny
seeded digits models behind the real service; the controller runs the bundle's probe set through both versions."""
from __future__ import annotations

import io
import json
import sqlite3

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _rollout_helpers import bundle, probes_for, train, wait_final  # noqa: E402
from _monitor_helpers import write_config  # noqa: E402
from _serve_helpers import npy_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.monitor import load_monitor_config  # noqa: E402
from safedl.serve.rollout.config import parse_rollout  # noqa: E402
from safedl.serve.rollout.lane import key_share  # noqa: E402

# The default checks and steps, half-second steps. The suite shares 2 cores between two test workers, so a few
# probe calls of either version can stall for tens of ms; the latency check itself is tested in
# test_serve_rollout_checks.py, and here only a gross slowdown (250 ms) would fail it.
FAST = parse_rollout("interval_s: 0.5\nchecks: {latency_slack_s: 0.25}", where="(test rules)")


@pytest.fixture(scope="module")
def releases(digits_splits, tmp_path_factory):
    """stable (seed 0), good (seed 1, same recipe), backdoored (seed 0, 10% of training stamped -> class 0)."""
    tmp = tmp_path_factory.mktemp("rollout")
    stable = train(digits_splits, seed=0)
    ps = probes_for(stable, digits_splits)
    return {"probes": ps,
            "stable": bundle(stable, digits_splits, tmp / "stable", probes=ps),
            "good": bundle(train(digits_splits, seed=1), digits_splits, tmp / "good", probes=ps),
            "backdoored": bundle(train(digits_splits, seed=0, labels="backdoor"), digits_splits, tmp / "bd",
                                 probes=ps)}


class _Svc:
    def __init__(self, tmp_path, stable_path, *, users: int = 1, monitor=None):
        self.keys = KeyStore(tmp_path / "keys.db", create=True)
        self.admin = self.keys.create(name="ops", tier="full", scopes=("predict", "model", "admin"),
                                      rate_per_s=1000, burst=1000)[1]
        self.users = [self.keys.create(name=f"user{i}", tier="full", rate_per_s=1000, burst=1000)
                      for i in range(users)]
        self.audit_path = tmp_path / "audit.db"
        self.app = create_app(bundle=load_bundle(stable_path), keys=self.keys, audit=AuditStore(self.audit_path),
                              config=ServeConfig(), monitor_config=monitor)
        self.svc = self.app.state.service
        self.svc.rollout.rules = FAST
        self.h = {"Authorization": f"Bearer {self.admin}"}

    def status(self, c):
        return c.get("/v1/admin/rollout", headers=self.h).json()

    def swaps(self) -> list[dict]:
        conn = sqlite3.connect(self.audit_path)
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM bundle_swaps ORDER BY id")]
        conn.close()
        return rows


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


# ---------------------------------------------------------------------------------------------- done when

def test_a_backdoored_canary_is_rolled_back_without_user_traffic(tmp_path, releases):
    off = {d: {"enabled": False} for d in ("stateful", "prada", "volume", "copycat", "sybil")}
    monitor = load_monitor_config(write_config(tmp_path / "monitor.yml", calibration=None, rules=[], detectors=off))
    s = _Svc(tmp_path, releases["stable"], monitor=monitor)
    stable_version = load_bundle(releases["stable"]).version
    with TestClient(s.app) as c:
        r = c.post("/v1/admin/canary", json={"path": str(releases["backdoored"])}, headers=s.h)
        assert r.status_code == 200, r.text
        final = wait_final(lambda: s.status(c))
        assert final["state"] == "rolled_back"
        assert final["decided_by"]["check"] == "backdoor_asr_increase"
        assert final["decided_by"]["bound"] > final["decided_by"]["limit"] == 0.05
        assert final["decided_by"]["n"] >= 190  # triggered probes whose label is not the target
        assert final["fraction"] == 0.0 and final["candidate_version"] is None
        assert s.svc.bundle.version == stable_version  # never promoted
        metrics = c.get("/metrics", headers=s.h).text
    assert _metric(metrics, "safedl_rollout_decisions_total", decision="rollback") == 1.0
    assert _metric(metrics, "safedl_rollout_failed_checks_total", check="backdoor_asr_increase") == 1.0
    assert _metric(metrics, "safedl_rollout_probe_metric", version_role="canary", metric="backdoor_asr") > 0.5
    rows = s.swaps()
    assert [r["action"] for r in rows] == ["canary_start", "canary_rollback"]
    assert rows[-1]["outcome"] == "rolled_back" and rows[-1]["from_version"] == stable_version
    assert "backdoor_asr_increase" in rows[-1]["detail"]
    sent = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    alert = next(n["alert"] for n in sent if n["alert"]["rule"] == "canary_rollback")  # to the alert sinks
    assert alert["severity"] == "critical" and alert["metric"] == "backdoor_asr_increase"
    assert alert["value"] == final["decided_by"]["bound"] and alert["threshold"] == 0.05


def test_a_good_canary_is_promoted_step_by_step(tmp_path, releases):
    s = _Svc(tmp_path, releases["stable"], users=40)
    good_version = load_bundle(releases["good"]).version
    x = releases["probes"].x[:1].numpy()
    with TestClient(s.app) as c:
        assert c.post("/v1/admin/canary", json={"path": str(releases["good"]), "fraction": 0.1},
                      headers=s.h).status_code == 200
        while s.status(c)["state"] == "progressing":  # traffic meanwhile: a key stays on one version
            for key, token in s.users:
                share, frac = key_share(key.key_id), s.svc.rollout.fraction
                r = c.post("/v1/predict", content=npy_bytes(x), headers={"Authorization": f"Bearer {token}",
                                                                          "Content-Type": "application/x-npy"})
                assert r.status_code == 200
                if frac and frac == s.svc.rollout.fraction and s.status(c)["state"] == "progressing":
                    assert (r.json()["bundle_version"] == good_version) == (share < frac)
        final = wait_final(lambda: s.status(c))
        assert final["state"] == "promoted", [ch for ch in final["checks"] if not ch["passed"]]
        assert all(ch["passed"] for ch in final["checks"])
        assert [h["fraction"] for h in final["history"] if h["decision"] == "progress"] == [0.1, 0.25, 0.5, 1.0]
        assert s.svc.bundle.version == good_version
        r = c.post("/v1/predict", content=npy_bytes(x), headers={"Authorization": f"Bearer {s.users[0][1]}",
                                                                  "Content-Type": "application/x-npy"})
        assert r.json()["bundle_version"] == good_version
        metrics = c.get("/metrics", headers=s.h).text
    assert _metric(metrics, "safedl_rollout_decisions_total", decision="promote") == 1.0
    assert _metric(metrics, "safedl_version_requests_total", version_role="canary", status="2xx") > 0
    assert [r["action"] for r in s.swaps()][-2:] == ["swap", "canary_promote"]


# ---------------------------------------------------------------------------------------------- pieces

def test_shadow_answers_from_stable_and_counts_disagreements(tmp_path, releases):
    s = _Svc(tmp_path, releases["stable"])
    stable_version = s.svc.bundle.version
    ps = releases["probes"]
    with TestClient(s.app) as c:
        r = c.post("/v1/admin/canary", json={"path": str(releases["backdoored"]), "mode": "shadow"}, headers=s.h)
        assert r.status_code == 200 and r.json()["state"] == "shadowing"
        trig = ps.x[ps.mask("triggered")][:32].numpy()
        token = s.users[0][1]
        for img in trig:
            r = c.post("/v1/predict", content=npy_bytes(img), headers={"Authorization": f"Bearer {token}",
                                                                        "Content-Type": "application/x-npy"})
            assert r.json()["bundle_version"] == stable_version
        s.svc.rollout.close()  # drains the shadow's queue
        metrics = c.get("/metrics", headers=s.h).text
    assert _metric(metrics, "safedl_version_compared_total", version_role="shadow", source="traffic") == 32
    assert _metric(metrics, "safedl_version_disagreements_total", version_role="shadow", source="traffic") >= 16


def test_probes_endpoint_is_admin_only_and_serves_the_verified_set(tmp_path, releases):
    s = _Svc(tmp_path, releases["stable"])
    with TestClient(s.app) as c:
        user = {"Authorization": f"Bearer {s.users[0][1]}"}
        assert c.get("/v1/admin/probes", headers=user).status_code == 403
        r = c.get("/v1/admin/probes", headers=s.h)
        assert r.status_code == 200
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    ps = releases["probes"]
    assert np.array_equal(z["x"], ps.x.numpy()) and np.array_equal(z["y"], ps.y.numpy())
    assert list(z["kind_names"]) == ["clean", "adversarial", "triggered"]


def test_admin_canary_refuses_bad_bodies_and_a_second_rollout(tmp_path, releases):
    s = _Svc(tmp_path, releases["stable"])
    with TestClient(s.app) as c:
        for body, code in (({"path": ""}, 400), ({"path": "x", "fraction": 1.5}, 400), ({"mode": "x", "path": "p"}, 400),
                           ({"path": str(tmp_path / "missing")}, 422), ({"action": "abort"}, 409), ({"pth": 1}, 400)):
            r = c.post("/v1/admin/canary", json=body, headers=s.h)
            assert r.status_code == code, (body, r.text)
        s.svc.rollout.rules = parse_rollout("interval_s: 30", where="t")
        assert c.post("/v1/admin/canary", json={"path": str(releases["good"])}, headers=s.h).status_code == 200
        r = c.post("/v1/admin/canary", json={"path": str(releases["good"])}, headers=s.h)
        assert r.status_code == 409 and r.json()["error"]["code"] == "rollout_in_progress"
        r = c.post("/v1/admin/canary", json={"action": "abort"}, headers=s.h)
        assert r.status_code == 200 and r.json()["state"] == "aborted"
        assert c.post("/v1/admin/canary", json={"path": "x"}, headers={"Authorization": f"Bearer {s.users[0][1]}"}
                      ).status_code == 403
    assert json.loads(s.swaps()[-1]["detail"])["decided_by"] == "aborted by an admin"


# ---------------------------------------------------------------------------------------------- in flight

def _held_request(s, c, monkeypatch, token):
    """POST /v1/predict in a thread whose body read is held (a slow upload) until ``release`` is set."""
    import threading

    import anyio

    from safedl.serve import predict as predict_mod

    entered, release, out = threading.Event(), threading.Event(), {}
    orig = predict_mod.request_items

    async def slow(request, svc):
        items = await orig(request, svc)
        entered.set()
        await anyio.to_thread.run_sync(release.wait, 20.0)
        return items

    monkeypatch.setattr(predict_mod, "request_items", slow)
    x = npy_bytes(s_probe_x(s))

    def send() -> None:
        out["r"] = c.post("/v1/predict", content=x, headers={"Authorization": f"Bearer {token}",
                                                             "Content-Type": "application/x-npy"})

    t = threading.Thread(target=send)
    t.start()
    assert entered.wait(10.0)
    return t, release, out


def s_probe_x(s):
    return s.probes.x[:1].numpy()


def _canary_key(s):
    return next((k, t) for k, t in s.users if key_share(k.key_id) < 0.5)


@pytest.mark.parametrize("wait_max", [False, True])
def test_a_request_in_flight_on_a_rolled_back_canary_gets_its_answer(tmp_path, releases, monkeypatch, wait_max):
    """A key's request was routed to the canary, the canary is rolled back while the request's body is still
    arriving, and the body completes after the retire grace: it is answered (200), by the canary (the lane waits
    for it) or, once the lane's longest wait is over, by the stable version; audited with the version that
    answered."""
    import time

    from safedl.serve.rollout import lane as lane_mod, manager as manager_mod

    monkeypatch.setattr(manager_mod, "RETIRE_GRACE_S", 0.05)
    if wait_max:
        monkeypatch.setattr(lane_mod, "RETIRE_MAX_S", 0.1, raising=False)
    s = _Svc(tmp_path, releases["stable"], users=20)
    s.probes = releases["probes"]
    s.svc.rollout.rules = parse_rollout("interval_s: 30\nsteps: [50, 100]", where="(test rules)")
    stable_version, canary_version = s.svc.bundle.version, load_bundle(releases["good"]).version
    key, token = _canary_key(s)
    with TestClient(s.app) as c:
        assert c.post("/v1/admin/canary", json={"path": str(releases["good"])}, headers=s.h).status_code == 200
        deadline = time.monotonic() + 15
        while s.status(c)["fraction"] != 0.5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.status(c)["fraction"] == 0.5
        t, release, out = _held_request(s, c, monkeypatch, token)
        s.svc.rollout.decide("rollback", ctx={"trigger": "rollout"}, state="rolled_back", checks=[],
                             detail="test rollback")
        time.sleep(0.5)  # past the grace (and past the lane's longest wait when wait_max)
        release.set()
        t.join(20.0)
        r = out["r"]
        assert r.status_code == 200, r.text
        answered = r.json()["bundle_version"]
        assert answered == (stable_version if wait_max else canary_version)
        assert s.status(c)["state"] == "rolled_back"
        later = c.post("/v1/predict", content=npy_bytes(s_probe_x(s)),
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"})
        assert later.status_code == 200 and later.json()["bundle_version"] == stable_version
    conn = sqlite3.connect(s.audit_path)
    rows = conn.execute("SELECT http_status, bundle_version FROM audit WHERE request_id = ?",
                        (r.json()["request_id"],)).fetchall()
    conn.close()
    assert rows and all(st == 200 and v == answered for st, v in rows)


def test_non_inferiority_holds_at_its_step_then_rolls_back_for_insufficient_evidence(tmp_path, releases):
    """0 errors in ~70 probe calls cannot bound the 5xx rate under 1%: the controller holds (stays at the step,
    fraction unchanged, decision ``hold``) instead of rolling back at once; after max_holds it rolls back."""
    s = _Svc(tmp_path, releases["stable"])
    s.svc.rollout.rules = parse_rollout("interval_s: 0.2\nmax_holds: 2\nlive_attack: {n: 0}\n"
                                        "checks: {mode: non_inferiority, latency_slack_s: 0.25}", where="t")
    with TestClient(s.app) as c:
        assert c.post("/v1/admin/canary", json={"path": str(releases["good"])}, headers=s.h).status_code == 200
        final = wait_final(lambda: s.status(c), timeout_s=30.0)
    assert [h["decision"] for h in final["history"]] == ["start", "hold", "hold", "rollback"]
    assert all(h["fraction"] == 0.0 for h in final["history"])  # held before the first step: no key moved
    assert final["state"] == "rolled_back" and final["decided_by"]["hold"]
    assert "insufficient evidence, n=" in final["decided_by"]["note"] and "max_holds 2" in final["decided_by"]["note"]
    assert [r["action"] for r in s.swaps()] == ["canary_start", "canary_hold", "canary_hold", "canary_rollback"]
    per_evaluation = -(-len(releases["probes"]) // 64) + 64  # probe batches + single-image latency calls
    errors = next(ch for ch in final["checks"] if ch["check"] == "error_rate")
    assert errors["n"] == 3 * per_evaluation  # every evaluation's calls are evidence for the 5xx rate


def test_a_final_decision_and_the_lanes_removal_are_seen_together(tmp_path, releases):
    """Status read while a final decision is being announced (the alert hook runs after the state is set) shows no
    candidate: on the old code the state said "aborted" while the candidate was still listed (the flake of the
    rollback test above, which polls status from another thread)."""
    s = _Svc(tmp_path, releases["stable"])
    seen = []
    with TestClient(s.app) as c:
        s.svc.rollout.rules = parse_rollout("interval_s: 30", where="(test rules)")  # no decision of its own
        r = c.post("/v1/admin/canary", json={"path": str(releases["good"])}, headers=s.h)
        assert r.status_code == 200, r.text
        manager = s.svc.rollout
        announce = manager._notify

        def notify_and_look(entry):
            seen.append(manager.status())
            announce(entry)

        manager._notify = notify_and_look
        r = c.post("/v1/admin/canary", json={"action": "abort"}, headers=s.h)
        assert r.status_code == 200, r.text
    assert [(x["state"], x["candidate_version"], x["fraction"]) for x in seen] == [("aborted", None, 0.0)]
