"""Adversarial patch (Brown et al. 2017) and local gradient smoothing (Naseer et al. 2019): the patch threat's
support, universality against a random patch, targeting; LGS against a slow reference; adaptive (BPDA) patch
training through LGS at least as strong as the transferred patch; the defense stage with a patch attack."""
from __future__ import annotations

import json

import pytest
import torch

from safedl import registry
from safedl.attacks.evasion.adversarial_patch import paste, patch_side, random_offsets
from safedl.defenses.adaptive import defended_model
from safedl.errors import ConfigError
from safedl.evaluate.context import RunContext
from safedl.evaluate.defend_evasion import evaluate_evasion_defense
from safedl.models import TrainRecipe
from safedl.profile import DefenseSpec, EvaluationSpec, Profile
from safedl.utils.tensors import predict

from _stages import tiny_run_context, transferred_outcome


@pytest.fixture(scope="module")
def universal(tiny_model, digits_splits):
    return registry.create("evasion", "adversarial_patch", patch_fraction=0.15, steps=150).fit(
        digits_splits.train, model=tiny_model)


def test_patch_side_never_exceeds_the_area():
    for frac, (h, w), side in ((0.1, (8, 8), 2), (0.15, (8, 8), 3), (0.05, (32, 32), 7), (1.0, (8, 8), 8)):
        assert patch_side(frac, h, w) == side and side * side <= frac * h * w + 1e-9


def test_paste_changes_only_the_support(eval_batch):
    x, _ = eval_batch
    gen = torch.Generator().manual_seed(0)
    rows, cols = random_offsets(len(x), 3, 8, 8, gen, x.device)
    patch = torch.rand(1, 3, 3, generator=gen)
    out, support = paste(x, patch, rows, cols)
    for i in (0, 5, 77):  # slow reference: the patch at (row, col), the image elsewhere
        ref = x[i].clone()
        r, c = int(rows[i]), int(cols[i])
        ref[:, r:r + 3, c:c + 3] = patch
        assert torch.equal(out[i], ref)
    assert int(support[0].sum()) == 9 and torch.equal(out[~support.expand_as(x)], x[~support.expand_as(x)])


def test_universal_patch_beats_a_random_patch_on_unseen_images(universal, tiny_model, digits_splits):
    x, y = digits_splits.test.x, digits_splits.test.y
    x_adv = universal(tiny_model, x, y)
    support = universal.support_.expand_as(x)
    assert torch.equal(x_adv[~support], x[~support])  # the threat: nothing outside the patch changes
    assert float(universal.support_[:, 0].flatten(1).float().mean(1).max()) <= 0.15
    gen = torch.Generator().manual_seed(1)
    rows, cols = random_offsets(len(x), 3, 8, 8, gen, x.device)
    x_rand = paste(x, torch.rand(1, 3, 3, generator=gen), rows, cols)[0]
    acc_adv = float((predict(tiny_model, x_adv) == y).float().mean())
    acc_rand = float((predict(tiny_model, x_rand) == y).float().mean())
    # a 3x3 patch at any of 36 places on 8x8 digits is a weak threat (measured 0.644 vs 0.789 on seed 0); an
    # untrained patch is a random one, so a clear gap means the EOT training works
    assert acc_adv < acc_rand - 0.1, (acc_adv, acc_rand)


def test_targeted_patch_sends_images_to_the_target(tiny_model, digits_splits):
    x, y = digits_splits.test.x, digits_splits.test.y
    att = registry.create("evasion", "adversarial_patch", patch_fraction=0.15, steps=150, target_class=3)
    x_adv = att.fit(digits_splits.train, model=tiny_model)(tiny_model, x, y)
    plain = registry.create("evasion", "adversarial_patch", patch_fraction=0.15, steps=150).fit(
        digits_splits.train, model=tiny_model)(tiny_model, x, y)
    to_3 = float((predict(tiny_model, x_adv[y != 3]) == 3).float().mean())
    assert to_3 > 2 * float((predict(tiny_model, plain[y != 3]) == 3).float().mean()) and to_3 > 0.05


def test_patch_threat_is_declared_and_validated():
    att = registry.create("evasion", "adversarial_patch", patch_fraction=0.05)
    assert att.norm == "patch" and att.eps == 0.0 and att.threat()["area_fraction"] == 0.05
    for key, value in (("patch_fraction", 0.0), ("patch_fraction", 1.5), ("steps", 0), ("target_class", -1)):
        with pytest.raises(ConfigError, match=key):
            registry.create("evasion", "adversarial_patch", **{key: value})


