"""``safedl ownership verify`` end to end (issue 26): a copier queries the watermarked service over HTTP (1,437
images), trains a copy on the answers; the copy is identified (TorchScript file, its own HTTP endpoint, and with the
service's audit as evidence) and an independently trained model is not accused. Bad input exits 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("fastapi")
from _serve_helpers import Uvicorn, make_bundle  # noqa: E402
from safedl import registry  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.models import TrainRecipe, build_model, train_model, with_normalization  # noqa: E402
from safedl.serve.app import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.client import RemoteClassifier, ServiceClient  # noqa: E402
from safedl.serve.config import ServeConfig  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.utils.tensors import seed_everything  # noqa: E402

KEY = b"ownership-test-watermark-key-0123"


def _independent(splits, seed: int):
    """A model trained by someone else on the same data (another seed), as TorchScript."""
    seed_everything(seed)
    m = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8), splits.mean,
                           splits.std)
    train_model(m, splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"), seed=seed)
    return m.eval()


def _plain_bundle(model, splits, out, *, arch: str):
    """``model`` alone (no preprocessor, no detector) as a bundle: the suspect's own service."""
    from safedl.deploy import SecurePipeline, export_bundle

    pipe = SecurePipeline(model=model, preprocessors=[], detectors=[], class_names=splits.train.class_names,
                          input_shape=splits.shape)
    mean = [float(v) for v in model[0].mean.flatten()]
    std = [float(v) for v in model[0].std.flatten()]
    spec = {"arch": arch, "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8, "mean": mean,
            "std": std}
    data = {"name": "digits", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    return export_bundle(pipe, out, model_spec=spec, data=data, metrics={})


def _serve(bundle_dir, root, name: str, *, watermark: bool, tier: str = "full"):
    keys = KeyStore(root / f"{name}-keys.db", create=True)
    key, token = keys.create(name="copier", tier=tier, rate_per_s=1e4, burst=10_000, daily_quota=10**6)
    cfg = ServeConfig(watermark_key=KEY if watermark else None)
    app = create_app(bundle=load_bundle(bundle_dir), keys=keys, audit=AuditStore(root / f"{name}-audit.db"),
                     config=cfg)
    return app, key.key_id, token


@pytest.fixture(scope="module")
def setup(tiny_model, digits_splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    bundle = make_bundle(tiny_model, digits_splits, root / "bundle", detect=False)
    (root / "wm.key").write_bytes(KEY)
    x = torch.cat([digits_splits.train.x, digits_splits.val.x])  # the copier's natural images: 1,437 queries
    app, kid, token = _serve(bundle, root, "victim", watermark=True)
    with Uvicorn(app) as server, ServiceClient(server.url, token=token) as client:
        answers = RemoteClassifier(client, access="scores", max_queries=len(x))(x).exp()
    attack = registry.create("extraction", "copycat", epochs=40, seed=0)  # small_cnn, trained to fit its answers
    copy = attack.train_surrogate(attack.fresh_surrogate((1, 8, 8), 10, x), x, answers, "scores", num_classes=10,
                                  device=torch.device("cpu"))
    np.save(root / "evidence.npy", x.numpy())
    torch.jit.script(copy).save(str(root / "copy.pt"))
    torch.jit.script(_independent(digits_splits, 1)).save(str(root / "independent.pt"))
    return {"root": root, "bundle": bundle, "copy": copy, "audit": root / "victim-audit.db", "key_id": kid}


def _verify(s, *args):
    return CliRunner().invoke(cli_app, ["ownership", "verify", str(s["bundle"]), "--watermark-key-file",
                                        str(s["root"] / "wm.key"), *args])


def _p(output: str) -> float:
    return float(output.split("p-value ")[1].split(";")[0])


def test_a_copy_trained_on_the_served_answers_is_identified_and_an_independent_model_is_not(setup):
    ev = ["--evidence", str(setup["root"] / "evidence.npy")]
    res = _verify(setup, "--suspect", str(setup["root"] / "copy.pt"), *ev)
    assert res.exit_code == 0, res.output
    assert "verdict: COPY" in res.output and _p(res.output) < 0.01, res.output
    res = _verify(setup, "--suspect", str(setup["root"] / "independent.pt"), *ev)
    assert res.exit_code == 0, res.output
    assert "not shown to be a copy" in res.output and _p(res.output) > 0.01, res.output  # p = 0.019 here


@pytest.mark.parametrize("tier,test", [("full", "rank-sum test on its scores"),
                                       ("label", "binomial test on its labels")])
def test_the_copy_behind_its_own_http_endpoint_is_identified(setup, digits_splits, tier, test):
    """The suspect serves the copy: through a full-tier key (scores: rank-sum test) and a label-tier key (labels
    alone: binomial test); only the watermarked evidence images are sent to it."""
    root = setup["root"]
    if not (root / "suspect-bundle").exists():
        _plain_bundle(setup["copy"], digits_splits, root / "suspect-bundle", arch="small_cnn")
    app, _, token = _serve(root / "suspect-bundle", root, f"suspect-{tier}", watermark=False, tier=tier)
    (root / f"suspect-{tier}.key").write_text(token)
    with Uvicorn(app) as server:
        res = _verify(setup, "--suspect-url", server.url, "--suspect-key-file", str(root / f"suspect-{tier}.key"),
                      "--evidence", str(root / "evidence.npy"))
    assert res.exit_code == 0, res.output
    assert test in res.output and "verdict: COPY" in res.output, res.output


def test_the_audit_selects_the_images_the_copier_sent_and_says_it_holds_hashes_only(setup, digits_splits):
    root = setup["root"]
    pool = np.concatenate([np.load(root / "evidence.npy"), digits_splits.test.x.numpy()])  # sent and never sent
    np.save(root / "pool.npy", pool)
    audit = ["--evidence", str(setup["audit"]), "--key-id", setup["key_id"]]
    res = _verify(setup, "--suspect", str(root / "copy.pt"), *audit, "--evidence-images", str(root / "pool.npy"))
    assert res.exit_code == 0, res.output
    assert "verdict: COPY" in res.output
    direct = _verify(setup, "--suspect", str(root / "copy.pt"), "--evidence", str(root / "evidence.npy"))
    assert res.output.split(";")[0] == direct.output.split(";")[0]  # same watermarked queries: the sent ones
    res = _verify(setup, "--suspect", str(root / "copy.pt"), *audit)
    assert res.exit_code == 2 and "input hashes only" in res.output and "--evidence-images" in res.output


def test_bad_input_exits_2_with_one_clear_message(setup, tmp_path):
    ev = ["--evidence", str(setup["root"] / "evidence.npy")]
    res = _verify(setup, "--suspect", str(tmp_path / "nothing.pt"), *ev)
    assert res.exit_code == 2 and "--suspect" in res.output and "no such" in res.output
    res = _verify(setup, *ev)
    assert res.exit_code == 2 and "give one suspect" in res.output
    res = _verify(setup, "--suspect-url", "http://127.0.0.1:9", *ev)
    assert res.exit_code == 2 and "--suspect-key-file" in res.output
    (tmp_path / "short.key").write_bytes(b"abc")
    res = _verify(setup, "--suspect", str(setup["root"] / "copy.pt"), *ev, "--watermark-key-file",
                  str(tmp_path / "short.key"))
    assert res.exit_code == 2 and "16 bytes" in res.output
