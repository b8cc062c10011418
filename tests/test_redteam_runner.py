"""`safedl redteam` against a real service (uvicorn in a thread on 127.0.0.1, the tiny digits CNN): textfile metrics
that promtool accepts, agreement with the same attack run offline, SLO breaks (exit 1), the release's value, the
query and time bounds, backdoor replay, bad input (exit 2, nothing written)."""
from __future__ import annotations

import logging
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _binaries import required_binary  # noqa: E402
from _serve_helpers import Uvicorn, make_bundle  # noqa: E402
from safedl import registry  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.deploy.bundle import export_bundle  # noqa: E402
from safedl.redteam.probes import ProbeSet, save_probe_file  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.client import PipelineClassifier  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.utils.stats import wilson_interval  # noqa: E402

SQUARE_EPS = 0.15
RELEASE_SQUARE = 0.97  # the release's value written into the bundle's manifest below


@pytest.fixture(scope="module")
def served(tiny_model, digits_splits, tmp_path_factory):
    """The digits CNN behind feature squeezing (no detector), its manifest saying square at eps 0.15 measured
    robust accuracy 0.97; a full-tier key and a label-tier key in files."""
    root = tmp_path_factory.mktemp("redteam")
    plain = load_bundle(make_bundle(tiny_model, digits_splits, root / "plain", detect=False))
    m = plain.manifest
    metrics = {"square": {"metrics": {"robust_accuracy": {"value": RELEASE_SQUARE, "ci95": [0.9, 1.0], "n": 100}},
                          "attack_params": {"eps": SQUARE_EPS, "max_queries": 50}}}
    bundle = load_bundle(export_bundle(plain.pipeline, root / "bundle", model_spec=m["model"], data=m["data"],
                                       metrics=metrics))
    keys = KeyStore(root / "keys.db", create=True)
    files = {}
    for tier in ("full", "label"):
        files[tier] = root / f"{tier}.key"
        files[tier].write_text(keys.create(name=tier, tier=tier, rate_per_s=10_000, burst=10_000,
                                           daily_quota=10_000_000)[1] + "\n")
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(root / "audit.db"), config=ServeConfig(max_images=64))
    with Uvicorn(app) as srv:
        srv.keys, srv.bundle = files, bundle
        yield srv


@pytest.fixture(scope="module")
def probe_file(digits_splits, tiny_model, tmp_path_factory):
    """120 test images (uint8, as an export stores them) with 40 stored adversarial examples (PGD on the model) and
    30 'triggered' inputs, 12 of them answered as their target."""
    x, y = digits_splits.test.x[:120], digits_splits.test.y[:120]
    pgd = registry.create("evasion", "pgd", eps=0.3, steps=10, seed=0)
    x_adv = pgd(tiny_model, x[:40], y[:40])
    xt = digits_splits.test.x[200:230]
    with torch.no_grad():
        pred = tiny_model(xt).argmax(1)
    # rows 0-11 "carry the trigger": labelled one class off, with the model's own answer as the target (hits);
    # rows 12-29 keep their labels and a target the model does not answer (misses)
    yt = torch.where(torch.arange(30) < 12, (pred + 1) % 10, digits_splits.test.y[200:230])
    target = torch.where(torch.arange(30) < 12, pred, (pred + 5) % 10)
    path = tmp_path_factory.mktemp("probes") / "probes.npz"
    np.savez(path, x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy(), x_adv=x_adv.numpy(),
             y_adv=y[:40].numpy(), x_trigger=xt.numpy(), y_trigger=yt.numpy(), trigger_target=target.numpy())
    return path, xt, yt, target


def _series(path) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _assert_exit_matches_breaches(res, series) -> None:
    """``safedl redteam`` exits 1 exactly when its textfile reports a broken SLO, else 0."""
    breached = [labs for (n, labs), v in series.items() if n == "safedl_redteam_slo_breached" and v == 1]
    assert res.exit_code == (1 if breached else 0), (breached, res.output)


