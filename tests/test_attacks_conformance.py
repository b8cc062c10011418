"""Conformance suite run over every registered evasion attack (scikit-learn estimator-checks style), on 1-channel
and 3-channel inputs (the ``channels_case`` fixture: a tiny model for each).

A new attack is checked automatically once registered. Attacks may set ``conformance_params`` (small settings for
a quick run) and ``bounded = False`` when they minimise the perturbation instead of keeping an eps budget. Threats
that are not an L-p ball are checked by their own budget: ``norm = "l0"`` (at most ``k`` pixels change) and
``norm = "patch"`` (nothing outside the ``support_`` mask of the last call changes, whose area is at most
``patch_fraction`` of the image).
"""
from __future__ import annotations

import copy

import pytest
import torch

from _threat import assert_within_threat
from safedl import registry
from safedl.errors import ConfigError
from safedl.utils.tensors import predict

ATTACKS = registry.names("evasion")


def _make(name: str, **overrides):
    cls = registry.get("evasion", name)
    params = dict(getattr(cls, "conformance_params", {}))
    params.update(overrides)
    return registry.create("evasion", name, **params)


def _run(attack, model, x, y):
    return attack(model, x, y)


@pytest.mark.parametrize("name", ATTACKS)
def test_output_contract_and_budget(name, channels_case):
    _, tiny_model, x, y, _ = channels_case
    attack = _make(name)
    x_adv = _run(attack, tiny_model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert_within_threat(attack, x, x_adv, tol=1e-5 if attack.norm == "linf" else 1e-4)
    budget = getattr(attack, "max_queries", None)
    if attack.queries_ is not None and budget is not None:
        assert int(attack.queries_.max()) <= budget


@pytest.mark.parametrize("name", ATTACKS)
def test_lowers_accuracy(name, channels_case):
    _, tiny_model, x, y, _ = channels_case
    clean = predict(tiny_model, x) == y
    adv = predict(tiny_model, _run(_make(name), tiny_model, x, y)) == y
    # robust accuracy (clean-correct and still correct) can never exceed clean accuracy, and a real attack
    # must break a good share of the samples at these budgets
    assert float((clean & adv).float().mean()) <= float(clean.float().mean())
    assert float((clean & adv).float().mean()) < float(clean.float().mean()) - 0.2


@pytest.mark.parametrize("name", ATTACKS)
def test_deterministic_under_seed(name, channels_case):
    _, tiny_model, x, y, _ = channels_case
    a = _run(_make(name), tiny_model, x[:32], y[:32])
    b = _run(_make(name), tiny_model, x[:32], y[:32])
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ATTACKS)
def test_model_state_untouched(name, channels_case):
    _, tiny_model, x, y, _ = channels_case
    model = copy.deepcopy(tiny_model)
    model.train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    _run(_make(name), model, x[:16], y[:16])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in list(model.parameters())[1:])


@pytest.mark.parametrize("name", ATTACKS)
def test_invalid_params_raise_config_error(name):
    params = {p.name for p in registry.params("evasion", name)}
    bad = [("eps", -0.1), ("norm", "l3"), ("steps", 0), ("max_queries", 0)]
    checked = 0
    for key, value in bad:
        if key in params:
            with pytest.raises(ConfigError, match=key):
                _make(name, **{key: value})
            checked += 1
    with pytest.raises(ConfigError, match="no parameter"):
        _make(name, not_a_parameter=1)
