"""MagNet's reformer (Meng & Chen 2017): a registered preprocessor classifying ae(x); it reconstructs clean digits
closely, moves adversarial inputs back toward them, is differentiable (adaptive attacks go through it, no BPDA),
survives a bundle's state round trip, and is evaluated adaptively by a run."""
from __future__ import annotations


import pytest
import torch

from safedl import registry
from safedl.deploy.state import fitted_state, restore_state
from safedl.utils.tensors import predict

from _runs import run_profile
from _profiles import tiny_profile


@pytest.fixture(scope="module")
def reformer(digits_splits):
    return registry.create("preprocessor", "magnet_reformer", epochs=10).fit(digits_splits.train.x, seed=0)


def test_reconstruction_is_close_on_clean_and_pulls_noise_back(reformer, digits_splits):
    x = digits_splits.test.x[:200]
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        clean_err = (reformer(x) - x).pow(2).mean()
        noisy_err = (reformer(noisy) - x).pow(2).mean()
    assert clean_err < (noisy - x).pow(2).mean() / 2  # clean inputs change far less than sigma-0.2 noise does
    assert noisy_err < (noisy - x).pow(2).mean()  # noisy inputs move toward the clean ones


def test_gradients_flow_through_the_autoencoder(reformer, digits_splits, tiny_model):
    x = digits_splits.test.x[:16].clone().requires_grad_(True)
    loss = tiny_model(reformer(x)).logsumexp(1).sum()
    (g,) = torch.autograd.grad(loss, x)
    assert reformer.differentiable and g.abs().sum() > 0


def test_state_round_trip_and_refusals(reformer, digits_splits):
    tensors, meta = fitted_state(reformer)
    fresh = registry.create("preprocessor", "magnet_reformer", epochs=10)
    with pytest.raises(RuntimeError, match="fit"):
        fresh(digits_splits.test.x[:2])
    restore_state(fresh, tensors, meta, torch.device("cpu"))
    x = digits_splits.test.x[:32]
    with torch.no_grad():
        assert torch.equal(fresh(x), reformer(x))
    with pytest.raises(ValueError, match="1-channel"):
        reformer(x.repeat(1, 3, 1, 1))


def test_run_evaluates_the_reformer_adaptively(tmp_path):
    prof = tiny_profile(
        name="tiny-reformer", training={"epochs": 8},
        attacks={"evasion": [{"name": "pgd", "params": {"eps": 0.1, "steps": 10}}]},
        defenses=[{"name": "magnet_reformer", "params": {"epochs": 10}, "against": ["pgd"]}],
        evaluation={"n_eval": 60, "n_examples": 0, "strong_adaptive": {"enabled": True, "steps": 10, "restarts": 1}},
        output={"dir": "runs", "figures": False, "html": False})
    _, r = run_profile(tmp_path, prof)
    (d,) = r["defenses"]
    m = d["metrics"]
    assert any("magnet_reformer: fitted on" in n for n in d["notes"])
    assert any("magnet_reformer: gradients" in n for n in d["notes"])  # adaptive through the autoencoder, no BPDA
    assert m["robust_accuracy"]["value"] <= m["robust_accuracy_nonadaptive"]["value"]
    assert m["clean_accuracy"]["value"] > 0.5