def _get(series, name, **labels) -> float | None:
    for (n, labs), v in series.items():
        if n == name and all(dict(labs).get(k) == val for k, val in labels.items()):
            return v
    return None


def _redteam(served, out, *args: str):
    return CliRunner().invoke(cli_app, ["redteam", "--url", served.url, "--key-file", str(served.keys["full"]),
                                        "--out", str(out), *args])


def test_square_through_http_agrees_with_the_offline_run_within_their_intervals(served, digits_splits, tmp_path):
    """Issue 25's "numbers agree with the offline run within their confidence intervals": square through the CLI
    and the same attack (same eps, budget, seed) run in-process on the bundle's pipeline, on 100 probes."""
    x, y = digits_splits.test.x[:100], digits_splits.test.y[:100]
    data = tmp_path / "p.npz"
    save_probe_file(data, ProbeSet(x=x, y=y))
    out = tmp_path / "slis.prom"
    res = _redteam(served, out, "--attacks", "square", "--n", "100", "--queries-per-image", "50",
                   "--eps", f"square={SQUARE_EPS}", "--data", str(data), "--slo", str(_slo(tmp_path, "{}")))
    s = _series(out)
    _assert_exit_matches_breaches(res, s)
    http_ra = _get(s, "safedl_redteam_robust_accuracy", attack="square")
    lo, hi = (_get(s, f"safedl_redteam_robust_accuracy_ci95_{b}", attack="square") for b in ("lower", "upper"))
    attack = registry.create("evasion", "square", eps=SQUARE_EPS, norm="linf", max_queries=50, seed=0)
    adv = attack(PipelineClassifier(served.bundle.pipeline), x, y)
    k = int((served.bundle.pipeline.decide(adv).labels == y).sum())
    off_lo, off_hi = wilson_interval(k, 100)
    logging.getLogger("test_redteam").info("square eps=%g, 50 queries/probe, seed 0, n=100: HTTP %.2f [%.3f, %.3f], "
                                           "offline %.2f [%.3f, %.3f]", SQUARE_EPS, http_ra, lo, hi, k / 100,
                                           off_lo, off_hi)
    assert _get(s, "safedl_redteam_n", attack="square") == 100
    assert lo <= k / 100 <= hi and off_lo <= http_ra <= off_hi, (http_ra, k)
    assert http_ra < 0.9 and k < 90  # the attack did break some probes on both paths (a test that could fail)


def _slo(tmp_path, text: str):
    p = tmp_path / "slo.yml"
    p.write_text(text)
    return p


