"""The review queue (`safedl serve --review`): rejected inputs stored with their decision (SQLite and PostgreSQL),
bounded in size and age; `safedl review list | show | label | export`; the admin API behind `/review`; the npz
export with its manifest, read back as a data set; `--quarantine` as an alias."""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import make_bundle, png_bytes, quantized  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.data.loaders import load_npz  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.errors import UserError  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.options import review_target  # noqa: E402
from safedl.serve.review.export import content_hash, manifest_path  # noqa: E402
from safedl.serve.review.store import ReviewStore  # noqa: E402

DET = "feature_squeezing_detector"


@pytest.fixture(scope="module")
def bundle(tiny_model, digits_splits, tmp_path_factory):
    return load_bundle(make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("review") / "bundle"))


@pytest.fixture(params=["sqlite", "postgresql"])
def review_db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "review.db")
    return request.getfixturevalue("pg_cluster").database()


def _split(bundle, eval_batch):
    x = quantized(eval_batch[0])
    d = bundle.pipeline.decide(x)
    return x, d.rejected.nonzero().flatten().tolist(), (~d.rejected).nonzero().flatten().tolist()


class Live:
    def __init__(self, tmp_path, bundle, review_db, **config):
        self.keys = KeyStore(tmp_path / "keys.db", create=True)
        self.user = self.keys.create(name="user", tier="full", rate_per_s=1e4, burst=10_000)[1]
        self.ops = self.keys.create(name="ops", scopes=("admin",), rate_per_s=1e4, burst=10_000)[1]
        self.app = create_app(bundle=bundle, keys=self.keys, audit=AuditStore(tmp_path / "audit.db"),
                              config=ServeConfig(review_db=review_db, **config))

    def post(self, client, img):
        return client.post("/v1/predict", files={"file": ("x.png", png_bytes(img), "image/png")},
                           headers={"Authorization": f"Bearer {self.user}"})


