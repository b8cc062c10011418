"""backdoor:hidden_trigger (Saha et al. 2020): correctly labelled poisons within eps of their bases, no trigger in
the training data, and an attack success on triggered source images above the clean model's on a tiny setup."""
from __future__ import annotations

import torch

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import AttackSpec, Profile
from safedl.run.handlers import get_attack_handler

# conftest's tiny_model recipe; fine-tuning as in the paper's transfer-learning setting
RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none", mode="finetune",
                     finetune={"epochs": 10, "lr": 1e-3})
PARAMS = {"target_class": 0, "source_class": 1, "n_poisons": 80, "eps": 0.2, "patch_size": 3, "steps": 100}


def _contains_patch(x: torch.Tensor, pattern: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Bool N: some p x p window of the image equals the patch (within ``tol`` per pixel)."""
    p = pattern.shape[-1]
    win = x.unfold(2, p, 1).unfold(3, p, 1)  # N x C x H' x W' x p x p
    diff = (win - pattern.view(1, pattern.shape[0], 1, 1, p, p)).abs().amax(dim=(1, 4, 5))
    return (diff <= tol).flatten(1).any(1)


def test_hidden_trigger_poisons_are_clean_label_in_the_ball_and_trigger_free(digits_splits, tiny_model, tmp_path):
    ctx = RunContext(profile=Profile(seed=0, training=RECIPE, threat_model={"model_access": "white-box"}),
                     splits=digits_splits, device=torch.device("cpu"), run_dir=tmp_path, baseline=tiny_model,
                     build_fresh=lambda: with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10,
                                                                        image_size=8),
                                                            digits_splits.mean, digits_splits.std))
    attack = registry.create("backdoor", "hidden_trigger", **PARAMS)
    out = get_attack_handler("backdoor")(ctx, AttackSpec(name="hidden_trigger", params=PARAMS), attack)
    p = out.state["poisoned"]
    pattern, _ = attack.trigger_pattern(p.shape)
    # labels untouched, poisons are target-class images within eps (L-inf) of their base images
    assert torch.equal(p.y, p.original_y) and 0 < p.n_poison <= 80
    assert bool((p.y[p.is_poison] == 0).all())
    assert float((p.x - p.original_x).abs().max()) <= PARAMS["eps"] + 1e-6
    # the trigger never appears in the training data, but it is on the triggered test inputs
    assert not bool(_contains_patch(p.x, pattern).any())
    victims = out.state["test_triggered_x"]
    assert bool(_contains_patch(victims, pattern).all())
    assert bool((out.state["test_triggered_y"] == 1).all())
    # the poisons moved towards the triggered sources in the surrogate's feature space
    d = p.info["feature_distance_mean"]
    assert d["after"] < d["before"]
    m = out.entry["metrics"]
    asr, base = m["attack_success_rate"], m["baseline"]["attack_success_rate"]
    assert asr["n"] == int((digits_splits.test.y == 1).sum())
    # measured 0.333 (12/36) vs 0.000 (0/36) for the clean model on this seed: intervals disjoint
    assert asr["ci95"][0] > base["ci95"][1], (asr, base)
