"""threat_model.poison_stage: before_split poisons the data before splitting; no validation split as trusted set."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from safedl import registry
from safedl.cli import app
from safedl.errors import ProfileError
from safedl.evaluate.attack_poisoning import poison_stage_data
from safedl.profile import parse_profile

BEFORE = {"threat_model": {"poison_stage": "before_split"}, "baseline_only": True}


def test_before_split_defaults_to_no_trusted_set_and_keeps_after_split_as_it_was():
    p = parse_profile(BEFORE)
    assert p.trusted_clean_set.source == "none" and p.dataset.holdout_fraction == 0.2
    q = parse_profile({"baseline_only": True})
    assert q.threat_model.poison_stage == "after_split" and q.trusted_clean_set.source == "validation"


def test_validation_as_trusted_set_is_refused_before_split(tmp_path):
    bad = {**BEFORE, "trusted_clean_set": {"source": "validation"}}
    with pytest.raises(ProfileError, match=r"trusted_clean_set.source: 'validation' is not clean"):
        parse_profile(bad)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(bad))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "before_split" in res.output


def _ctx(splits, stage: str):
    return SimpleNamespace(splits=splits, profile=parse_profile({"threat_model": {"poison_stage": stage},
                                                                 "baseline_only": True}))


def test_before_split_poisons_training_and_validation_splits(digits_splits):
    atk = registry.create("backdoor", "static_patch", target_class=3, poison_fraction=0.1, seed=0)
    notes: list[str] = []
    p_train, p_val = poison_stage_data(_ctx(digits_splits, "before_split"), atk, torch.Generator().manual_seed(0),
                                       notes)
    assert len(p_train) == len(digits_splits.train) and len(p_val) == len(digits_splits.val)
    assert torch.equal(p_train.original_x, digits_splits.train.x) and torch.equal(p_val.original_y,
                                                                                 digits_splits.val.y)
    assert p_train.n_poison > 0 and p_val.n_poison > 0
    total = len(p_train) + len(p_val)
    assert abs(p_train.n_poison + p_val.n_poison - round(0.1 * total)) <= 1
    assert "before the split" in notes[0]
    only, none = poison_stage_data(_ctx(digits_splits, "after_split"), atk, torch.Generator().manual_seed(0), [])
    assert none is None and len(only) == len(digits_splits.train)
