"""Differential tests against the Adversarial Robustness Toolbox (dev extra): same model, same images."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from safedl import registry
from safedl.utils.tensors import predict

art = pytest.importorskip("art")
from art.attacks.evasion import CarliniL2Method, DeepFool, FastGradientMethod, ProjectedGradientDescent  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

logging.getLogger("art").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def clf(tiny_model):
    return PyTorchClassifier(model=tiny_model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                             clip_values=(0.0, 1.0))


def test_fgsm_equals_art(tiny_model, eval_batch, clf):
    x, y = eval_batch
    for norm, art_norm, eps in (("linf", np.inf, 0.05), ("l2", 2, 0.5)):
        theirs = FastGradientMethod(clf, norm=art_norm, eps=eps, batch_size=len(x)).generate(x.numpy(), y.numpy())
        ours = registry.create("evasion", "fgsm", eps=eps, norm=norm)(tiny_model, x, y)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)


def test_pgd_without_random_start_equals_art(tiny_model, eval_batch, clf):
    # ART's mean-reduced loss only rescales the gradient, whose sign is all an L-inf step uses
    x, y = eval_batch
    theirs = ProjectedGradientDescent(clf, norm=np.inf, eps=0.1, eps_step=0.01, max_iter=20, num_random_init=0,
                                      batch_size=len(x), verbose=False).generate(x.numpy(), y.numpy())
    ours = registry.create("evasion", "pgd", eps=0.1, alpha=0.01, steps=20, random_start=False)(tiny_model, x, y)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)


def test_l2_pgd_without_random_start_equals_art(tiny_model, eval_batch, clf):
    x, y = eval_batch
    theirs = ProjectedGradientDescent(clf, norm=2, eps=0.5, eps_step=0.1, max_iter=10, num_random_init=0,
                                      batch_size=len(x), verbose=False).generate(x.numpy(), y.numpy())
    ours = registry.create("evasion", "pgd", norm="l2", eps=0.5, alpha=0.1, steps=10, random_start=False)(
        tiny_model, x, y)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)


def _success_and_l2(model, x, y, x_adv):
    x_adv = torch.as_tensor(x_adv)
    ok = (predict(model, x) == y) & (predict(model, x_adv) != y)
    return ok, (x_adv - x).flatten(1).norm(dim=1)


def test_deepfool_matches_art(tiny_model, eval_batch, clf):
    x, y = eval_batch
    x, y = x[:64], y[:64]
    theirs = DeepFool(clf, max_iter=50, epsilon=0.02, nb_grads=10, batch_size=64, verbose=False).generate(x.numpy())
    ours = registry.create("evasion", "deepfool", norm="l2", steps=50, overshoot=0.02)(tiny_model, x, y)
    ok_a, l2_a = _success_and_l2(tiny_model, x, y, theirs)
    ok_o, l2_o = _success_and_l2(tiny_model, x, y, ours)
    assert int(ok_o.sum()) >= int(ok_a.sum())
    both = ok_a & ok_o
    assert float(l2_o[both].median()) <= 1.10 * float(l2_a[both].median())


def test_cw_l2_matches_art(tiny_model, eval_batch, clf):
    x, y = eval_batch
    x, y = x[:32], y[:32]
    # same binary-search and iteration budget on both sides (ART adds a learning-rate line search per step)
    theirs = CarliniL2Method(clf, confidence=0.0, learning_rate=0.01, binary_search_steps=5, max_iter=20,
                             initial_const=0.01, batch_size=32, verbose=False).generate(x.numpy(), y.numpy())
    ours = registry.create("evasion", "cw_l2", binary_search_steps=5, steps=20, initial_const=0.01)(tiny_model, x, y)
    ok_a, l2_a = _success_and_l2(tiny_model, x, y, theirs)
    ok_o, l2_o = _success_and_l2(tiny_model, x, y, ours)
    assert int(ok_o.sum()) >= int(ok_a.sum())
    both = ok_a & ok_o
    assert float(l2_o[both].median()) <= 1.10 * float(l2_a[both].median())
