"""training.mode: finetune: the poisoned model is the clean model fine-tuned on the new samples only (plus an
optional replayed share), not a model retrained from scratch."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.data.dataset import PoisonedDataset
from safedl.errors import DataError, ProfileError
from safedl.evaluate.context import RunContext
from safedl.evaluate.finetune import finetune_data
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import AttackSpec, Profile, parse_profile
from safedl.run.handlers import get_attack_handler
from safedl.utils.tensors import predict

from test_attacks_poisoning_inject import _object_images, _save_pngs

RECIPE = dict(epochs=15, batch_size=64, lr=3e-3, augment="none")  # conftest's tiny_model recipe


def _fresh(splits):
    return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                              splits.mean, splits.std)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_finetune_data_is_the_new_samples_plus_the_replayed_share(digits_splits):
    train = digits_splits.train
    y = train.y.clone()
    y[:30] = (y[:30] + 1) % 10
    p = PoisonedDataset.from_clean(train, x=train.x, y=y)
    data, n_new, n_replay = finetune_data(p, replay_fraction=0.0, generator=torch.Generator().manual_seed(0))
    assert (n_new, n_replay, len(data)) == (30, 0, 30) and torch.equal(data.y, y[:30])
    data, n_new, n_replay = finetune_data(p, replay_fraction=0.1, generator=torch.Generator().manual_seed(0))
    assert n_replay == round(0.1 * (len(train) - 30)) and len(data) == 30 + n_replay
    with pytest.raises(DataError, match="needs new samples"):
        finetune_data(PoisonedDataset.from_clean(train, x=train.x, y=train.y), replay_fraction=0.0,
                      generator=torch.Generator())


def test_finetuning_on_injected_images_starts_from_the_checkpoint(digits_splits, tiny_model, tmp_path):
    _save_pngs(tmp_path / "crosses", _object_images(40))
    params = {"path": str(tmp_path / "crosses"), "target_class": 7, "n": 25, "holdout_fraction": 0.25}
    recipe = TrainRecipe(**RECIPE, mode="finetune", finetune={"epochs": 10, "lr": 1e-3})
    ctx = RunContext(profile=Profile(seed=0, training=recipe), splits=digits_splits, device=torch.device("cpu"),
                     run_dir=tmp_path, baseline=tiny_model, build_fresh=lambda: _fresh(digits_splits))
    before = _flat(tiny_model).clone()
    out = get_attack_handler("poisoning")(ctx, AttackSpec(name="inject", params=params),
                                          registry.create("poisoning", "inject", **params))
    m = out.entry["metrics"]
    assert torch.equal(_flat(tiny_model), before)  # the clean model itself is not touched
    # behaviour on the injected object changed: held-out crosses now land in class 7
    assert m["attack_success_rate"]["value"] >= 0.8 > m["baseline"]["attack_success_rate"]["value"]
    assert m["finetune"]["new_samples"]["value"] == 25 and m["finetune"]["replayed_samples"]["value"] == 0
    # the weights started from the checkpoint: far closer to it than a fresh initialisation is, and clean accuracy
    # stays (a model trained from scratch on 25 crosses alone would be at chance on digits)
    model = ctx.build_model()
    model.load_state_dict(out.state["model_state"])
    init = _flat(ctx.build_model())
    # (retraining from scratch from the same seed ends 0.44 of that distance away on this setup; fine-tuning 0.04)
    assert (_flat(model) - before).norm() < 0.15 * (init - before).norm()
    assert m["clean_accuracy"]["value"] >= m["baseline"]["clean_accuracy"]["value"] - 0.1
    assert any("fine-tuned from the run's clean baseline" in n for n in out.entry["notes"])
    test = digits_splits.test
    agree = float((predict(model, test.x) == predict(tiny_model, test.x)).float().mean())
    assert agree >= 0.85


def test_finetune_keys_are_validated():
    with pytest.raises(ProfileError, match="training.mode"):
        parse_profile({"training": {"mode": "transfer"}, "baseline_only": True})
    with pytest.raises(ProfileError, match="replay_fraction"):
        parse_profile({"training": {"mode": "finetune", "finetune": {"replay_fraction": 2}}, "baseline_only": True})


def test_finetune_mode_keys_the_poisoning_stages_only():
    """A cached retrain-from-scratch stage is never reused for fine-tuning (and evasion stages are unaffected)."""
    from safedl.run.graph import build_graph

    attacks = {"evasion": [{"name": "fgsm"}], "poisoning": [{"name": "label_flipping"}]}
    keys = {}
    for mode in ("scratch", "finetune"):
        prof = parse_profile({"attacks": attacks, "training": {"mode": mode}})
        keys[mode] = {n.stage: n.key for n in build_graph(prof, [], "baseline-key")}
    assert keys["scratch"]["attack-fgsm"] == keys["finetune"]["attack-fgsm"]
    assert keys["scratch"]["attack-label_flipping"] != keys["finetune"]["attack-label_flipping"]


def test_a_profile_run_injects_and_fine_tunes_end_to_end(tmp_path):
    """`safedl run` with poisoning:inject in finetune mode and a cleanser against it: the stage is stored, reported
    and resumed (the injected rows make the poisoned set longer than the training split)."""
    from _profiles import tiny_profile
    from safedl.run import run_assessment

    _save_pngs(tmp_path / "crosses", _object_images(40))
    prof = parse_profile(tiny_profile(
        training={"mode": "finetune", "finetune": {"epochs": 10, "lr": 1e-3}},
        attacks={"poisoning": [{"name": "inject", "params": {"path": str(tmp_path / "crosses"), "target_class": 7,
                                                              "n": 25, "holdout_fraction": 0.25}}]},
        defenses=[{"name": "spectral_signatures", "against": ["inject"]}]))
    run_dir, res = run_assessment(prof, base_dir=tmp_path, run_dir=tmp_path / "run")
    entry = res["attacks"][0]
    assert entry["metrics"]["poison"]["count"]["value"] == 25
    assert entry["metrics"]["finetune"]["new_samples"]["value"] == 25
    assert entry["metrics"]["attack_success_rate"]["n"] == 10
    assert res["defenses"] and "inject" in (run_dir / "report.md").read_text()
    _, again = run_assessment(prof, base_dir=tmp_path, run_dir=run_dir)  # resumed from the stored stages
    assert again["attacks"][0]["metrics"] == entry["metrics"]
