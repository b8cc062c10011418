"""`safedl serve --canary/--shadow/--rollout`, `safedl rollout rules|status` and rollout.yaml validation."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from typer.testing import CliRunner  # noqa: E402

from _rollout_helpers import bundle, probes_for, train, wait_final  # noqa: E402
from _serve_helpers import Uvicorn  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.errors import UserError  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.options import ServeOptions  # noqa: E402
from safedl.serve.rollout.config import RolloutConfig, load_rollout, parse_rollout  # noqa: E402
from safedl.serve.server import build_app  # noqa: E402


def test_rollout_rules_prints_the_defaults_the_service_uses():
    r = CliRunner().invoke(cli, ["rollout", "rules"])
    assert r.exit_code == 0
    cfg = parse_rollout(r.output, where="printed")
    assert cfg == load_rollout(None) == RolloutConfig()  # the printed YAML is exactly the model's defaults
    assert cfg.steps == [5, 25, 50, 100] and cfg.interval_s == 60
    c = cfg.checks
    assert (c.latency_p99_ratio, c.error_rate, c.robust_accuracy_drop, c.backdoor_asr_increase, c.min_probes) == \
        (1.5, 0.01, 0.02, 0.05, 200)


@pytest.mark.parametrize("text, key", [("steps: [5, 3, 100]", "steps"), ("steps: [5, 50]", "steps"),
                                       ("interval_s: 0", "interval_s"), ("checks: {error_rat: 0.1}", "error_rat"),
                                       ("checks: {mode: lenient}", "checks.mode"), ("- 1", "top level")])
def test_a_bad_rollout_file_exits_2_naming_the_key(tmp_path, text, key):
    f = tmp_path / "rollout.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=key):
        load_rollout(f)
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "b"), "--keys", str(tmp_path / "k.db"), "--canary",
                                 str(tmp_path / "c"), "--rollout", str(f)])
    assert r.exit_code == 2 and str(f) in r.output and key.split(".")[-1] in r.output


def test_canary_fraction_sets_the_first_step_and_needs_a_canary(tmp_path):
    assert load_rollout(None).with_first_step(0.1).steps == [10, 25, 50, 100]
    assert load_rollout(None).with_first_step(0.3).steps == [30, 50, 100]
    with pytest.raises(UserError, match="--canary-fraction"):
        load_rollout(None).with_first_step(1.5)
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "b"), "--keys", str(tmp_path / "k.db"),
                                 "--canary-fraction", "0.1"])
    assert r.exit_code == 2 and "needs --canary" in r.output
    with pytest.raises(UserError, match="give one"):
        ServeOptions(bundle_path=tmp_path, keys_db=tmp_path / "k.db", canary_path=tmp_path, shadow_path=tmp_path)
    with pytest.raises(UserError, match="--workers 1"):
        ServeOptions(bundle_path=tmp_path, keys_db=tmp_path / "k.db", canary_path=tmp_path, workers=2)


def test_serve_with_canary_rolls_a_shuffled_label_model_back_and_status_says_why(tmp_path, digits_splits):
    stable = train(digits_splits, seed=0)
    ps = probes_for(stable, digits_splits)
    a = bundle(stable, digits_splits, tmp_path / "a", probes=ps)
    b = bundle(train(digits_splits, seed=0, labels="shuffled"), digits_splits, tmp_path / "b")  # no probes: a's
    keys = KeyStore(tmp_path / "keys.db", create=True)
    token = keys.create(name="ops", tier="full", scopes=("predict", "model", "admin"))[1]
    (tmp_path / "key").write_text(token + "\n")
    opts = ServeOptions(bundle_path=a, keys_db=tmp_path / "keys.db", audit_db=tmp_path / "audit.db",
                        canary_path=b, rollout=parse_rollout("interval_s: 0.5", where="t"))
    app = build_app(opts)
    with Uvicorn(app) as u:
        svc = app.state.service
        wait_final(svc.rollout.status)
        r = CliRunner().invoke(cli, ["rollout", "status", "--url", u.url, "--key-file", str(tmp_path / "key")])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("rolled_back") and "decided by clean_accuracy_drop" in r.output


def test_serve_refuses_a_tampered_canary_at_start(tmp_path, digits_splits, tiny_model):
    a = bundle(tiny_model, digits_splits, tmp_path / "a")
    b = bundle(tiny_model, digits_splits, tmp_path / "b")
    w = b / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 1
    w.write_bytes(bytes(raw))
    KeyStore(tmp_path / "keys.db", create=True)
    with pytest.raises(UserError, match="--canary .*sha256"):
        build_app(ServeOptions(bundle_path=a, keys_db=tmp_path / "keys.db", audit_db=tmp_path / "audit.db",
                               canary_path=b, rollout=load_rollout(None)))
