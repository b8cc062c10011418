"""ResNet-18 and PreAct ResNet-18 in the zoo (models/resnet.py): both stems, the zoo contract (features, classifier),
torchvision's parameter names (a torchvision-layout state dict made here loads through the profile's checkpoint
path), and ``model.normalization``."""
from __future__ import annotations

import pytest
import torch

from safedl.errors import CheckpointError, ConfigError, ProfileError
from safedl.models.checkpoint import load_network_state
from safedl.models.features import features
from safedl.models.normalize import with_normalization
from safedl.models.zoo import build_model, model_names
from safedl.profile import parse_profile

# torchvision.models.resnet18's state dict keys (its layout: stem, 4 stages x 2 basic blocks, a projection
# shortcut "downsample" in the first block of stages 2-4, "fc"), written out so the test does not need torchvision
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet18_keys() -> list[str]:
    keys = ["conv1.weight", *(f"bn1.{p}" for p in _BN)]
    for stage in range(1, 5):
        for block in range(2):
            pre = f"layer{stage}.{block}"
            keys += [f"{pre}.conv1.weight", *(f"{pre}.bn1.{p}" for p in _BN),
                     f"{pre}.conv2.weight", *(f"{pre}.bn2.{p}" for p in _BN)]
            if stage > 1 and block == 0:
                keys += [f"{pre}.downsample.0.weight", *(f"{pre}.downsample.1.{p}" for p in _BN)]
    return keys + ["fc.weight", "fc.bias"]


def test_both_resnets_are_in_the_zoo_and_keep_its_contract():
    assert {"resnet18", "preact_resnet18"} <= set(model_names())
    x = torch.rand(2, 3, 32, 32)
    for name in ("resnet18", "preact_resnet18"):
        net = build_model(name, in_channels=3, num_classes=7, image_size=32).eval()
        assert net.stem == "cifar"  # default below 64 px
        with torch.no_grad():
            assert net(x).shape == (2, 7)
            assert net.features(x).shape == (2, 512)
            assert torch.allclose(net.classifier(net.features(x)), net(x), atol=1e-6)
            assert torch.allclose(features(net, x), net.features(x), atol=1e-6)  # the hook finds fc's input


def test_stems_cifar_keeps_resolution_imagenet_downsamples_four_times():
    cifar = build_model("resnet18", in_channels=3, num_classes=10, image_size=32)
    imagenet = build_model("resnet18", in_channels=3, num_classes=10, image_size=224)
    assert imagenet.stem == "imagenet" and tuple(imagenet.conv1.weight.shape) == (64, 3, 7, 7)
    assert tuple(cifar.conv1.weight.shape) == (64, 3, 3, 3)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        after_cifar = cifar.maxpool(cifar.relu(cifar.bn1(cifar.conv1(x))))
        after_imagenet = imagenet.maxpool(imagenet.relu(imagenet.bn1(imagenet.conv1(x))))
    assert after_cifar.shape[-1] == 64 and after_imagenet.shape[-1] == 16
    gray = build_model("resnet18", in_channels=1, num_classes=10, image_size=28)
    assert gray(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="stem 'tiny'"):
        build_model("resnet18", in_channels=3, num_classes=10, image_size=32, stem="tiny")


def test_a_torchvision_layout_state_dict_loads_into_the_wrapped_resnet18(tmp_path):
    torch.manual_seed(0)
    theirs = build_model("resnet18", in_channels=3, num_classes=10, image_size=224).eval()
    state = theirs.state_dict()
    assert list(state) == torchvision_resnet18_keys()  # the names and order torchvision uses
    ours = with_normalization(build_model("resnet18", in_channels=3, num_classes=10, image_size=224),
                              [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    assert load_network_state(ours, {f"module.{k}": v for k, v in state.items()}) == "network"  # DataParallel too
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs((x - mean) / std), atol=1e-5)
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(1000, 512)
    with pytest.raises(CheckpointError, match="shapes"):
        load_network_state(ours, bad)
    with pytest.raises(CheckpointError, match="missing"):
        load_network_state(ours, {k: v for k, v in state.items() if not k.startswith("layer4")})


def _profile(**model) -> dict:
    return {"dataset": {"name": "digits"}, "model": {"arch": "resnet18", **model}, "baseline_only": True}


def test_model_normalization_is_validated_and_used(digits_splits):
    from safedl.run.prepare import model_normalization

    prof = parse_profile(_profile(normalization={"mean": [0.5], "std": [0.25]}))
    assert model_normalization(prof, digits_splits) == ([0.5], [0.25])
    assert model_normalization(parse_profile(_profile()), digits_splits) == (list(digits_splits.mean),
                                                                              list(digits_splits.std))
    with pytest.raises(ProfileError, match=r"model.normalization.mean: 3 values for images with 1 channel"):
        model_normalization(parse_profile(_profile(normalization={"mean": [0.4, 0.4, 0.4], "std": [1, 1, 1]})),
                            digits_splits)
    with pytest.raises(ProfileError, match="std"):
        parse_profile(_profile(normalization={"mean": [0.5], "std": [0.0]}))
