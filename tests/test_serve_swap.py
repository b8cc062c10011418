"""Bundle hot swap, rollback and SIGHUP reload (serve/swap.py) and the bundle SLI gauges (serve/slis.py): in-process
for the refusals and the gauges, in a real `safedl serve` process for the swap under load and SIGHUP."""
from __future__ import annotations

import shutil
import signal
import sqlite3
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import ServerProcess, make_bundle, png_bytes, quantized  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.deploy import SecurePipeline, export_bundle, load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.slis import bundle_slis  # noqa: E402

SIGNING_KEY = b"test-signing-key-0123456789"
# a defended system's manifest metrics in the layout `safedl export --defense` writes (numbers chosen so that every
# SLI rule below gives a different answer than its alternatives: adaptive vs non-adaptive, largest n vs min, ...)
DEFENDED = {
    "pgd": {"metrics": {
        "clean_accuracy": {"value": 0.972, "n": 1000}, "clean_accuracy_undefended": {"value": 0.975, "n": 1000},
        "robust_accuracy": {"value": 0.75, "n": 1000},
        "detection": {"tpr": {"value": 0.9, "n": 200}, "fpr": {"value": 0.05, "n": 1000}},
        "detection_adaptive": {"tpr": {"value": 0.6, "n": 200}, "fpr": {"value": 0.05, "n": 1000}}}},
    "square": {"metrics": {
        "clean_accuracy": {"value": 0.96, "n": 500}, "clean_accuracy_undefended": {"value": 0.98, "n": 500},
        "robust_accuracy": {"value": 0.9, "n": 500},
        "detection_adaptive": {"tpr": {"value": 0.8, "n": 50}, "fpr": {"value": 0.05, "n": 500}}}},
}
DET = "feature_squeezing_detector"


def _reexport(src, out, *, metrics=None, run=None, signing_key=None):
    """``src`` exported again (same system) with other manifest metrics / run info / signature."""
    b = load_bundle(src)
    spec = {k: v for k, v in b.manifest["model"].items() if k != "file"}
    return export_bundle(b.pipeline, out, model_spec=spec, data=b.manifest["data"],
                         metrics=b.manifest["metrics"] if metrics is None else metrics, run=run or {},
                         signing_key=signing_key)


def _other_bundle(splits, out, *, channels: int, classes: int):
    """An untrained tiny CNN with another input shape or class count, as a real (signed) bundle."""
    from safedl.models.normalize import with_normalization
    from safedl.models.zoo import build_model

    model = with_normalization(build_model("tiny_cnn", in_channels=channels, num_classes=classes, image_size=8),
                               [0.5] * channels, [0.25] * channels).eval()
    shape = [channels, 8, 8]
    names = [str(i) for i in range(classes)]
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": channels, "num_classes": classes, "image_size": 8,
            "mean": [0.5] * channels, "std": [0.25] * channels}
    return export_bundle(SecurePipeline(model=model, class_names=names, input_shape=shape), out, model_spec=spec,
                         data={"name": "x", "shape": shape, "num_classes": classes, "class_names": names},
                         signing_key=SIGNING_KEY)


def _entry_point_bundle(splits, out, *, signing_key):
    """A bundle whose model the manifest says to build by calling a Python function (here the zoo's builder)."""
    from safedl.models.zoo import build_model

    params = {"name": "tiny_cnn", "in_channels": 1, "num_classes": 10, "image_size": 8}
    model = build_model(**params).eval()
    names = [str(i) for i in range(10)]
    return export_bundle(SecurePipeline(model=model, class_names=names, input_shape=[1, 8, 8]), out,
                         model_spec={"entry_point": "safedl.models.zoo:build_model", "arch_params": params},
                         data={"name": "x", "shape": [1, 8, 8], "num_classes": 10, "class_names": names},
                         signing_key=signing_key)


def _tamper(src, out):
    shutil.copytree(src, out)
    w = out / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0x01
    w.write_bytes(bytes(raw))
    return out