def _wait_for(store, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(store.items()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return store.items()


def test_rejected_inputs_are_queued_with_their_decision_and_nothing_else(tmp_path, bundle, eval_batch, review_db):
    x, flagged, clean = _split(bundle, eval_batch)
    assert len(flagged) >= 3 and clean
    live = Live(tmp_path, bundle, review_db)
    with TestClient(live.app) as c:
        answers = [live.post(c, x[i]).json() for i in flagged[:3]]
        assert live.post(c, x[clean[0]]).status_code == 200
        store = ReviewStore(review_db)
        items = _wait_for(store, 3)
    assert len(items) == 3  # the clean input is not queued
    by_request = {it.request_id: it for it in store.items(with_images=True)}
    for i, a in zip(flagged[:3], answers):
        it = by_request[a["request_id"]]
        res = a["results"][0]
        assert it.rejected and it.reason == res["reason"] == f"detector:{DET}" and it.source == "rejected"
        assert it.input_sha256 == res["input_sha256"] and it.bundle_version == a["bundle_version"]
        assert it.detector_scores[DET] == pytest.approx(res["detector_scores"][DET])
        assert it.key_id == live.keys.list()[0].key_id and it.review_label is None
        assert torch.equal(torch.from_numpy(it.image), x[i])  # exactly the pixels the model saw
        assert it.class_names == bundle.pipeline.class_names
    store.close()


def test_queue_is_bounded_in_size_and_age(tmp_path, bundle, eval_batch):
    x, flagged, _ = _split(bundle, eval_batch)
    now = [1_700_000_000.0]
    path = tmp_path / "r.db"
    store = ReviewStore(path, max_bytes=10**6, retention_days=1, create=True, clock=lambda: now[0])
    row = lambda i, ts: {"ts": ts, "request_id": f"r{i}", "image_index": 0, "input_sha256": "s", "rejected": True,
                         "class_names": ["0", "1"], "image": x[flagged[i]].numpy(), "detector_scores": {}}
    assert store.keep([row(0, now[0] - 2 * 86400), row(1, now[0])]) == 2
    assert store.keep([row(1, now[0])]) == 0  # the same request and image: not stored twice
    assert store.prune() == 1 and [it.request_id for it in store.items()] == ["r1"]
    size = store.items()[0].size_bytes
    small = ReviewStore(path, max_bytes=int(2.5 * size), clock=lambda: now[0])
    assert small.keep([row(i, now[0]) for i in range(2, 6)]) == 1 and small.skipped_full == 3
    assert sum(it.size_bytes for it in small.items()) <= 2.5 * size
    with pytest.raises(UserError, match="no such review database"):
        ReviewStore(tmp_path / "missing.db")


def _queue_three(tmp_path, bundle, eval_batch) -> tuple[str, list]:
    x, flagged, _ = _split(bundle, eval_batch)
    db = str(tmp_path / "review.db")
    store = ReviewStore(db, create=True)
    now = time.time()
    store.keep([{"ts": now - 10 + i, "request_id": f"req{i}", "image_index": 0, "input_sha256": f"{i:064x}",
                 "rejected": True, "reason": f"detector:{DET}", "label": 7, "class_names": bundle.pipeline.class_names,
                 "detector_scores": {DET: 0.5 + i}, "bundle_version": "v1", "key_id": "k1",
                 "image": x[flagged[i]].numpy()} for i in range(4)])
    store.close()
    return db, [x[flagged[i]] for i in range(4)]


def test_review_cli_lists_labels_and_exports_a_data_set_with_its_manifest(tmp_path, bundle, eval_batch):
    db, images = _queue_three(tmp_path, bundle, eval_batch)
    run = CliRunner().invoke
    res = run(cli, ["review", "list", "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [r["request_id"] for r in rows] == ["req3", "req2", "req1", "req0"]
    assert rows[0]["detector_scores"] == {DET: 3.5} and rows[0]["review_label"] is None
    ids = {r["request_id"]: r["id"] for r in rows}
    bad = run(cli, ["review", "label", str(ids["req0"]), "cat", "--db", db, "--by", "ana"])
    assert bad.exit_code == 2 and "allowed are attack, benign or a class name" in bad.output
    assert run(cli, ["review", "label", "999", "attack", "--db", db]).exit_code == 2
    for req, label in (("req0", "3"), ("req1", "attack"), ("req2", "benign"), ("req3", "5")):
        res = run(cli, ["review", "label", str(ids[req]), label, "--db", db, "--by", "ana"])
        assert res.exit_code == 0, res.output
    show = run(cli, ["review", "show", str(ids["req1"]), "--db", db, "--png", str(tmp_path / "one.png")])
    assert show.exit_code == 0 and json.loads(show.output)["review_label"] == "attack"
    assert (tmp_path / "one.png").read_bytes() == png_bytes(images[1])
    assert [json.loads(r)["request_id"] for r in run(cli, ["review", "list", "--db", db, "--json", "--state",
                                                           "unlabelled"]).output.splitlines()] == []
    out = tmp_path / "reviewed.npz"
    res = run(cli, ["review", "export", "--db", db, "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = load_npz(out)  # the loader `safedl run` uses
    assert data.y.tolist() == [3, 5] and torch.equal(data.x, torch.stack([images[0], images[3]]))
    with np.load(out) as f:
        assert f["x_attack"].shape[0] == 1 and f["x_benign"].shape[0] == 1 and f["attack_predicted"].tolist() == [7]
        inner = json.loads(str(f["manifest"]))
        arrays = {k: f[k] for k in f.files if k != "manifest"}
    side = json.loads(manifest_path(out).read_text())
    assert side["file_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert side["content_sha256"] == inner["content_sha256"] == content_hash(arrays)
    assert side["counts"] == {"classes": 2, "attack": 1, "benign": 1}
    assert [(i["request_id"], i["label"], i["labelled_by"]) for i in side["items"]] == [
        ("req0", "3", "ana"), ("req3", "5", "ana"), ("req1", "attack", "ana"), ("req2", "benign", "ana")]
    assert all(isinstance(i["labelled_at"], float) for i in side["items"])
    assert run(cli, ["review", "export", "--db", db, "--out", str(tmp_path / "x.csv")]).exit_code == 2


def test_review_api_needs_admin_and_labels_with_the_key_name(tmp_path, bundle, eval_batch):
    db, _ = _queue_three(tmp_path, bundle, eval_batch)
    live = Live(tmp_path, bundle, db)
    ops, user = ({"Authorization": f"Bearer {t}"} for t in (live.ops, live.user))
    with TestClient(live.app) as c:
        assert c.get("/v1/review").status_code == 401
        assert c.get("/v1/review", headers=user).status_code == 403
        body = c.get("/v1/review", headers=ops).json()
        assert len(body["items"]) == 4 and all(i["png_base64"] for i in body["items"])
        first = body["items"][0]
        assert first["choices"] == ["attack", "benign", *bundle.pipeline.class_names]
        assert c.post(f"/v1/review/{first['id']}/label", json={"label": "x"}, headers=user).status_code == 403
        assert c.post(f"/v1/review/{first['id']}/label", json={"label": "dog"}, headers=ops).status_code == 422
        assert c.post(f"/v1/review/{first['id']}/label", content=b"{", headers=ops).status_code == 400
        assert c.post("/v1/review/9999/label", json={"label": "attack"}, headers=ops).status_code == 404
        r = c.post(f"/v1/review/{first['id']}/label", json={"label": "attack"}, headers=ops)
        assert r.status_code == 200 and r.json()["labelled_by"] == "key:ops" and r.json()["review_label"] == "attack"
        assert len(c.get("/v1/review", headers=ops).json()["items"]) == 3  # default: the unlabelled ones
        assert c.get("/v1/review?state=bogus", headers=ops).status_code == 422
        page = c.get("/review")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    off = create_app(bundle=bundle, keys=live.keys, audit=AuditStore(tmp_path / "audit2.db"))
    with TestClient(off) as c:
        assert c.get("/v1/review", headers=ops).json()["error"]["code"] == "review_off"


def test_quarantine_is_an_alias_of_review(tmp_path):
    assert review_target(None, tmp_path / "q") == str(tmp_path / "q" / "review.db")
    assert review_target("sqlite:///r.db", None) == "sqlite:///r.db"
    with pytest.raises(UserError, match="alias of --review"):
        review_target("r.db", tmp_path / "q")
    with pytest.raises(UserError, match="--review"):
        review_target("mysql://h/db", None)
    res = CliRunner().invoke(cli, ["serve", str(tmp_path), "--keys", str(tmp_path / "k.db"), "--review", "r.db",
                                   "--quarantine", str(tmp_path / "q")])
    assert res.exit_code == 2 and "alias of --review" in res.output


def test_inputs_the_monitor_flags_are_queued_too(tmp_path, bundle, digits_splits):
    """The shipped monitor rules (thresholds calibrated on benign streams of the digits training split, seed 0) and
    a square-attack-like stream of near-duplicates (+-0.1 squares on one test digit, seed 0) from one key: the input
    a query detector flagged lands in the queue as ``source: flagged`` with its detector and score."""
    import yaml

    from _monitor_helpers import near_duplicates, npy, write_config
    from safedl.serve.monitor import DEFAULT_RULES, load_monitor_config
    from safedl.serve.monitor.calibration import calibrate, quantize, save_calibration

    calib = save_calibration(calibrate(bundle, digits_splits.train.x, seed=0), tmp_path / "calibration.json")
    rules = yaml.safe_load(DEFAULT_RULES.read_text())["rules"]
    cfg = load_monitor_config(write_config(tmp_path / "monitor.yml", calibration=calib, rules=rules))
    keys = KeyStore(tmp_path / "keys.db", create=True)
    token = keys.create(name="attacker", tier="full", rate_per_s=1e4, burst=10_000)[1]
    db = str(tmp_path / "review.db")
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(tmp_path / "audit.db"),
                     config=ServeConfig(review_db=db), monitor_config=cfg)
    attack = near_duplicates(quantize(digits_splits.test.x[0]), 150, eps=0.1, seed=0)
    with TestClient(app) as c:
        for img in attack:
            r = c.post("/v1/predict", content=npy(img[None]), headers={"Authorization": f"Bearer {token}",
                                                                       "Content-Type": "application/x-npy"})
            assert r.status_code == 200
        assert app.state.service.monitor.flush()
        flagged = [it for it in ReviewStore(db).items(with_images=True) if it.source == "flagged"]
    assert flagged, "the monitor flagged nothing"
    it = flagged[-1]
    det = it.reason.removeprefix("query_flag:").split(" ")[0]
    assert det in it.detector_scores and not it.rejected and it.key_id == keys.list()[0].key_id
    assert any(torch.equal(torch.from_numpy(it.image), a) for a in attack)
    assert it.class_names == bundle.pipeline.class_names and it.bundle_version == bundle.version


def test_an_unreachable_review_database_is_one_clear_error(tmp_path):
    url = "postgresql://nobody@127.0.0.1:1/none"
    with pytest.raises(UserError, match="--db postgresql://nobody@127.0.0.1:1/none: cannot open the review database"):
        ReviewStore(url, flag="--db")
    res = CliRunner().invoke(cli, ["review", "list", "--db", url])
    assert res.exit_code == 2 and "cannot open the review database" in res.output
    res = CliRunner().invoke(cli, ["review", "list", "--db", str(tmp_path / "none.db")])
    assert res.exit_code == 2 and "no such review database" in res.output
