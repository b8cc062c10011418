"""A user's own model (a plain nn.Sequential with no ``features`` method): the one feature helper reads it by
forward hook, every registered defense can work with it, validation names the defenses a model cannot serve, and
the default profile's defenses run end to end on it through an entry point."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from safedl import registry
from safedl.run.prepare import check_model_support, prepare
from safedl.cli import app
from safedl.data.dataset import Dataset
from safedl.errors import ProfileError
from safedl.models.features import extract_features, features, model_problems, set_feature_layer
from safedl.models.normalize import with_normalization
from safedl.models.train import TrainRecipe, train_model
from safedl.models.zoo import build_model, model_names
from safedl.profile import parse_profile
from safedl.utils.tensors import seed_everything

USER_MODULE = """
from torch import nn

def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, num_classes))
"""


def _user_cnn(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, num_classes))


@pytest.mark.parametrize("name", model_names())
def test_hook_features_equal_every_zoo_models_features(name):
    size = 16 if name == "resnet_small" else 8
    net = build_model(name, in_channels=1, num_classes=4, image_size=size)
    model = with_normalization(net, [0.4], [0.3]).eval()
    x = torch.rand(6, 1, size, size)
    assert torch.equal(extract_features(model, x), net.features(model[0](x)).flatten(1))


def test_user_sequential_features_layer_choice_and_gradients():
    model = _user_cnn().eval()
    assert not hasattr(model, "features")
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    f = features(model, x)
    assert torch.allclose(f, model[:6](x))  # the input of the last Linear
    f.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the hook keeps the autograd graph
    set_feature_layer(model, "3")
    assert torch.allclose(extract_features(model, x.detach()), model[:4](x.detach()))  # the named module's output
    scripted = torch.jit.script(_user_cnn().eval())  # no hooks inside TorchScript: read step by step
    assert torch.allclose(extract_features(scripted, x.detach()), extract_features(_copy_weights(scripted), x.detach()))


def _copy_weights(scripted) -> nn.Module:
    plain = _user_cnn().eval()
    plain.load_state_dict(scripted.state_dict())
    return plain


def _train_user_model(splits) -> nn.Module:
    seed_everything(0)
    model = _user_cnn()
    train_model(model, splits.train, recipe=TrainRecipe(epochs=3, batch_size=64, lr=3e-3, augment="none"), seed=0)
    return model.eval()


def test_every_registered_defense_works_with_a_user_sequential_model(digits_splits):
    """Every defense in every registry: its declared model needs are met by a plain Sequential; the defenses that
    read the model's insides (features, head, conv layer, hooks) are run on it."""
    model = _train_user_model(digits_splits)
    sample = digits_splits.train.x[:2]
    small = digits_splits.train.subset(torch.arange(150))
    trusted = digits_splits.val
    ran = []
    for kind in registry.DEFENSE_KINDS:
        for name in registry.names(kind):
            comp = registry.create(kind, name)
            needs = getattr(comp, "model_needs", ())
            assert model_problems(model, needs, sample) == [], (kind, name)
            if not needs:
                continue
            if kind == "cleanser":
                res = comp.find_poison(small, model=model, trusted=trusted,
                                       train_fn=lambda d, **kw: _fit_small(d, **kw))
                assert res.is_suspect.shape == (len(small),)
            elif kind == "detector":
                comp.fit(digits_splits.val.x, model=model, y=digits_splits.val.y)
                assert comp.score(digits_splits.test.x[:20]).shape == (20,)
            elif kind == "repair":
                repaired = comp.repair(model, clean=trusted)
                assert repaired(sample).shape == (2, 10)
            ran.append(name)
    assert {"spectral_signatures", "activation_clustering", "anomaly_detection", "influence_functions",
            "mahalanobis", "lid", "pruning", "fine_pruning"} <= set(ran)


