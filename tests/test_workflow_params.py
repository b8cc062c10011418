"""Parameters users know (issue 30): num_clusters, layers, all_layers / last_layer_only, std_threshold; the profile
layer rewrites an alias to the constructor's one name."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from _poison_planted import TARGET, fit, plant_backdoor
from _profiles import tiny_profile
from safedl import registry
from safedl.cli import app
from safedl.errors import ConfigError, ProfileError
from safedl.profile import parse_profile


def _profile(defenses: list[dict]) -> dict:
    return tiny_profile(attacks={"backdoor": [{"name": "static_patch", "params": {"target_class": 3}}]},
                        defenses=defenses)


def test_profile_aliases_are_rewritten_to_the_constructor_names():
    prof = parse_profile(_profile([
        {"name": "activation_clustering", "params": {"num_clusters": 3}},
        {"name": "per_class_monitoring", "params": {"std_threshold": 2.5}},
        {"name": "pruning", "id": "p_all", "params": {"all_layers": True}},
        {"name": "pruning", "id": "p_last", "params": {"last_layer_only": True, "pruning_ratio": 0.2}},
        {"name": "model_inspection", "params": {"layers": ["penultimate"]}}]), source="p.yaml")
    got = {d.key: d.params for d in prof.defenses}
    assert got == {"activation_clustering": {"n_clusters": 3}, "per_class_monitoring": {"z": 2.5},
                   "p_all": {"scope": "all_layers"}, "p_last": {"scope": "last_conv", "pruning_ratio": 0.2},
                   "model_inspection": {"layers": ["penultimate"]}}
    assert registry.create("cleanser", "activation_clustering", **got["activation_clustering"]).n_clusters == 3


def test_an_alias_that_conflicts_with_its_canonical_name_is_one_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="all_layers: True means scope: 'all_layers', which conflicts with scope"):
        parse_profile(_profile([{"name": "pruning", "params": {"all_layers": True, "scope": "penultimate"}}]),
                      source="p.yaml")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_profile([{"name": "pruning", "params": {"last_layer_only": "yes"}}])))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "last_layer_only must be true or false" in res.output


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 3))


def test_pruning_all_layers_prunes_every_convolution_last_conv_only_the_last(digits_splits):
    clean = digits_splits.val
    model = _convnet()
    dead = lambda m: [int((c.weight.flatten(1).abs().sum(1) == 0).sum()) for c in m.modules()  # noqa: E731
                      if isinstance(c, nn.Conv2d)]
    pr = registry.create("repair", "pruning", pruning_ratio=0.5, scope="all_layers")
    assert dead(pr.repair(model, clean=clean)) == [4, 5] and pr.report_["layers"] == 2
    last = registry.create("repair", "pruning", pruning_ratio=0.5, scope="last_conv")
    assert dead(last.repair(model, clean=clean)) == [0, 5] and last.report_["pruned"] == 5


def test_model_inspection_layers_restricts_the_statistics(digits_splits):
    model, ref = _convnet(), _convnet()
    with torch.no_grad():
        model[2].weight.mul_(10)  # tampered second convolution
    data = digits_splits.val
    full = registry.create("inspector", "model_inspection").inspect(model, reference=ref, data=data)
    assert "2.weight.std" in full["flagged_statistics"]
    first = registry.create("inspector", "model_inspection", layers=["0"]).inspect(model, reference=ref, data=data)
    assert {r["statistic"].split(".")[0] for r in first["statistics"]} == {"0"} and not first["suspicious"]
    second = registry.create("inspector", "model_inspection", layers=["2", "penultimate"])
    rep = second.inspect(model, reference=ref, data=data)
    assert {r["statistic"].split(".")[0] for r in rep["statistics"]} == {"2", "penultimate"} and rep["suspicious"]
    with pytest.raises(ConfigError, match=r"layers \['conv9'\] are not layers of this model"):
        registry.create("inspector", "model_inspection", layers=["conv9"]).inspect(model, reference=ref, data=data)
    with pytest.raises(ConfigError, match="non-empty list"):
        registry.create("inspector", "model_inspection", layers="0")


def test_activation_clustering_num_clusters_splits_each_class_into_k(digits_splits):
    p = plant_backdoor(digits_splits.train, 0.1)
    m = fit(digits_splits, p)
    res = registry.create("cleanser", "activation_clustering", n_clusters=3).find_poison(
        p, model=m, trusted=digits_splits.val)
    assert res.info["n_clusters"] == 3
    assert all(len(e["sizes"]) == 3 for e in res.info["per_class"] if "sizes" in e)
    assert TARGET in res.info["poisoned_classes"]
    tpr = float(res.is_suspect[p.is_poison].float().mean())
    fpr = float(res.is_suspect[~p.is_poison].float().mean())
    # one candidate cluster of three: the poisons of class 7 split over two of them, so fewer are caught than with the
    # paper's 2 (>= 0.8 in test_defenses_cleanse_feature_space); measured seed 0: tpr 0.643, fpr 0.035
    assert tpr >= 0.5 and fpr <= 0.05, (tpr, fpr)
    with pytest.raises(ConfigError):
        registry.create("cleanser", "activation_clustering", n_clusters=1)


def test_data_cleaning_granularity_sample_or_batch():
    from safedl.data.dataset import Dataset

    g = torch.Generator().manual_seed(0)
    losses = torch.rand(100, generator=g) * 0.5 + 0.5  # clean: 0.5..1.0
    losses[40:50] += 1.5  # one delivery of 10 (batch 4 of size 10) has high loss
    losses[[3, 77]] = 5.0  # two scattered outliers
    data = Dataset(torch.zeros(100, 1, 2, 2), torch.zeros(100, dtype=torch.long), 2)
    per_sample = registry.create("cleanser", "data_cleaning").find_poison(data, losses=losses)
    assert set(torch.nonzero(per_sample.is_suspect).flatten().tolist()) == set(range(40, 50)) | {3, 77}
    dc = registry.create("cleanser", "data_cleaning", granularity="batch", batch_size=10)
    res = dc.find_poison(data, losses=losses)
    assert res.info["flagged_batches"] == [4] and res.info["batches"] == 10
    assert torch.equal(res.is_suspect, (torch.arange(100) // 10) == 4)  # the delivery, whole; not the stray ones
    assert torch.allclose(res.score[40], losses[40:50].mean())
    with pytest.raises(ConfigError):
        registry.create("cleanser", "data_cleaning", granularity="epoch")
