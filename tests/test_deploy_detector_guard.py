"""The bundle's detector failure policy (``safedl export --detector-failure fail_closed|fail_open``, with a
timeout): fault injection into a real bundle's detector (it raises, hangs past the timeout, returns NaN) through
the service: fail_closed answers 503 and audits it; fail_open answers without the detector, counts and audits it."""
from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import audit_rows, make_bundle, png_bytes  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.deploy import export_bundle, load_bundle  # noqa: E402
from safedl.deploy.detector_guard import (DetectorFailurePolicy, DetectorUnavailable,  # noqa: E402
                                          GuardedScoring)
from safedl.errors import UserError  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402

DET = "feature_squeezing_detector"


class FakeDetector:
    def __init__(self, name, score):
        self.name, self.score = name, score


def _ones(x):
    return torch.ones(len(x))


def test_guard_fail_closed_raises_and_fail_open_reports_each_kind_of_failure():
    x = torch.zeros(3, 1, 8, 8)

    def boom(x):
        raise RuntimeError("kaput")

    bad = [FakeDetector("raises", boom), FakeDetector("nan", lambda x: torch.full((len(x),), float("nan"))),
           FakeDetector("shape", lambda x: torch.ones(len(x) + 1))]
    with pytest.raises(DetectorUnavailable, match="kaput") as info:
        GuardedScoring(DetectorFailurePolicy()).score([FakeDetector("ok", _ones), bad[0]], x)
    assert info.value.detector == "raises"
    scores, failures = GuardedScoring(DetectorFailurePolicy(mode="fail_open")).score(
        [FakeDetector("ok", _ones), *bad], x)
    assert list(scores) == ["ok"] and torch.equal(scores["ok"], torch.ones(3))
    assert set(failures) == {"raises", "nan", "shape"}
    assert "kaput" in failures["raises"] and "not finite" in failures["nan"] and "expected 3" in failures["shape"]


def test_guard_timeout_is_enforced_and_a_hung_detector_fails_at_once_until_it_returns():
    release = threading.Event()

    def hang(x):
        release.wait(20)
        return torch.ones(len(x))

    guard = GuardedScoring(DetectorFailurePolicy(mode="fail_open", timeout_s=0.2))
    x = torch.zeros(2, 1, 8, 8)
    t0 = time.monotonic()
    _, failures = guard.score([FakeDetector("hang", hang)], x)
    assert time.monotonic() - t0 < 2.0 and "within 0.2 s" in failures["hang"]
    t0 = time.monotonic()
    _, failures = guard.score([FakeDetector("hang", hang)], x)  # still busy: no second wait
    assert time.monotonic() - t0 < 0.1 and "still running" in failures["hang"]
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        scores, failures = guard.score([FakeDetector("hang", hang)], x)
        if not failures:
            break
        time.sleep(0.05)
    assert not failures and torch.equal(scores["hang"], torch.ones(2))


@pytest.mark.parametrize("kw, flag", [({"mode": "fail_maybe"}, "--detector-failure"),
                                      ({"timeout_s": 0}, "--detector-timeout-s"),
                                      ({"timeout_s": float("inf")}, "--detector-timeout-s")])
def test_policy_bad_values_are_one_clear_error(kw, flag):
    with pytest.raises(UserError, match=flag):
        DetectorFailurePolicy(**kw)
    with pytest.raises(UserError, match="detector_failure must be"):
        DetectorFailurePolicy.from_manifest({"policy": "fail_open", "extra": 1}, where="m.json")
    assert DetectorFailurePolicy.from_manifest(None, where="m.json") == DetectorFailurePolicy()


def test_export_cli_refuses_an_unknown_policy_with_exit_2(tmp_path):
    res = CliRunner().invoke(cli, ["export", str(tmp_path), "--baseline", "--out", str(tmp_path / "b"),
                                   "--detector-failure", "fail_sometimes"])
    assert res.exit_code == 2 and "fail_closed | fail_open" in res.output, res.output
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def bundles(tiny_model, digits_splits, tmp_path_factory):
    """The same system exported with the default policy and with fail_open (timeout 0.3 s)."""
    root = tmp_path_factory.mktemp("detfail")
    closed = make_bundle(tiny_model, digits_splits, root / "closed")
    b = load_bundle(closed)
    opened = export_bundle(b.pipeline, root / "open", data=b.manifest["data"],
                           model_spec={k: v for k, v in b.manifest["model"].items() if k != "file"},
                           detector_failure=DetectorFailurePolicy(mode="fail_open", timeout_s=0.3))
    return {"fail_closed": closed, "fail_open": opened}