def _fit_small(data: Dataset, **kw) -> nn.Module:
    seed_everything(0)
    model = _user_cnn()
    train_model(model, data, recipe=TrainRecipe(epochs=1, batch_size=64, augment="none"), seed=0,
                on_epoch_end=kw.get("on_epoch_end"))
    return model.eval()


def test_validation_names_the_defenses_a_model_cannot_serve():
    no_linear = nn.Sequential(nn.Conv2d(1, 10, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    prof = parse_profile({"attacks": {"backdoor": [{"name": "static_patch"}], "evasion": [{"name": "fgsm"}]},
                          "defenses": [{"name": "spectral_signatures", "against": ["static_patch"]},
                                       {"name": "data_cleaning", "against": ["static_patch"]},
                                       {"name": "pruning", "params": {"scope": "penultimate"},
                                        "against": ["static_patch"]},
                                       {"name": "feature_squeezing", "against": ["fgsm"]}]})
    with pytest.raises(ProfileError) as exc:
        check_model_support(prof, no_linear, torch.rand(2, 1, 8, 8))
    locs = [loc for loc, _ in exc.value.errors]
    assert locs == ["defenses[0]", "defenses[2]"]  # data_cleaning and feature squeezing need nothing from inside
    assert "spectral_signatures" in str(exc.value) and "nn.Linear" in str(exc.value)


def test_an_unknown_feature_layer_is_refused_before_anything_runs(tmp_path, monkeypatch):
    (tmp_path / "user_cnn_mod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    prof = parse_profile({"dataset": {"name": "digits"},
                          "model": {"entry_point": "user_cnn_mod:build", "feature_layer": "9.conv"},
                          "attacks": {"backdoor": [{"name": "static_patch"}]},
                          "defenses": [{"name": "spectral_signatures"}]})
    with pytest.raises(ProfileError, match=r"no such module.*module paths are: 0, 1, 2"):
        prepare(prof, base_dir=tmp_path)


def test_default_profile_defenses_run_on_an_entry_point_sequential(tmp_path, monkeypatch):
    """The default profile's three defenses (feature squeezing, spectral signatures, data cleaning), unchanged,
    against its attack kinds, on a user's nn.Sequential; tiny data and one epoch."""
    (tmp_path / "user_cnn_mod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_cnn_mod", None)
    prof = {
        "name": "usermodel", "dataset": {"name": "digits"}, "model": {"entry_point": "user_cnn_mod:build"},
        "training": {"epochs": 1, "batch_size": 64, "augment": "none"},
        "attacks": {"evasion": [{"name": "pgd", "params": {"eps": 0.2, "steps": 3}}],
                    "poisoning": [{"name": "label_flipping", "params": {"strategy": "many_to_one", "flip_rate": 0.2}}],
                    "backdoor": [{"name": "static_patch", "params": {"trigger": "pattern", "poison_fraction": 0.1,
                                                                       "target_class": 7, "patch_size": 3}}]},
        "defenses": [{"name": "feature_squeezing", "params": {"bit_depth": 1}, "against": ["pgd"]},
                     {"name": "spectral_signatures", "against": ["static_patch"]},
                     {"name": "data_cleaning", "against": ["label_flipping"]}],
        "evaluation": {"n_eval": 60, "batch_size": 60, "n_examples": 0, "gate": {"min_clean_accuracy": 0.0}},
        "output": {"html": False, "figures": False},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"),
                                   "--no-progress", "-q"])
    r = json.loads(next((tmp_path / "runs").iterdir()).joinpath("results.json").read_text())
    # one epoch can leave the model at chance: then the gate fails it (not_at_chance, issue 30) and nothing else
    assert res.exit_code == (1 if r["gate"]["failures"] else 0), res.output
    assert all(f.startswith("not_at_chance: ") for f in r["gate"]["failures"]), res.output
    got = {d["id"]: d["metrics"] for d in r["defenses"]}
    assert set(got) == {"feature_squeezing", "spectral_signatures", "data_cleaning"}
    assert got["spectral_signatures"]["detection"]["tpr"]["n"] > 0  # scored against the planted poison