def test_full_run_writes_promtool_clean_metrics_and_the_release_value(served, probe_file, tmp_path):
    path, xt = probe_file[:2]
    out = tmp_path / "slis.prom"
    res = _redteam(served, out, "--label-key-file", str(served.keys["label"]), "--n", "20", "--queries-per-image",
                   "30", "--eps", f"square={SQUARE_EPS},hopskipjump=1.0", "--data", str(path),
                   "--slo", str(_slo(tmp_path, "max_drop_from_release: null\nmax_backdoor_asr: 1.0\n")))
    assert res.exit_code == 0, res.output
    s = _series(out)
    version = served.bundle.version
    for attack, eps in (("square", f"{SQUARE_EPS:g}"), ("hopskipjump", "1"), ("replay", "stored")):
        assert _get(s, "safedl_redteam_robust_accuracy", attack=attack, eps=eps, bundle_version=version) is not None
        assert _get(s, "safedl_redteam_detected", attack=attack) == 0  # no detector in this bundle
    assert _get(s, "safedl_redteam_n", attack="square") == 20 and _get(s, "safedl_redteam_n", attack="replay") == 20
    assert _get(s, "safedl_redteam_release_robust_accuracy", attack="square") == RELEASE_SQUARE
    assert _get(s, "safedl_redteam_release_robust_accuracy", attack="hopskipjump") is None  # release: none
    assert 0 < _get(s, "safedl_redteam_queries", attack="square") <= 20 * 30 + 20
    # backdoor replay (--n cuts every array to 20 rows): rows already of the target class are left out; ASR = the
    # share of the rest the service answers with the target
    pred = served.bundle.pipeline.decide(xt[:20]).labels
    yt, target = probe_file[2][:20], probe_file[3][:20]
    keep = yt != target
    asr = _get(s, "safedl_redteam_backdoor_asr", attack="replay_backdoor")
    assert _get(s, "safedl_redteam_n", attack="replay_backdoor") == int(keep.sum())
    assert asr == pytest.approx(float((pred[keep] == target[keep]).float().mean())) and asr > 0.4
    promtool = required_binary("promtool", package="prometheus")
    r = subprocess.run([promtool, "check", "metrics"], input=out.read_text(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_robust_accuracy_far_below_the_release_breaks_the_slo_exit_1(served, probe_file, tmp_path):
    out = tmp_path / "slis.prom"
    res = _redteam(served, out, "--attacks", "square", "--n", "40", "--queries-per-image", "40",
                   "--data", str(probe_file[0]))  # eps defaults to the release's 0.15; default SLO: 2 points
    assert res.exit_code == 1, res.output
    s = _series(out)
    assert _get(s, "safedl_redteam_slo_breached", check="max_drop_from_release", attack="square") == 1
    assert _get(s, "safedl_redteam_robust_accuracy_ci95_upper", attack="square") < RELEASE_SQUARE - 0.02


def test_an_slo_the_run_meets_exits_0_with_no_breach_series(served, probe_file, tmp_path):
    out = tmp_path / "slis.prom"
    res = _redteam(served, out, "--attacks", "replay", "--data", str(probe_file[0]),
                   "--slo", str(_slo(tmp_path, "min_robust_accuracy: {replay: 0.0}\nmax_backdoor_asr: 1.0\n")))
    assert res.exit_code == 0, res.output
    assert not [k for k in _series(out) if k[0] == "safedl_redteam_slo_breached"]


def test_the_query_budget_stops_the_run_and_counts_only_finished_chunks(served, probe_file, tmp_path):
    out = tmp_path / "slis.prom"
    res = _redteam(served, out, "--attacks", "square", "--n", "120", "--queries-per-image", "100",
                   "--max-queries", "3000", "--eps", "square=0.01", "--data", str(probe_file[0]),
                   "--slo", str(_slo(tmp_path, "max_drop_from_release: null\n")))
    assert res.exit_code == 0, res.output
    s = _series(out)
    assert _get(s, "safedl_redteam_stopped_early", attack="square") == 1
    assert _get(s, "safedl_redteam_queries", attack="square") <= 3000
    assert _get(s, "safedl_redteam_n", attack="square") in (0, 50, 100)


@pytest.mark.parametrize("args,message", [
    (["--attacks", "square,pgd"], "allowed: square, hopskipjump, replay"),
    (["--eps", "square=-1"], "--eps"),
    (["--slo", "BAD_SLO"], "max_drop_from_releas"),
    (["--data", "BAD_DATA"], "'y'"),
    (["--url", "http://10.1.2.3:8000"], "not loopback"),
    (["--attacks", "replay", "--data", "CLEAN_ONLY"], "neither"),
])
def test_bad_input_is_one_message_exit_2_and_writes_nothing(served, tmp_path, args, message, digits_splits):
    (tmp_path / "bad_slo.yml").write_text("max_drop_from_releas: 0.1\n")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 1, 8, 8), "uint8"))
    save_probe_file(tmp_path / "clean.npz", ProbeSet(x=digits_splits.test.x[:5], y=digits_splits.test.y[:5]))
    subst = {"BAD_SLO": str(tmp_path / "bad_slo.yml"), "BAD_DATA": str(tmp_path / "bad.npz"),
             "CLEAN_ONLY": str(tmp_path / "clean.npz")}
    out = tmp_path / "slis.prom"
    args = [subst.get(a, a) for a in args]
    if "--data" not in args:
        args += ["--data", str(tmp_path / "clean.npz")]
    res = _redteam(served, out, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_queries_to_detection_counts_images_until_the_detector_first_rejects(tiny_model, digits_splits, tmp_path):
    """Behind the feature-squeezing detector, square's probes get rejected: detected 1 and the images sent up to
    that request, at most all the attack sent; rejected final images count as robust."""
    bundle = load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "b", fpr=0.2))
    keys = KeyStore(tmp_path / "k.db", create=True)
    key = tmp_path / "full.key"
    key.write_text(keys.create(name="f", tier="full", rate_per_s=10_000, burst=10_000, daily_quota=10**7)[1])
    data = tmp_path / "p.npz"
    save_probe_file(data, ProbeSet(x=digits_splits.test.x[:20], y=digits_splits.test.y[:20]))
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(tmp_path / "a.db"), config=ServeConfig(max_images=64))
    out = tmp_path / "slis.prom"
    with Uvicorn(app) as srv:
        res = CliRunner().invoke(cli_app, ["redteam", "--url", srv.url, "--key-file", str(key), "--out", str(out),
                                           "--attacks", "square", "--eps", "square=0.3", "--queries-per-image", "30",
                                           "--data", str(data), "--slo", str(_slo(tmp_path, "{}"))])
    s = _series(out)
    _assert_exit_matches_breaches(res, s)
    assert _get(s, "safedl_redteam_detected", attack="square") == 1
    q, first = _get(s, "safedl_redteam_queries", attack="square"), _get(s, "safedl_redteam_queries_to_detection")
    assert 1 <= first <= q


