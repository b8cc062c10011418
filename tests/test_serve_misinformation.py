"""Adaptive misinformation in `safedl serve` (issue 26): on by default for keys that receive scores (threshold from
`safedl monitor calibrate`), never for label-tier keys, off with ``misinformation: false``."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _monitor_helpers import npy, write_config  # noqa: E402
from _serve_helpers import make_bundle  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve.app import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.monitor.config import load_monitor_config  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_model, digits_splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("mis")
    bundle = make_bundle(tiny_model, digits_splits, root / "bundle", detect=False)
    calib = root / "calibration.json"
    res = CliRunner().invoke(cli_app, ["monitor", "calibrate", str(bundle), "--out", str(calib)])
    assert res.exit_code == 0, res.output
    return root, bundle, calib


def _served(root, bundle, calib, x, sub: str, **extra):
    keys = KeyStore(root / f"{sub}-k.db", create=True)
    tok = {t: keys.create(name=t, tier=t, rate_per_s=1e4, burst=10_000)[1] for t in ("full", "label")}
    cfg = load_monitor_config(write_config(root / f"{sub}.yml", calibration=calib, rules=[], **extra))
    app = create_app(bundle=load_bundle(bundle), keys=keys, audit=AuditStore(root / f"{sub}-a.db"), monitor_config=cfg)
    out = {}
    with TestClient(app) as client:
        for tier, t in tok.items():
            r = client.post("/v1/predict", content=npy(x), headers={"Authorization": f"Bearer {t}",
                                                                    "Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
            out[tier] = r.json()["results"]
    return out


def test_score_keys_get_misinformation_below_tau_and_label_keys_never(setup, digits_splits):
    root, bundle, calib = setup
    tau = json.loads(calib.read_text())["misinformation"]["tau"]
    assert 0 < tau < 1
    t = digits_splits.test.x
    mixes = 0.5 * t[:32] + 0.5 * t[32:64]  # two digits in one image: the model is unsure
    x = torch.cat([t[64:96], mixes])  # 64 = max_images
    probs = load_bundle(bundle).pipeline.decide(x).probs
    conf, model_label = probs.max(1).values, probs.argmax(1)
    low, high = conf < tau - 0.005, conf > tau + 0.005
    assert int(low.sum()) >= 1 and int(high.sum()) >= 20, (tau, conf.sort().values[:8])
    got = _served(root, bundle, calib, x, "on")
    full = torch.tensor([r["label"] for r in got["full"]])
    assert torch.equal(full[high], model_label[high])
    assert torch.equal(full[low], probs.argmin(1)[low])  # the reversed scores' top class
    assert torch.allclose(torch.tensor([r["probabilities"] for r in got["full"]])[high], probs[high], atol=1e-5)
    assert torch.equal(torch.tensor([r["label"] for r in got["label"]]), model_label)
    off = _served(root, bundle, calib, x, "off", misinformation=False)
    assert torch.equal(torch.tensor([r["label"] for r in off["full"]]), model_label)
