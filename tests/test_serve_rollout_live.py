"""The rollout's live adversarial probes (serve/rollout/live.py): a Square attack run by the controller on each
version's full pipeline. The stable release answers labels only (postprocessor class_labels, Tramer et al. 2016),
which a score-based attack cannot use; a canary with that defense removed (same model, same preprocessing) answers
the stored adversarial probes exactly as stable does, so only the live attack can tell them apart."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _rollout_helpers import bundle, probes_for, train, wait_final  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.rollout.config import parse_rollout  # noqa: E402
from safedl.serve.rollout.live import LaneOracle, live_robust, live_subset  # noqa: E402

LIVE = "interval_s: 0.3\nsteps: [50, 100]\nchecks: {latency_slack_s: 0.25}\n" \
       "live_attack: {n: 40, queries_per_image: 60, eps: 0.15, seed: 0}"
NO_LIVE = LIVE.replace("n: 40", "n: 0")


@pytest.fixture(scope="module")
def releases(digits_splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    stable = train(digits_splits, seed=0)
    ps = probes_for(stable, digits_splits)
    return {"probes": ps,
            "stable": bundle(stable, digits_splits, tmp / "stable", probes=ps, postprocessors=("class_labels",)),
            "undefended": bundle(stable, digits_splits, tmp / "undefended", probes=ps),
            "good": bundle(train(digits_splits, seed=1), digits_splits, tmp / "good", probes=ps,
                           postprocessors=("class_labels",))}


def _serve(tmp_path, stable_path, rules: str):
    keys = KeyStore(tmp_path / "keys.db", create=True)
    admin = keys.create(name="ops", tier="full", scopes=("predict", "model", "admin"), rate_per_s=1000,
                        burst=1000)[1]
    app = create_app(bundle=load_bundle(stable_path), keys=keys, audit=AuditStore(tmp_path / "audit.db"),
                     config=ServeConfig())
    app.state.service.rollout.rules = parse_rollout(rules, where="(test rules)")
    return app, {"Authorization": f"Bearer {admin}"}


def _rollout(tmp_path, releases, candidate: str, rules: str) -> dict:
    app, h = _serve(tmp_path, releases["stable"], rules)
    with TestClient(app) as c:
        assert c.post("/v1/admin/canary", json={"path": str(releases[candidate])}, headers=h).status_code == 200
        return wait_final(lambda: c.get("/v1/admin/rollout", headers=h).json(), timeout_s=60.0)


def test_the_live_attack_breaks_the_undefended_pipeline_not_the_labels_only_one(releases):
    ps = releases["probes"]
    idx = live_subset(ps, n=40, seed=0)
    assert len(idx) == 40 and bool(ps.mask("clean")[idx].all())
    assert idx.tolist() == live_subset(ps, n=40, seed=0).tolist() != live_subset(ps, n=40, seed=1).tolist()
    kw = {"eps": 0.15, "queries_per_image": 60, "seed": 0}
    labels_only = live_robust(load_bundle(releases["stable"]).pipeline.decide, ps, idx, **kw)[0]
    undefended, spent = live_robust(load_bundle(releases["undefended"]).pipeline.decide, ps, idx, **kw)
    assert 0 < spent <= 40 * 60 + 40
    assert float(undefended.float().mean()) + 0.2 < float(labels_only.float().mean())


def test_the_oracle_answers_a_rejection_as_uniform():
    import torch

    class D:
        probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        rejected = torch.tensor([False, True])

    out = LaneOracle(lambda x: D()).forward(torch.zeros(2, 1, 2, 2))
    assert torch.allclose(out.exp(), torch.tensor([[0.9, 0.1], [0.5, 0.5]]))


def test_a_canary_without_its_defense_passes_the_stored_probes_but_not_the_live_attack(tmp_path, releases):
    stored_only = _rollout(tmp_path / "a", releases, "undefended", NO_LIVE)
    assert stored_only["state"] == "promoted"  # what the stored probes alone decide: they cannot see it
    final = _rollout(tmp_path / "b", releases, "undefended", LIVE)
    assert final["state"] == "rolled_back"
    assert final["decided_by"]["check"] == "live_robust_accuracy_drop"
    assert final["decided_by"]["bound"] > final["decided_by"]["limit"] == 0.02 and final["decided_by"]["n"] == 40
    assert final["step"] == -1  # decided before the canary took any traffic


def test_a_good_canary_passes_the_live_attack_and_promotes(tmp_path, releases):
    final = _rollout(tmp_path, releases, "good", LIVE)
    assert final["state"] == "promoted", [ch for ch in final["checks"] if not ch["passed"]]
    live = next(ch for ch in final["checks"] if ch["check"] == "live_robust_accuracy_drop")
    assert live["passed"] and live["n"] == 40


def test_the_live_eps_is_the_bundles_threat_model():
    from safedl.serve.rollout.live import DEFAULT_SQUARE_EPS, bundle_eps

    manifest = {"metrics": {"square_4": {"metrics": {"robust_accuracy": {"value": 0.6}}, "attack_params": {"eps": 0.05}}}}
    assert bundle_eps(manifest) == 0.05
    assert bundle_eps({"metrics": {}}) == DEFAULT_SQUARE_EPS == 8 / 255
