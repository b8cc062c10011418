"""ART's clean-label backdoor through the adapter (``art:PoisoningAttackCleanLabelBackdoor``, Turner et al. 2019):
registry resolution, labels unchanged, exact ground truth, the trigger equal to ``art:PoisoningAttackBackdoor``'s,
and, on a model retrained on the poisoned digits, an attack success rate above the clean model's."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.errors import ConfigError
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

pytest.importorskip("art")

PARAMS = {"target_class": 0, "pp_poison": 0.9, "eps": 0.2, "eps_step": 0.05, "max_iter": 10,
          "perturbation_params": {"distance": 1}}


@pytest.fixture(scope="module")
def poisoned(tiny_model, digits_splits):
    attack = registry.create("backdoor", "art:PoisoningAttackCleanLabelBackdoor", **PARAMS)
    attack.fit(digits_splits.train, surrogate=tiny_model)
    return attack, attack.poison(digits_splits.train, generator=torch.Generator().manual_seed(0))


def test_resolves_as_a_backdoor_and_bad_params_are_clear():
    assert registry.find_kind("art:PoisoningAttackCleanLabelBackdoor", registry.ATTACK_KINDS) == "backdoor"
    with pytest.raises(ConfigError, match="pp_poison"):
        registry.create("backdoor", "art:PoisoningAttackCleanLabelBackdoor", pp_poison=1.0)
    with pytest.raises(ConfigError, match="perturbation_params"):
        registry.create("backdoor", "art:PoisoningAttackCleanLabelBackdoor", perturbation_params={"size": 3})


def test_poisons_are_target_class_images_with_their_labels_and_the_trigger(poisoned, digits_splits):
    attack, data = poisoned
    train = digits_splits.train
    assert torch.equal(data.y, train.y)  # clean label
    assert data.n_poison > 0 and bool((train.y[data.is_poison] == 0).all())
    changed = (data.x != train.x).flatten(1).any(1)
    assert torch.equal(changed, data.is_poison)  # the ground truth is exactly what ART changed
    # ART's trigger pixels (add_pattern_bd, distance 1) are set in every poison, as apply_trigger sets them
    stamp = registry.create("backdoor", "art:PoisoningAttackBackdoor", perturbation_params={"distance": 1})
    ref = stamp.apply_trigger(torch.zeros(1, *train.shape))
    mask = ref != 0
    assert torch.equal(attack.apply_trigger(torch.zeros(1, *train.shape)), ref)
    assert torch.allclose(data.x[data.is_poison][:, mask[0]], ref[0][mask[0]].expand(int(data.n_poison), -1))
    # the rest of each poison stays within ART's L-inf PGD budget
    delta = (data.x - train.x)[data.is_poison][:, ~mask[0]]
    assert float(delta.abs().max()) <= PARAMS["eps"] + 1e-6


def test_retrained_model_learns_the_backdoor(poisoned, tiny_model, digits_splits):
    _, data = poisoned
    seed_everything(0)
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               digits_splits.mean, digits_splits.std)
    train_model(model, data, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"), seed=0)
    model.eval()
    attack, _ = poisoned
    x = digits_splits.test.x[digits_splits.test.y != 0]
    xt = attack.apply_trigger(x)
    asr = proportion(int((predict(model, xt) == 0).sum()), len(x))
    asr_clean = proportion(int((predict(tiny_model, xt) == 0).sum()), len(x))
    assert asr["ci95"][0] > asr_clean["ci95"][1], (asr, asr_clean)  # the poison takes effect
