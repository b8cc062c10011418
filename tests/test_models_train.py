"""The shared training loop: seeded determinism, early stopping, shift augmentation (fast vs slow reference),
sample weights."""
from __future__ import annotations

import pytest
import torch

from safedl.errors import ConfigError
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.models.train import random_shift


def _fresh(splits, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8, width=4, hidden=16)
    return with_normalization(net, splits.mean, splits.std)


@pytest.fixture(scope="module")
def small_train(digits_splits):
    return digits_splits.train.subset(torch.arange(320))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_under_a_seed(digits_splits, small_train):
    recipe = TrainRecipe(epochs=2, batch_size=32, augment="shift", shift_pixels=1)
    a, b, c = _fresh(digits_splits), _fresh(digits_splits), _fresh(digits_splits)
    train_model(a, small_train, recipe=recipe, seed=3)
    train_model(b, small_train, recipe=recipe, seed=3)
    train_model(c, small_train, recipe=recipe, seed=4)  # another seed: another shuffle and other shifts
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_training_learns(digits_splits):
    model = _fresh(digits_splits)
    report = train_model(model, digits_splits.train, recipe=TrainRecipe(epochs=3, batch_size=32, lr=1e-2,
                         augment="none"), seed=0, val=digits_splits.val)
    assert report.epochs_run == 3 and len(report.history) == 3
    assert report.history[-1]["loss"] < 0.5 * report.history[0]["loss"]
    assert report.best_val_accuracy > 0.85 and not model.training  # 180 val digits; chance is 0.1


def test_early_stopping_restores_the_best_epoch(digits_splits, small_train):
    """A noisy constant high learning rate makes validation accuracy go up and down; the model that comes back
    must be exactly the snapshot of the first epoch with the best validation accuracy."""
    model = _fresh(digits_splits)
    snapshots = []
    recipe = TrainRecipe(epochs=8, batch_size=16, optimizer="sgd", lr=0.3, momentum=0.9, schedule="constant",
                         augment="none", early_stopping_patience=2)
    report = train_model(model, small_train, recipe=recipe, seed=1, val=digits_splits.val,
                         on_epoch_end=lambda e, m: snapshots.append({k: v.clone() for k, v in m.state_dict().items()}))
    accs = [h["val_accuracy"] for h in report.history]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    assert report.best_val_accuracy == pytest.approx(accs[best])
    assert all(torch.equal(model.state_dict()[k], snapshots[best][k]) for k in snapshots[best])
    # Stopping happened exactly `patience` epochs after the best one (or the run used every epoch).
    assert report.epochs_run == min(recipe.epochs, best + 1 + recipe.early_stopping_patience)
    # This seed/recipe peaks early, so the test really checks a restore, not just "keep the last weights".
    assert best < len(accs) - 1
    assert not all(torch.equal(model.state_dict()[k], snapshots[-1][k]) for k in snapshots[-1])


def _shift_reference(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Slow per-image reference: out[i, :, r, c] = x[i, :, r - dr, c - dc], zero outside the image."""
    out = torch.zeros_like(x)
    _, _, h, w = x.shape
    for i, (dr, dc) in enumerate(shifts.tolist()):
        for r in range(h):
            for c in range(w):
                if 0 <= r - dr < h and 0 <= c - dc < w:
                    out[i, :, r, c] = x[i, :, r - dr, c - dc]
    return out


@pytest.mark.parametrize("max_shift,shape", [(1, (6, 2, 5, 7)), (2, (9, 1, 8, 8)), (3, (4, 3, 4, 6))])
def test_random_shift_matches_slow_reference(max_shift, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    fast = random_shift(x, max_shift, g)
    g.set_state(state)  # random_shift draws its N x 2 offsets first
    shifts = torch.randint(-max_shift, max_shift + 1, (shape[0], 2), generator=g)
    assert fast.shape == x.shape
    assert torch.equal(fast, _shift_reference(x, shifts))
    assert shifts.abs().max() <= max_shift and (shifts != 0).any()


def test_random_shift_zero_is_identity():
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(random_shift(x, 0, torch.Generator().manual_seed(0)), x)


def test_zero_sample_weight_makes_those_samples_irrelevant(digits_splits, small_train):
    """Samples with weight 0 contribute exactly 0 to every loss and gradient, so relabelling them cannot change
    the trained weights at all (same seed, same batches)."""
    recipe = TrainRecipe(epochs=2, batch_size=32, augment="shift", shift_pixels=1)
    w = torch.ones(len(small_train))
    w[::3] = 0.0
    relabelled = small_train.subset(torch.arange(len(small_train)))
    relabelled.y[::3] = (relabelled.y[::3] + 5) % 10
    a, b, c = _fresh(digits_splits), _fresh(digits_splits), _fresh(digits_splits)
    train_model(a, small_train, recipe=recipe, seed=2, sample_weight=w)
    train_model(b, relabelled, recipe=recipe, seed=2, sample_weight=w)
    train_model(c, relabelled, recipe=recipe, seed=2)  # without weights the flipped labels do matter
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_unit_sample_weights_equal_plain_training(digits_splits, small_train):
    recipe = TrainRecipe(epochs=1, batch_size=32, augment="none")
    a, b = _fresh(digits_splits), _fresh(digits_splits)
    train_model(a, small_train, recipe=recipe, seed=2, sample_weight=torch.ones(len(small_train)))
    train_model(b, small_train, recipe=recipe, seed=2)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-5), k


@pytest.mark.parametrize("weights", [torch.ones(5), -torch.ones(320), torch.full((320,), float("nan"))])
def test_bad_sample_weight_is_rejected(digits_splits, small_train, weights):
    with pytest.raises(ConfigError, match="sample_weight"):
        train_model(_fresh(digits_splits), small_train, recipe=TrainRecipe(epochs=1), seed=0, sample_weight=weights)


def test_recipe_rejects_unknown_and_out_of_range_fields():
    with pytest.raises(ValueError):
        TrainRecipe(epochs=0)
    with pytest.raises(ValueError):
        TrainRecipe(learning_rate=0.1)