def _lgs_reference(x: torch.Tensor, window: int, stride: int, threshold: float, smoothing: float) -> torch.Tensor:
    """Loop-over-windows reference of Naseer et al.'s procedure for one image."""
    g = x.mean(0)
    h, w = g.shape
    mag = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            dx = g[i, j + 1] - g[i, j] if j + 1 < w else 0.0
            dy = g[i + 1, j] - g[i, j] if i + 1 < h else 0.0
            mag[i, j] = (dx ** 2 + dy ** 2) ** 0.5
    mag = mag / max(float(mag.max()), 1e-12)
    keep = torch.zeros(h, w, dtype=torch.bool)
    for i in range(0, h - window + 1, stride):
        for j in range(0, w - window + 1, stride):
            if float(mag[i:i + window, j:j + window].mean()) > threshold:
                keep[i:i + window, j:j + window] = True
    return x * (1 - smoothing * mag * keep).clamp(0, 1)


@pytest.mark.parametrize("window,stride,threshold", [(3, 1, 0.1), (4, 2, 0.2), (5, 3, 0.05)])
def test_lgs_matches_the_reference(window, stride, threshold):
    gen = torch.Generator().manual_seed(window)
    x = torch.full((2, 3, 16, 16), 0.5)
    x[:, :, 4:9, 6:11] = torch.rand(2, 3, 5, 5, generator=gen)  # a noisy "patch" on a flat image
    lgs = registry.create("preprocessor", "local_gradient_smoothing", window=window, stride=stride,
                          threshold=threshold)
    out = lgs(x)
    for i in range(2):
        assert torch.allclose(out[i], _lgs_reference(x[i], window, stride, threshold, 2.3), atol=1e-6)
    assert torch.equal(out[:, :, :2, :], x[:, :, :2, :])  # flat regions are left alone
    assert float(out[:, :, 4:9, 6:11].sum()) < float(x[:, :, 4:9, 6:11].sum())  # the patch is suppressed


def test_adaptive_patch_through_lgs_is_at_least_as_strong(universal, tiny_model, digits_splits):
    x, y = digits_splits.test.x[:200], digits_splits.test.y[:200]
    lgs = registry.create("preprocessor", "local_gradient_smoothing")
    deployed = defended_model([lgs], tiny_model, adaptive=False)
    transferred = universal(tiny_model, x, y)
    adaptive = registry.create("evasion", "adversarial_patch", patch_fraction=0.15, steps=150)(
        defended_model([lgs], tiny_model, adaptive=True), x, y)
    acc_na = float((predict(deployed, transferred) == y).float().mean())
    acc_ad = float((predict(deployed, adaptive) == y).float().mean())
    assert acc_ad <= acc_na + 0.02, (acc_ad, acc_na)


def test_stage_runs_the_patch_attack_adaptively_on_lgs(tmp_path, digits_splits, tiny_model, eval_batch):
    ctx = tiny_run_context(tmp_path, digits_splits, tiny_model)
    outcome = transferred_outcome(tiny_model, eval_batch, name="adversarial_patch",
                                  params={"patch_fraction": 0.15, "steps": 60})
    comp = registry.create("preprocessor", "local_gradient_smoothing")
    entry = evaluate_evasion_defense(ctx, DefenseSpec(name="local_gradient_smoothing"), [comp], outcome)
    json.dumps(entry)
    m = entry["metrics"]
    assert m["robust_accuracy"]["value"] <= m["robust_accuracy_nonadaptive"]["value"]
    assert any("local_gradient_smoothing: BPDA" in s for s in entry["notes"])


def test_attack_stage_fits_the_universal_patch_and_declares_the_threat(tmp_path, digits_splits, tiny_model):
    from safedl.evaluate.attack_evasion import simulate_evasion
    from safedl.profile import AttackSpec

    profile = Profile(training=TrainRecipe(epochs=2, batch_size=64, lr=3e-3, augment="none"),
                      evaluation=EvaluationSpec(n_eval=64, batch_size=64))
    ctx = RunContext(profile=profile, splits=digits_splits, device=torch.device("cpu"), run_dir=tmp_path,
                     baseline=tiny_model, build_fresh=lambda: None)
    spec = AttackSpec(name="adversarial_patch", params={"patch_fraction": 0.15, "steps": 60})
    attack = registry.create("evasion", "adversarial_patch", **spec.params)
    entry = simulate_evasion(ctx, spec, attack).entry
    assert attack.patch_ is not None  # fitted on the training split before the evaluation images were attacked
    assert entry["threat"]["kind"] == "patch" and entry["threat"]["area_fraction"] == 0.15
    assert any("threat model: a square patch" in s for s in entry["notes"])
    assert entry["metrics"]["perturbation"]["l0_max"]["value"] <= 9