def test_the_policy_is_in_the_manifest_and_the_loaded_pipeline(bundles):
    closed, opened = load_bundle(bundles["fail_closed"]), load_bundle(bundles["fail_open"])
    assert closed.manifest["detector_failure"] == {"policy": "fail_closed", "timeout_s": 5.0}
    assert opened.pipeline.detector_failure == DetectorFailurePolicy(mode="fail_open", timeout_s=0.3)


def _serve(tmp_path, bundle_dir):
    bundle = load_bundle(bundle_dir)
    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="u", tier="full", rate_per_s=1000, burst=1000)[1]
    scraper = keys.create(name="m", scopes=("metrics",), rate_per_s=1000, burst=1000)[1]
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(tmp_path / "a.db"), config=ServeConfig())
    return bundle, app, token, scraper


def _inject(bundle, fault):
    """The fault in the detector's own score (its thread, under the timeout) and, for raise and nan, in the part
    it runs inside the classifier's shared forward pass (deploy/shared_forward.py). A hang needs the detector's
    own thread: the pipeline is told not to share the forward pass (the timeout does not apply inline)."""
    det = bundle.pipeline.detectors[0].detector
    real, real_shared = det.score, det.score_from_logits

    def faulty(x, *more):
        if fault == "raise":
            raise RuntimeError("injected fault")
        if fault == "hang":
            time.sleep(1.5)
        if fault == "nan":
            return torch.full((len(x),), float("nan"))
        return real_shared(x, *more) if more else real(x)

    det.score = faulty
    det.score_from_logits = faulty
    if fault == "hang":
        bundle.pipeline.share_forward = False


def _post(client, token, img):
    return client.post("/v1/predict", files={"file": ("x.png", png_bytes(img), "image/png")},
                       headers={"Authorization": f"Bearer {token}"})


def _failures_metric(client, scraper, policy):
    text = client.get("/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
    line = [ln for ln in text.splitlines()
            if ln.startswith("safedl_detector_failures_total{") and f'policy="{policy}"' in ln]
    return float(line[0].split()[-1]) if line else 0.0


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_fail_closed_answers_503_and_audits_it(tmp_path, bundles, eval_batch, fault):
    bundle, app, token, scraper = _serve(tmp_path, bundles["fail_closed"])
    with TestClient(app) as client:
        assert _post(client, token, eval_batch[0][0]).status_code == 200  # healthy before the fault
        _inject(bundle, fault)
        r = _post(client, token, eval_batch[0][1])
        assert r.status_code == 503 and r.json()["error"]["code"] == "detector_unavailable", r.text
        assert r.headers["Retry-After"] == "5" and DET in r.json()["error"]["message"]
        assert _failures_metric(client, scraper, "fail_closed") == 1.0
    rows = audit_rows(tmp_path / "a.db", "endpoint = '/v1/predict'")
    assert [(x["http_status"], x["error"]) for x in rows] == [(200, None), (503, "detector_unavailable")]


@pytest.mark.parametrize("fault", ["raise", "hang", "nan"])
def test_fail_open_answers_without_the_detector_and_flags_it(tmp_path, bundles, eval_batch, fault):
    bundle, app, token, scraper = _serve(tmp_path, bundles["fail_open"])
    with TestClient(app) as client:
        _inject(bundle, fault)
        t0 = time.monotonic()
        r = _post(client, token, eval_batch[0][0])
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["label"] is not None and not res["rejected"] and res["detector_scores"] == {}
        assert _failures_metric(client, scraper, "fail_open") == 1.0
    if fault == "hang":
        assert took < 1.4  # the 0.3 s timeout, not the 1.5 s the detector takes
    (row,) = audit_rows(tmp_path / "a.db", "endpoint = '/v1/predict'")
    assert row["http_status"] == 200 and row["error"] == f"detector_failed:{DET}" and row["label"] is not None


def test_back_to_back_calls_never_find_the_previous_one_still_running():
    """The worker is free before its caller wakes: 300 quick calls in a row, no spurious 'still running'."""
    guard = GuardedScoring(DetectorFailurePolicy(timeout_s=5.0))
    x = torch.zeros(1, 1, 8, 8)
    for _ in range(300):
        scores, failures = guard.score([FakeDetector("quick", _ones)], x)
        assert not failures and torch.equal(scores["quick"], torch.ones(1))
