"""The content-addressed model cache: the same data, recipe and seed reuse a trained model (no training), anything
changed trains again, a whole run reuses its models, and ``safedl cache list | clear`` manage it."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import safedl.models.cache as cache_mod
from safedl.cli import app
from safedl.models import TrainRecipe, build_model
from safedl.models.cache import ModelCache, cached_train
from safedl.utils.tensors import seed_everything
from _profiles import tiny_profile

RECIPE = TrainRecipe(epochs=2, batch_size=64, lr=3e-3, augment="none")


@pytest.fixture
def count_training(monkeypatch):
    """How many times the real training loop ran."""
    calls = []
    real = cache_mod.train_model

    def counting(*a, **kw):
        calls.append(kw.get("description"))
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "train_model", counting)
    return calls


def _fresh():
    seed_everything(0)
    return build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8)


def _train(cache, data, recipe=RECIPE, seed=0):
    model = _fresh()
    report, reused = cached_train(model, data.train, recipe=recipe, seed=seed, val=data.val, cache=cache)
    return model, report, reused


def test_second_training_reuses_the_model(tmp_path, digits_splits, count_training):
    cache = ModelCache(tmp_path / "c")
    m1, r1, reused1 = _train(cache, digits_splits)
    rng_after_training = torch.get_rng_state()
    m2, r2, reused2 = _train(cache, digits_splits)
    assert (reused1, reused2) == (False, True)
    assert len(count_training) == 1  # the second call did not train
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert r2.history == r1.history and r2.epochs_run == r1.epochs_run
    assert torch.equal(torch.get_rng_state(), rng_after_training)  # what runs next draws the same numbers
    assert cache.hits == ["training"]


@pytest.mark.parametrize("change", ["recipe", "seed", "data"])
def test_a_change_misses_the_cache(tmp_path, digits_splits, count_training, change):
    cache = ModelCache(tmp_path / "c")
    _train(cache, digits_splits)
    if change == "recipe":
        _, _, reused = _train(cache, digits_splits, recipe=RECIPE.model_copy(update={"lr": 1e-3}))
    elif change == "seed":
        _, _, reused = _train(cache, digits_splits, seed=1)
    else:
        model = _fresh()
        _, reused = cached_train(model, digits_splits.train.subset(torch.arange(100)), recipe=RECIPE, seed=0,
                                 val=digits_splits.val, cache=cache)
    assert not reused
    assert len(count_training) == 2
    assert len(cache.entries()) == 2


def test_custom_loss_is_never_cached(tmp_path, digits_splits, count_training):
    import torch.nn.functional as F

    cache = ModelCache(tmp_path / "c")
    for _ in range(2):
        _, reused = cached_train(_fresh(), digits_splits.train, recipe=RECIPE, seed=0, cache=cache,
                                 loss_fn=lambda m, x, y: F.cross_entropy(m(x), y))
        assert not reused
    assert len(count_training) == 2 and cache.entries() == []


def test_cli_lists_and_clears(tmp_path, digits_splits):
    cache = ModelCache(tmp_path / "c")
    _train(cache, digits_splits)
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "list", "--dir", str(cache.root)])
    assert res.exit_code == 0, res.output
    assert "1 cached model(s)" in res.output and cache.entries()[0].key[:16] in res.output
    res = runner.invoke(app, ["cache", "clear", "--dir", str(cache.root)])
    assert res.exit_code == 0 and "removed 1" in res.output
    assert cache.entries() == []
    assert "0 cached model(s)" in runner.invoke(app, ["cache", "list", "--dir", str(cache.root)]).output


def test_a_second_run_trains_nothing(tmp_path, monkeypatch, count_training):
    monkeypatch.setenv("SAFEDL_MODEL_CACHE", "on")
    monkeypatch.setenv("SAFEDL_CACHE_DIR", str(tmp_path / "cache"))
    prof = tiny_profile(attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.2}}],
                                 "poisoning": [{"name": "label_flipping", "params": {"flip_rate": 0.2}}]},
                        defenses=[{"name": "data_cleaning", "against": ["label_flipping"], "params": {"n_folds": 2}}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    results, trained = [], []
    for k in range(2):
        res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / f"runs{k}"), "--no-progress",
                                       "-q"])
        assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
        run_dir = next((tmp_path / f"runs{k}").iterdir())
        results.append(json.loads((run_dir / "results.json").read_text()))
        trained.append(len(count_training))
    # first run: baseline, poisoned model, 2 folds (the retraining on kept data trains again unless the cleanser
    # kept everything: then it is the poisoned model's key); second run: none of them
    assert trained[0] >= 4 and trained[1] == trained[0]
    assert results[1]["baseline"]["reused_models"] == ["baseline"]
    for a, b in zip(results[0]["defenses"], results[1]["defenses"]):
        assert _timeless(a["metrics"]) == _timeless(b["metrics"])
        assert len(b["reused_models"]) == 3
    for a, b in zip(results[0]["attacks"], results[1]["attacks"]):
        assert _timeless(a["metrics"]) == _timeless(b["metrics"])


def _timeless(metrics: dict) -> dict:
    """The metrics without wall-clock times (which differ between runs)."""
    return {k: _timeless(v) if isinstance(v, dict) else v for k, v in metrics.items() if "time" not in k}
