"""The strong adaptive suite split into shards (separate stages) gives exactly the unsplit suite's result: the same
success set, the same examples, the same defense entry; defenses whose suite depends on training, fitting or random
draws are not split."""
from __future__ import annotations

import pytest
import torch

from _profiles import tiny_profile
from safedl import registry
from safedl.defenses.adaptive import strong_adaptive_suite
from safedl.errors import ConfigError
from safedl.evaluate.base import AttackOutcome, EvasionState
from safedl.evaluate.context import RunContext
from safedl.evaluate.suite_shards import shard_plans, shardable, run_shard, suite_results
from safedl.profile import AttackSpec, parse_profile

EPS = 0.2


def shard_profile(**over):
    return parse_profile(tiny_profile(
        attacks={"evasion": [{"name": "pgd", "params": {"eps": EPS, "norm": "linf", "steps": 5}}]},
        defenses=[{"name": "feature_squeezing", "params": {"bit_depth": 1}, "against": ["pgd"]}],
        evaluation={"n_eval": 90, "batch_size": 30, "strong_adaptive": {"steps": 10, "restarts": 2}},
        output={"figures": False, "html": False}, **over))


def test_batches_are_dealt_round_robin_to_non_empty_shards():
    plans = shard_plans(n=100, batch_size=30, shards=3)
    assert [p.starts for p in plans] == [(0, 90), (30,), (60,)]
    assert [p.starts for p in shard_plans(n=60, batch_size=30, shards=5)] == [(0,), (30,)]  # never empty
    assert [p.starts for p in shard_plans(n=60, batch_size=30, shards=1)] == [(0, 30)]
    with pytest.raises(ConfigError, match="shards = 0"):
        shard_plans(n=60, batch_size=30, shards=0)


def test_only_fixed_deterministic_preprocessor_suites_are_split():
    prof = shard_profile()
    pgd = AttackSpec(name="pgd", params={"eps": EPS, "norm": "linf"})
    fs = registry.create("preprocessor", "feature_squeezing", bit_depth=1)
    assert shardable(prof, [fs], pgd, "evasion")
    assert not shardable(prof, [registry.create("preprocessor", "gaussian_augmentation")], pgd, "evasion")
    assert not shardable(prof, [fs, registry.create("trainer", "adversarial_training")], pgd, "evasion")
    assert not shardable(prof, [fs, registry.create("postprocessor", "gaussian_noise")], pgd, "evasion")  # stateful
    assert not shardable(prof, [fs], AttackSpec(name="deepfool"), "evasion")  # no eps budget: no suite
    gray = prof.model_copy(update={"threat_model": prof.threat_model.model_copy(update={"model_access": "gray-box"})})
    assert not shardable(gray, [fs], pgd, "evasion")


def test_shards_reproduce_every_batch_of_the_unsplit_suite(tiny_model, digits_splits, tmp_path):
    prof = shard_profile()
    x, y = digits_splits.test.x[:90], digits_splits.test.y[:90]
    st = EvasionState(x=x, y=y, x_adv=x.clone(), target=None, spec={"name": "pgd", "params": {"eps": EPS}})
    ctx = RunContext(profile=prof, splits=digits_splits, device=torch.device("cpu"), run_dir=tmp_path,
                     baseline=tiny_model, build_fresh=lambda: None)
    fs = registry.create("preprocessor", "feature_squeezing", bit_depth=1)
    outcome = AttackOutcome(entry={"id": "pgd"}, state=st.to_state())
    states = [run_shard(ctx, [fs], outcome, p) for p in shard_plans(n=90, batch_size=30, shards=2)]
    got = suite_results(states, torch.device("cpu"))
    assert sorted(got) == [0, 30, 60]
    broken = 0
    for start in (0, 30, 60):
        ref = strong_adaptive_suite(tiny_model, x[start:start + 30], y[start:start + 30], eps=EPS, seed=0,
                                    preprocessors=[fs], steps=10, restarts=2)
        assert torch.equal(got[start].broken_by, ref.broken_by)
        assert torch.equal(got[start].x_adv, ref.x_adv)
        assert got[start].members == ref.members and got[start].budget == ref.budget
        broken += int((ref.broken_by >= 0).sum())
    assert broken > 0  # the suite bites, so equal sets say something
