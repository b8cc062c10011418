"""poisoning:inject: outside images added to the training split with a chosen label; the count and the attack's
effect at test time are reported; a bad folder is one clear error (exit 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from safedl import registry
from safedl.cli import app
from safedl.errors import ConfigError, DataError
from safedl.evaluate.context import RunContext
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import AttackSpec, Profile
from safedl.run.handlers import get_attack_handler
from safedl.utils.tensors import predict

RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")  # conftest's tiny_model recipe


def _object_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` noisy 8x8 crosses (an "object" that is none of the digits)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(1, 8, 8)
    idx = torch.arange(8)
    base[0, idx, idx] = 1.0
    base[0, idx, 7 - idx] = 1.0
    return (base + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)


def _save_pngs(folder, x: torch.Tensor) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(x):
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")


def _ctx(splits, model, tmp_path) -> RunContext:
    def fresh():
        return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                  splits.mean, splits.std)

    return RunContext(profile=Profile(seed=0, training=RECIPE), splits=splits, device=torch.device("cpu"),
                      run_dir=tmp_path, baseline=model, build_fresh=fresh)


def test_inject_adds_exactly_the_outside_images_with_the_chosen_label(digits_splits, tmp_path):
    _save_pngs(tmp_path / "crosses", _object_images(40))
    attack = registry.create("poisoning", "inject", path=str(tmp_path / "crosses"), target_class=7, n=25,
                             holdout_fraction=0.25)
    train = digits_splits.train
    p = attack.poison(train, generator=torch.Generator().manual_seed(0))
    assert len(p) == len(train) + 25 and p.n_poison == 25
    assert torch.equal(p.x[: len(train)], train.x) and torch.equal(p.y[: len(train)], train.y)
    assert bool(p.is_poison[len(train):].all()) and not bool(p.is_poison[: len(train)].any())
    assert bool((p.y[len(train):] == 7).all())
    assert p.info["injected"] == 25 and p.info["held_out"] == 10 and len(p.info["victims"]) == 10
    # the held-out images are outside images that were not injected (PNG round trip: 1/255 quantisation)
    injected = p.x[len(train):].flatten(1)
    dist = torch.cdist(p.info["victims"].flatten(1), injected)
    assert bool((dist.min(1).values > 1e-3).all())


def test_inject_reads_an_npz_and_records_the_true_class(digits_splits, tmp_path):
    test = digits_splits.test
    threes = test.x[test.y == 3][:20]
    np.savez(tmp_path / "threes.npz", x=threes.numpy())
    attack = registry.create("poisoning", "inject", path=str(tmp_path / "threes.npz"), target_class=8,
                             source_class=3, holdout_fraction=0.0)
    p = attack.poison(digits_splits.train, generator=torch.Generator().manual_seed(0))
    assert p.n_poison == 20 and int(p.label_changed.sum()) == 20
    assert bool((p.original_y[p.is_poison] == 3).all()) and bool((p.y[p.is_poison] == 8).all())
    assert torch.equal(p.x[p.is_poison], threes)


def test_injected_object_is_learned_as_the_chosen_class_and_reported(digits_splits, tiny_model, tmp_path):
    _save_pngs(tmp_path / "crosses", _object_images(40))
    params = {"path": str(tmp_path / "crosses"), "target_class": 7, "n": 25, "holdout_fraction": 0.25}
    ctx = _ctx(digits_splits, tiny_model, tmp_path)
    out = get_attack_handler("poisoning")(ctx, AttackSpec(name="inject", params=params),
                                          registry.create("poisoning", "inject", **params))
    m = out.entry["metrics"]
    assert m["poison"]["count"]["value"] == 25
    assert m["attack_success_rate"]["n"] == 10  # the held-out crosses
    # the clean model calls the held-out crosses anything but 7 at a lower rate than the poisoned model does
    assert m["attack_success_rate"]["value"] >= 0.8
    assert m["attack_success_rate"]["value"] > m["baseline"]["attack_success_rate"]["value"]
    held = out.state["test_triggered_x"]
    assert float((predict(tiny_model, held) == 7).float().mean()) == m["baseline"]["attack_success_rate"]["value"]


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing", "is not a folder of images"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "is not a folder of images"),
])
def test_bad_path_is_a_config_error(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match):
        registry.create("poisoning", "inject", path=str(make(tmp_path)), target_class=1)


def test_folder_without_images_is_a_data_error(digits_splits, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    attack = registry.create("poisoning", "inject", path=str(tmp_path / "empty"), target_class=1)
    with pytest.raises(DataError, match="no image files"):
        attack.poison(digits_splits.train, generator=torch.Generator().manual_seed(0))


def test_bad_folder_in_a_profile_exits_2(tmp_path):
    import yaml

    from _profiles import tiny_profile

    prof = tiny_profile(attacks={"poisoning": [{"name": "inject", "params": {"path": str(tmp_path / "nope"),
                                                                              "target_class": 1}}]})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert "attacks.poisoning[0].params" in res.output and "nope" in res.output
