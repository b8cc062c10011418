"""Black-box evasion attacks (Square, NES, HopSkipJump), the transfer attack and the ensemble."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safedl import registry
from safedl.attacks import query
from safedl.errors import ConfigError, QueryBudgetExceeded
from safedl.utils.tensors import predict


class CountingModel(nn.Module):
    """Counts every image the wrapped model is run on."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return self.model(x)


def _acc(model, x, y):
    return float((predict(model, x) == y).float().mean())


@pytest.fixture
def outputs_seen(monkeypatch):
    """The ``output`` mode of every QueryInterface created during the test."""
    seen = []
    original = query.QueryInterface.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.output)

    monkeypatch.setattr(query.QueryInterface, "__init__", spy)
    return seen


def test_query_interface_refuses_to_exceed_budget(tiny_model, eval_batch):
    x, _ = eval_batch
    qi = query.QueryInterface(tiny_model, n=4, output="labels", budget=2)
    qi(x[:4])
    qi(x[:2], torch.tensor([0, 1]))
    with pytest.raises(QueryBudgetExceeded):
        qi(x[:1], torch.tensor([0]))
    assert qi.counts.tolist() == [2, 2, 1, 1]
    assert qi(x[2:3], torch.tensor([2])).dtype == torch.long  # labels, not scores


@pytest.mark.parametrize("name,params", [
    ("square", {"eps": 0.1, "max_queries": 300}),
    ("square", {"eps": 1.0, "norm": "l2", "max_queries": 300}),
    ("nes", {"eps": 0.2, "max_queries": 420, "samples": 10, "sigma": 0.01}),
    ("hopskipjump", {"max_queries": 400, "init_evals": 20}),
])
def test_black_box_sees_model_only_through_the_budgeted_interface(name, params, tiny_model, eval_batch, outputs_seen):
    x, y = eval_batch
    x, y = x[:48], y[:48]
    counting = CountingModel(tiny_model)
    attack = registry.create("evasion", name, **params)
    x_adv = attack(counting, x, y)
    # every model evaluation was a counted query, and no sample went past its budget
    assert counting.rows == int(attack.queries_.sum())
    assert int(attack.queries_.max()) <= params["max_queries"]
    assert set(outputs_seen) == {"labels" if name == "hopskipjump" else "scores"}
    assert _acc(tiny_model, x_adv, y) < _acc(tiny_model, x, y) - 0.2


def test_square_linf_in_budget_and_more_queries_not_weaker(tiny_model, eval_batch):
    x, y = eval_batch
    few = registry.create("evasion", "square", eps=0.08, max_queries=50)
    many = registry.create("evasion", "square", eps=0.08, max_queries=400)
    a, b = few(tiny_model, x, y), many(tiny_model, x, y)
    assert float((b - x).abs().max()) <= 0.08 + 1e-6
    assert _acc(tiny_model, b, y) <= _acc(tiny_model, a, y)
    assert _acc(tiny_model, b, y) < _acc(tiny_model, x, y) - 0.2
    # broken samples stop querying; unbroken ones spend the whole budget
    broken = predict(tiny_model, b) != y
    assert float(many.queries_[broken].float().median()) < 100
    assert bool((many.queries_[~broken] == 400).all())


def test_square_l2_stays_in_ball(tiny_model, eval_batch):
    x, y = eval_batch
    x_adv = registry.create("evasion", "square", eps=0.8, norm="l2", max_queries=200)(tiny_model, x, y)
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 0.8 + 1e-4
    assert _acc(tiny_model, x_adv, y) < _acc(tiny_model, x, y) - 0.2


def test_hopskipjump_shrinks_perturbation_with_queries(tiny_model, eval_batch):
    x, y = eval_batch
    x, y = x[:48], y[:48]
    d = {}
    for q in (100, 1000):
        adv = registry.create("evasion", "hopskipjump", max_queries=q, init_evals=20)(tiny_model, x, y)
        broken = predict(tiny_model, adv) != y
        assert float(broken.float().mean()) >= 0.9  # every kept point is adversarial
        d[q] = float((adv - x).flatten(1).norm(dim=1)[broken].median())
    assert d[1000] < 0.8 * d[100]


def test_hopskipjump_eps_mode_is_bounded_and_stops_early(tiny_model, eval_batch):
    x, y = eval_batch
    x, y = x[:48], y[:48]
    free = registry.create("evasion", "hopskipjump", max_queries=600, init_evals=20)
    capped = registry.create("evasion", "hopskipjump", max_queries=600, init_evals=20, eps=3.0)
    assert capped.bounded and not free.bounded
    adv = capped(tiny_model, x, y)
    free(tiny_model, x, y)
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 3.0 + 1e-4
    assert int(capped.queries_.sum()) < int(free.queries_.sum())


def test_ensemble_not_weaker_than_any_member(tiny_model, eval_batch):
    x, y = eval_batch
    members = [{"name": "apgd_ce", "params": {"steps": 10}}, {"name": "fgsm", "params": {}},
               {"name": "square", "params": {"max_queries": 100}}]
    ens = registry.create("evasion", "ensemble", eps=0.06, attacks=members)
    adv = ens(tiny_model, x, y)
    assert float((adv - x).abs().max()) <= 0.06 + 1e-6
    rob = _acc(tiny_model, adv, y)
    for spec in members:
        alone = registry.create("evasion", spec["name"], eps=0.06, **spec["params"])(tiny_model, x, y)
        assert rob <= _acc(tiny_model, alone, y)
    clean, wrong = predict(tiny_model, x) == y, predict(tiny_model, adv) != y
    assert ens.attack_names_ == ["apgd_ce", "fgsm", "square"]
    assert torch.equal(ens.broken_by_ >= 0, clean & wrong)
    assert ens.queries_ is None and ens.access == "white-box"


def test_ensemble_access_and_config_checks():
    assert registry.get("evasion", "ensemble").access == "white-box"
    bb = registry.create("evasion", "ensemble", attacks=[{"name": "square", "params": {"max_queries": 10}}])
    assert bb.access == "scores"
    with pytest.raises(ConfigError, match="eps"):
        registry.create("evasion", "ensemble", eps=0.1, attacks=[{"name": "pgd", "params": {"eps": 0.2}}])
    with pytest.raises(ConfigError, match="budget"):
        registry.create("evasion", "ensemble", attacks=[{"name": "cw_l2"}])
    with pytest.raises(ConfigError, match="empty"):
        registry.create("evasion", "ensemble", attacks=[])


def test_transfer_query_mode_respects_budget_and_transfers(tiny_model, digits_splits, eval_batch):
    x, y = eval_batch
    counting = CountingModel(tiny_model)
    attack = registry.create("evasion", "transfer", surrogate="tiny_cnn", source="queries", max_queries=300,
                             epochs=30, eps=0.3, attack_params={"steps": 10})
    attack.fit(digits_splits.train, model=counting, device="cpu")
    assert attack.fit_queries_ <= 300 and counting.rows <= 300
    rows = counting.rows
    x_adv = attack(counting, x, y)
    assert counting.rows == rows  # crafting never touches the target
    assert int(attack.queries_.sum()) == 0
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert _acc(tiny_model, x_adv, y) < _acc(tiny_model, x, y) - 0.2


def test_transfer_config_checks():
    with pytest.raises(ConfigError, match="attack"):
        registry.create("evasion", "transfer", attack="square")  # not white-box
    with pytest.raises(ConfigError, match="budget"):
        registry.create("evasion", "transfer", attack="cw_l2")
    assert registry.get("evasion", "transfer").access == "transfer"