@pytest.fixture(scope="module")
def bundles(tiny_model, digits_splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swap")
    plain = make_bundle(tiny_model, digits_splits, tmp / "plain")
    a = _reexport(plain, tmp / "a", signing_key=SIGNING_KEY)
    b = _reexport(plain, tmp / "b", metrics=DEFENDED, run={"defense": "feature_squeezing"}, signing_key=SIGNING_KEY)
    return {"plain": plain, "a": a, "b": b, "tampered": _tamper(b, tmp / "tampered"),
            "shape": _other_bundle(digits_splits, tmp / "rgb", channels=3, classes=10),
            "classes": _other_bundle(digits_splits, tmp / "five", channels=1, classes=5),
            "va": load_bundle(a).version, "vb": load_bundle(b).version}


def _swap_rows(audit_path) -> list[dict]:
    conn = sqlite3.connect(audit_path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM bundle_swaps ORDER BY id")]
    conn.close()
    return rows


def _metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------------------------------------ the SLIs

def test_bundle_slis_of_a_defended_manifest():
    s = bundle_slis(manifest={"metrics": DEFENDED, "run": {"defense": "feature_squeezing"},
                              "components": [{"kind": "preprocessor", "name": "feature_squeezing"},
                                             {"kind": "detector", "name": DET}]}, version="v1")
    assert s.defense == "feature_squeezing"
    assert s.clean_accuracy == 0.972  # the n=1000 measurement, not the lower n=500 one
    assert s.clean_accuracy_delta == pytest.approx(0.972 - 0.975)
    assert s.robust_accuracy == {"pgd": 0.75, "square": 0.9}
    assert s.adversarial_success_rate == pytest.approx({"pgd": 0.25, "square": 0.1})  # 1 - robust (defended)
    assert s.detection_recall == {DET: 0.6}  # adaptive tpr, worst attack
    # precision from the counts: pgd 120 TP / (120 + 50 FP), square 40 / (40 + 25); the worst is square's
    assert s.detection_precision == pytest.approx({DET: 40 / 65})


def test_bundle_slis_of_a_baseline_manifest_keep_the_measured_success_rate_and_no_delta():
    manifest = {"run": {"defense": None}, "components": [], "metrics": {
        "baseline": {"clean_accuracy": {"value": 0.975, "n": 1000}},
        "pgd": {"metrics": {"clean_accuracy": {"value": 0.98, "n": 500}, "robust_accuracy": {"value": 0.02, "n": 500},
                            "attack_success_rate": {"value": 0.97, "n": 490}}}}}
    s = bundle_slis(manifest=manifest, version="v0")
    assert (s.defense, s.clean_accuracy, s.clean_accuracy_delta) == ("none", 0.975, None)
    assert s.adversarial_success_rate == {"pgd": 0.97} and s.robust_accuracy == {"pgd": 0.02}
    assert s.detection_recall == {} and s.detection_precision == {}


# ------------------------------------------------------------------------------------------------ in-process

class _Svc:
    def __init__(self, tmp_path, bundle_path, *, signing_key=None):
        self.keys = KeyStore(tmp_path / "keys.db", create=True)
        self.admin = self.keys.create(name="ops", tier="full", scopes=("predict", "model", "admin"),
                                      rate_per_s=1000, burst=1000)[1]
        self.user = self.keys.create(name="user", tier="full", rate_per_s=1000, burst=1000)[1]
        self.audit_path = tmp_path / "audit.db"
        self.app = create_app(bundle=load_bundle(bundle_path, signing_key=signing_key), keys=self.keys,
                              audit=AuditStore(self.audit_path), config=ServeConfig())
        self.svc = self.app.state.service
        self.svc.swapper.configure(start_path=bundle_path, signing_key=signing_key, device="cpu")

    def post(self, client, path, token, json=None):
        return client.post(path, json=json, headers={"Authorization": f"Bearer {token}"})


def test_admin_endpoints_need_the_admin_scope(tmp_path, bundles):
    s = _Svc(tmp_path, bundles["a"], signing_key=SIGNING_KEY)
    with TestClient(s.app) as c:
        for path, body in (("/v1/admin/bundle", {"path": str(bundles["b"])}), ("/v1/admin/rollback", None)):
            r = s.post(c, path, s.user, body)
            assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]
            assert c.post(path, json=body).status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": s.user}).json()["bundle_version"] == bundles["va"]
    assert not _has_table(s.audit_path) or _swap_rows(s.audit_path) == []  # no attempt: nothing to audit


def _has_table(path) -> bool:
    conn = sqlite3.connect(path)
    ok = conn.execute("SELECT 1 FROM sqlite_master WHERE name='bundle_swaps'").fetchone() is not None
    conn.close()
    return ok


def test_refused_bundles_change_nothing(tmp_path, bundles, eval_batch):
    s = _Svc(tmp_path, bundles["a"], signing_key=SIGNING_KEY)
    img = png_bytes(quantized(eval_batch[0])[0])
    cases = [(bundles["shape"], 422, "bundle_incompatible", "input shape [3, 8, 8]"),
             (bundles["classes"], 422, "bundle_incompatible", "5 classes"),
             (bundles["tampered"], 422, "bundle_refused", "sha256 does not match"),
             (bundles["plain"], 422, "bundle_refused", "signature does not verify"),  # unsigned, server needs a key
             (tmp_path / "nowhere", 422, "bundle_refused", "not a bundle directory")]
    with TestClient(s.app) as c:
        for path, status, code, words in cases:
            r = s.post(c, "/v1/admin/bundle", s.admin, {"path": str(path)})
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
            assert words in r.json()["error"]["message"]
        assert s.post(c, "/v1/admin/bundle", s.admin, {"nope": 1}).status_code == 400
        r = s.post(c, "/v1/admin/rollback", s.admin)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "no_previous_bundle")
        r = c.post("/v1/predict", content=img, headers={"X-API-Key": s.user, "Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["bundle_version"] == bundles["va"]
        text = c.get("/metrics", headers={"X-API-Key": s.admin}).text
    assert _metric(text, 'safedl_bundle_swaps_total{outcome="refused"}') == 6.0
    assert _metric(text, 'safedl_bundle_swaps_total{outcome="swapped"}') == 0.0
    # bundle a's manifest names no defense: the label lists its components
    assert (f'safedl_bundle_info{{defense="feature_squeezing+{DET}",version="{bundles["va"]}"}} 1.0'
            in text.splitlines())
    rows = _swap_rows(s.audit_path)
    assert [r["outcome"] for r in rows] == ["refused"] * 6
    assert all(r["from_version"] == bundles["va"] and r["to_version"] is None for r in rows)


def test_an_entry_point_model_is_swapped_in_only_when_signed(tmp_path, digits_splits, bundles):
    """Over HTTP, a bundle whose manifest names a Python function to build the model needs the server's signing
    key: without one it is refused before the function runs; with one (and its signature) it loads."""
    unsigned = _entry_point_bundle(digits_splits, tmp_path / "ep", signing_key=None)
    (tmp_path / "nokey").mkdir()
    s = _Svc(tmp_path / "nokey", bundles["plain"])  # a server without --signing-key-file
    with TestClient(s.app) as c:
        r = s.post(c, "/v1/admin/bundle", s.admin, {"path": str(unsigned)})
    assert r.status_code == 422 and "entry point 'safedl.models.zoo:build_model'" in r.json()["error"]["message"]
    assert s.svc.bundle.version == load_bundle(bundles["plain"]).version
    signed = _entry_point_bundle(digits_splits, tmp_path / "ep_signed", signing_key=SIGNING_KEY)
    (tmp_path / "key").mkdir()
    s = _Svc(tmp_path / "key", bundles["a"], signing_key=SIGNING_KEY)
    with TestClient(s.app) as c:
        r = s.post(c, "/v1/admin/bundle", s.admin, {"path": str(signed)})
    assert r.status_code == 200 and r.json()["bundle_version"] == load_bundle(signed).version


def test_swap_and_rollback_publish_the_new_slis_and_version(tmp_path, bundles, eval_batch):
    s = _Svc(tmp_path, bundles["a"], signing_key=SIGNING_KEY)
    img = png_bytes(quantized(eval_batch[0])[0])
    va, vb = bundles["va"], bundles["vb"]
    with TestClient(s.app) as c:
        before = c.get("/metrics", headers={"X-API-Key": s.admin}).text
        r = s.post(c, "/v1/admin/bundle", s.admin, {"path": str(bundles["b"])})
        assert r.status_code == 200 and r.json() == {"bundle_version": vb, "previous_version": va,
                                                     "path": str(bundles["b"]), "outcome": "swapped"}
        assert c.get("/v1/model", headers={"X-API-Key": s.user}).json()["bundle_version"] == vb
        r = c.post("/v1/predict", content=img, headers={"X-API-Key": s.user, "Content-Type": "image/png"})
        assert r.json()["bundle_version"] == vb
        after = c.get("/metrics", headers={"X-API-Key": s.admin}).text
        r = s.post(c, "/v1/admin/rollback", s.admin)
        assert r.status_code == 200 and r.json()["bundle_version"] == va and r.json()["outcome"] == "rolled_back"
        back = c.get("/metrics", headers={"X-API-Key": s.admin}).text
    # bundle a (make_bundle's metrics: robust accuracy vs pgd only) has no clean accuracy; b has every SLI
    assert _metric(before, "safedl_bundle_clean_accuracy") is None
    assert _metric(before, 'safedl_bundle_robust_accuracy{attack="pgd"}') == 0.5
    assert f'safedl_bundle_info{{defense="feature_squeezing",version="{vb}"}} 1.0' in after
    assert _metric(after, "safedl_bundle_clean_accuracy") == 0.972
    assert _metric(after, "safedl_bundle_clean_accuracy_delta") == pytest.approx(-0.003)
    assert _metric(after, 'safedl_bundle_adversarial_success_rate{attack="square"}') == pytest.approx(0.1)
    assert _metric(after, f'safedl_bundle_detection_recall{{detector="{DET}"}}') == 0.6
    assert _metric(after, f'safedl_bundle_detection_precision{{detector="{DET}"}}') == pytest.approx(40 / 65)
    assert _metric(back, "safedl_bundle_clean_accuracy") is None and f'version="{va}"' in back
    rows = _swap_rows(s.audit_path)
    assert [(r["action"], r["outcome"], r["from_version"], r["to_version"]) for r in rows] == [
        ("swap", "swapped", va, vb), ("rollback", "rolled_back", vb, va)]
    conn = sqlite3.connect(s.audit_path)
    predicted = conn.execute("SELECT bundle_version FROM audit WHERE endpoint='/v1/predict'").fetchall()
    admin = conn.execute("SELECT key_id, http_status FROM audit WHERE endpoint LIKE '/v1/admin/%'").fetchall()
    conn.close()
    assert predicted == [(vb,)] and [h for _, h in admin] == [200, 200]


# ------------------------------------------------------------------------------------------------ a real process

def _load(url, token, img, stop, answered, lock, n_max=300):
    with httpx.Client(timeout=20.0) as c:
        for _ in range(n_max):
            if stop.is_set():
                return
            try:
                r = c.post(url + "/v1/predict", content=img, headers={"X-API-Key": token, "Content-Type": "image/png"})
                got = (r.status_code, r.json().get("bundle_version"))
            except (httpx.HTTPError, ValueError) as exc:  # a dropped connection or a timeout is a failure too
                got = (repr(exc), None)
            with lock:
                answered.append(got)


def _wait_version(srv, token, version, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(srv.url + "/v1/model", headers={"X-API-Key": token}, timeout=5)
        if r.json()["bundle_version"] == version:
            return True
        time.sleep(0.1)
    return False


def test_swap_under_load_rollback_and_sighup_in_a_server_process(bundles, tmp_path, eval_batch):
    """Four clients keep predicting while the bundle is swapped, a tampered one refused, rolled back, swapped again
    and reloaded by SIGHUP: every answer is a 200 and the answers' version follows the swaps."""
    keyfile = tmp_path / "signing.key"
    keyfile.write_bytes(SIGNING_KEY)
    res = CliRunner().invoke(cli, ["keys", "create", "--db", str(tmp_path / "k.db"), "--name", "ops", "--tier",
                                   "full", "--scopes", "predict,model,admin", "--rate", "10000", "--burst", "10000"])
    assert res.exit_code == 0, res.output
    token = res.stdout.strip().splitlines()[-1]
    va, vb = bundles["va"], bundles["vb"]
    imgs = [png_bytes(quantized(eval_batch[0])[i]) for i in range(4)]
    answered, lock, stop = [], threading.Lock(), threading.Event()
    h = {"X-API-Key": token}
    with ServerProcess(bundles["a"], tmp_path / "k.db", tmp_path / "audit.db", "--signing-key-file",
                       str(keyfile)) as srv:
        srv.wait_ready()
        threads = [threading.Thread(target=_load, args=(srv.url, token, img, stop, answered, lock)) for img in imgs]
        for t in threads:
            t.start()
        try:
            steps = []
            for path in ("b", "tampered", None, "b"):
                time.sleep(0.5)
                r = (httpx.post(srv.url + "/v1/admin/bundle", json={"path": str(bundles[path])}, headers=h, timeout=60)
                     if path else httpx.post(srv.url + "/v1/admin/rollback", headers=h, timeout=60))
                steps.append((r.status_code, r.json().get("bundle_version")))
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGHUP)
            reloaded = _wait_version(srv, token, va)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        metrics = httpx.get(srv.url + "/metrics", headers=h, timeout=5).text
        log = srv.log_records()
    assert steps == [(200, vb), (422, None), (200, va), (200, vb)]
    assert reloaded, "SIGHUP did not bring back the start bundle"
    codes = [s for s, _ in answered]
    assert len(codes) > 20 and set(codes) == {200}, f"{len(codes)} answers, non-200: {set(codes) - {200}}"
    assert {v for _, v in answered} == {va, vb}
    assert _metric(metrics, 'safedl_bundle_swaps_total{outcome="swapped"}') == 3.0  # b, b again, SIGHUP's a
    assert _metric(metrics, 'safedl_bundle_swaps_total{outcome="rolled_back"}') == 1.0
    assert _metric(metrics, 'safedl_bundle_swaps_total{outcome="refused"}') == 1.0
    rows = _swap_rows(tmp_path / "audit.db")
    assert [(r["trigger"], r["outcome"], r["from_version"], r["to_version"]) for r in rows] == [
        ("http", "swapped", va, vb), ("http", "refused", vb, None), ("http", "rolled_back", vb, va),
        ("http", "swapped", va, vb), ("sighup", "swapped", vb, va)]
    hup = [e for e in log if e.get("event") == "bundle_swap" and e.get("trigger") == "sighup"]
    assert [(e["outcome"], e["from_version"], e["bundle_version"]) for e in hup] == [("swapped", vb, va)]
