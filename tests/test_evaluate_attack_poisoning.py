"""The poisoning/backdoor stage handler: honest retraining, side-by-side metrics, state for the defenses, and a
backdoor that a tiny model really learns from poisoned digits."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.run.handlers import get_attack_handler
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import AttackSpec, Profile
from safedl.utils.tensors import predict

# the recipe and seed of conftest's tiny_model, which therefore is exactly this context's baseline
RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")


def _ctx(digits_splits, tiny_model, tmp_path, **profile_kw) -> RunContext:
    def fresh():
        return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                  digits_splits.mean, digits_splits.std)

    return RunContext(profile=Profile(seed=0, training=RECIPE, **profile_kw), splits=digits_splits,
                      device=torch.device("cpu"), run_dir=tmp_path, baseline=tiny_model, build_fresh=fresh)


def test_static_patch_backdoor_is_learned_and_reported(digits_splits, tiny_model, tmp_path):
    ctx = _ctx(digits_splits, tiny_model, tmp_path)
    params = {"poison_fraction": 0.1, "target_class": 0, "patch_size": 3}
    spec = AttackSpec(name="static_patch", params=params)
    out = get_attack_handler("backdoor")(ctx, spec, registry.create("backdoor", "static_patch", **params))
    m = out.entry["metrics"]
    # a tiny CNN trained on 10% poisoned digits follows the trigger; the clean baseline does not
    assert m["attack_success_rate"]["value"] >= 0.8
    assert m["baseline"]["attack_success_rate"]["value"] <= 0.2
    assert m["attack_success_rate"]["n"] == int((digits_splits.test.y != 0).sum())
    assert m["clean_accuracy"]["value"] >= m["baseline"]["clean_accuracy"]["value"] - 0.08
    assert m["poison"]["count"]["value"] == round(0.1 * len(digits_splits.train))
    assert 0 < m["visibility"]["ssim_mean"]["value"] < 1
    assert len(out.entry["per_class"]["clean_accuracy_poisoned"]) == 10
    json.dumps(out.entry, allow_nan=False)
    for rel in out.entry["artifacts"].values():
        assert (tmp_path / rel).is_file() and rel.endswith(".png")
    # the state the poisoning defenses consume
    st = out.state
    assert set(st) >= {"poisoned", "model_state", "attack", "target_class", "test_triggered_x", "test_triggered_y"}
    assert st["target_class"] == 0 and st["poisoned"].n_poison == m["poison"]["count"]["value"]
    assert bool((st["test_triggered_y"] != 0).all()) and len(st["test_triggered_x"]) == len(st["test_triggered_y"])
    assert torch.equal(st["test_triggered_x"], st["attack"].apply_trigger(digits_splits.test.x[digits_splits.test.y != 0]))
    model = ctx.build_model()
    model.load_state_dict(st["model_state"])  # the poisoned weights load into the baseline architecture
    import io

    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(again["attack"].apply_trigger(digits_splits.test.x[:4]),
                       st["attack"].apply_trigger(digits_splits.test.x[:4]))


def test_poisoned_model_is_trained_exactly_like_the_baseline(digits_splits, tiny_model, tmp_path, monkeypatch):
    """The handler retrains through ctx.train_like_baseline (same recipe and seed), on the poisoned data only."""
    ctx = _ctx(digits_splits, tiny_model, tmp_path)
    seen = {}

    def fake_train(train, **kw):
        seen["train"], seen["kw"] = train, kw
        return copy.deepcopy(tiny_model)

    monkeypatch.setattr(ctx, "train_like_baseline", fake_train)
    params = {"strategy": "many_to_one", "flip_rate": 0.2, "target_class": 3}
    spec = AttackSpec(name="label_flipping", params=params)
    out = get_attack_handler("poisoning")(ctx, spec, registry.create("poisoning", "label_flipping", **params))
    assert seen["train"] is out.state["poisoned"] and set(seen["kw"]) <= {"description"}
    m = out.entry["metrics"]
    assert "targeted_success_rate" in m and "targeted_success_rate" in m["baseline"]
    assert m["targeted_success_rate"]["n"] == int((digits_splits.test.y != 3).sum())
    assert out.state["target_class"] == 3
    assert bool((out.state["test_triggered_y"] != 3).all())
    # the same model on both sides gives the same numbers: no other difference sneaks in
    assert m["clean_accuracy"] == m["baseline"]["clean_accuracy"]
    assert m["poison"]["labels_changed"]["value"] == out.state["poisoned"].n_poison


@pytest.mark.parametrize("access", ["white-box", "black-box"])
def test_surrogate_follows_the_threat_model(digits_splits, tiny_model, tmp_path, monkeypatch, access):
    from safedl.evaluate import attack_poisoning

    ctx = _ctx(digits_splits, tiny_model, tmp_path, threat_model={"model_access": access})
    trained = []
    monkeypatch.setattr(attack_poisoning, "train_model", lambda model, *a, **k: trained.append(model))
    surrogate, note = attack_poisoning._surrogate(ctx, digits_splits.train)
    if access == "white-box":
        assert surrogate is tiny_model and not trained
    else:
        assert surrogate is not tiny_model and trained == [surrogate] and "seed 1" in note


def test_fraction_of_target_class_counts_poison_among_samples_labelled_target():
    from safedl.evaluate.attack_poisoning import _poison_metrics
    from safedl.data.dataset import Dataset, PoisonedDataset

    clean = Dataset(torch.zeros(8, 1, 2, 2), torch.tensor([0, 0, 1, 1, 1, 1, 2, 2]), num_classes=3)
    # dirty-label: two class-1 samples relabelled to target 0 -> 2 of the 4 samples labelled 0 are poison
    dirty_y = clean.y.clone()
    dirty_y[2:4] = 0
    dirty = PoisonedDataset.from_clean(clean, x=clean.x, y=dirty_y)
    assert _poison_metrics(dirty, 0)["fraction_of_target_class"]["value"] == pytest.approx(0.5)
    # clean-label: one of the two target-class samples perturbed, labels untouched -> 1/2
    x = clean.x.clone()
    x[0] += 0.1
    clean_label = PoisonedDataset.from_clean(clean, x=x, y=clean.y)
    m = _poison_metrics(clean_label, 0)["fraction_of_target_class"]
    assert m["value"] == pytest.approx(0.5) and m["n"] == 2


def test_all_to_all_backdoor_success_is_measured_against_each_mapped_label(digits_splits, tiny_model, tmp_path):
    """An all-to-all backdoor (c -> c+1) has no single target: its success rate counts every triggered test image
    predicted as its own label + 1, in the attack stage and in the poisoning-defense stage (before: no rate at all,
    or, scored against one class, at most that class's share)."""
    from safedl.evaluate.defend_poisoning import _outcome_metrics, aimed_labels

    ctx = _ctx(digits_splits, tiny_model, tmp_path)
    params = {"poison_fraction": 0.3, "target_class": 0, "patch_size": 3, "mapping": "all_to_all"}
    spec = AttackSpec(name="static_patch", params=params)
    out = get_attack_handler("backdoor")(ctx, spec, registry.create("backdoor", "static_patch", **params))
    m, st, test = out.entry["metrics"], out.state, digits_splits.test
    assert st["target_class"] is None
    assert torch.equal(st["test_triggered_aim"], (test.y + 1) % 10)  # every test image, aimed at label + 1
    model = ctx.build_model()
    model.load_state_dict(st["model_state"])
    pred = predict(model.eval(), st["attack"].apply_trigger(test.x))
    expect = int((pred == (test.y + 1) % 10).sum())
    asr = m["attack_success_rate"]
    assert asr["n"] == len(test) and asr["value"] == pytest.approx(expect / len(test)) and len(asr["ci95"]) == 2
    # the trigger is learned: most triggered images go to their own mapped label, far above the clean baseline and
    # above any single class's share (what an ASR against one target could at most report)
    assert asr["value"] >= 0.5 > m["baseline"]["attack_success_rate"]["value"] + 0.3
    assert asr["value"] > max(float((pred == c).float().mean()) for c in range(10))
    assert len(out.entry["per_class"]["predicted_as_aimed_label_poisoned"]) == 10
    # the defense stage scores the same aimed labels: on the poisoned model itself it reproduces the attack's number
    assert torch.equal(aimed_labels(st), st["test_triggered_aim"])
    after = _outcome_metrics(ctx, model, st)["attack_success_rate_after"]
    assert after["value"] == asr["value"] and after["n"] == asr["n"]