def test_the_bundles_probe_layout_from_the_admin_endpoint_splits_by_kind():
    """``GET /v1/admin/probes`` answers deploy/probes.py's layout (one ``kind`` per row); the red team reads its
    clean, adversarial and triggered rows as their own pairs (read as one ``x`` they would mix attacks into the
    clean probes)."""
    from safedl.deploy.probes import probe_set, probes_npz
    from safedl.redteam.probes import parse_probes

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=g)
    y = torch.arange(12) % 10
    bundle_probes = probe_set(clean=(x[:5], y[:5]), adversarial=[(x[5:9], y[5:9])],
                              triggered=[(x[9:], y[9:], torch.full((3,), 7))], n=50)
    got = parse_probes(probes_npz(bundle_probes), source="GET /v1/admin/probes")
    assert torch.equal(got.x, x[:5]) and torch.equal(got.y, y[:5])
    assert torch.equal(got.x_adv, x[5:9]) and torch.equal(got.y_adv, y[5:9])
    assert torch.equal(got.x_trigger, x[9:]) and torch.equal(got.y_trigger, y[9:])
    assert got.trigger_target.tolist() == [7, 7, 7]
    only_clean = parse_probes(probes_npz(probe_set(clean=(x[:5], y[:5]))), source="GET /v1/admin/probes")
    assert only_clean.x_adv is None and only_clean.x_trigger is None


def test_the_red_team_log_handler_follows_stderr_after_a_caller_swapped_it(monkeypatch):
    """``ensure_logging`` under a swapped stderr (a test runner's buffer, closed after the command) must not leave a
    handler that writes to the closed buffer: later records go to the stderr of their own time."""
    import io
    import logging as _logging
    import sys

    from safedl.redteam.cli import ensure_logging

    pkg, root = _logging.getLogger("safedl"), _logging.getLogger()
    saved = (pkg.handlers[:], pkg.level, root.handlers[:], sys.stderr)
    errors: list = []
    monkeypatch.setattr(_logging.Handler, "handleError", lambda self, record: errors.append(record))
    try:
        pkg.handlers.clear()
        root.handlers.clear()
        sys.stderr = swapped = io.StringIO()
        ensure_logging()
        _logging.getLogger("safedl.redteam").info("during the command")
        swapped.close()
        sys.stderr = later = io.StringIO()
        _logging.getLogger("safedl.redteam").info("after the command")
    finally:
        pkg.handlers[:], root.handlers[:] = saved[0], saved[2]
        pkg.setLevel(saved[1])
        sys.stderr = saved[3]
    assert errors == [] and "after the command" in later.getvalue()
