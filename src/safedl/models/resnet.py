"""ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) and the pre-activation ResNet-18
(He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016), written without torchvision.

``resnet18`` has torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``, ...), so a state dict of ``torchvision.models.resnet18`` loads into it as is. ``stem``: ``imagenet`` is
torchvision's 7x7/2 convolution and 3x3/2 max-pool (224 px inputs); ``cifar`` a 3x3/1 convolution and no pool, the
usual variant for 32 px images (a 7x7/2 stem would leave 32 px images 1x1 before the last stage). Default: ``cifar``
below 64 px, ``imagenet`` from 64 px. Both expose ``features(x)`` (the 512-d pooled representation) and
``classifier`` (the last linear layer) like the rest of the zoo.
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.models.zoo import register_model

STEMS = ("cifar", "imagenet")
WIDTHS = (64, 128, 256, 512)


def _stem_of(stem: str | None, image_size: int) -> str:
    stem = stem or ("cifar" if image_size < 64 else "imagenet")
    if stem not in STEMS:
        raise ConfigError(f"resnet: stem {stem!r} is not allowed; choose one of {', '.join(STEMS)}")
    return stem


def _stem_layers(stem: str, in_channels: int) -> tuple[nn.Conv2d, nn.Module]:
    """(first convolution, pooling) of a stem: 7x7/2 + 3x3/2 max-pool (imagenet) or 3x3/1 and none (cifar)."""
    if stem == "imagenet":
        return nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
    return nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut taken after the first BN-ReLU when it projects (He et al. 2016b)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(torch.relu(self.bn2(out))) + identity


def _stages(block: type, width: int) -> list[nn.Sequential]:
    stages, cin = [], width
    for i, w in enumerate(WIDTHS):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(block(cin, w, stride), block(w, w, 1)))
        cin = w
    return stages


class _ResNet(nn.Module):
    """Shared head: global average pool, then ``fc``; ``classifier`` names ``fc`` for the feature-space defenses
    (a property, so the state dict keeps torchvision's names; TorchScript skips it)."""

    __jit_unused_properties__ = ["classifier"]

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("resnet18")
class ResNet18(_ResNet):
    """ResNet-18 with torchvision's parameter names; ``stem`` cifar (3x3, no pool) or imagenet (7x7/2 + pool)."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 stem: str | None = None):
        super().__init__()
        self.stem = _stem_of(stem, image_size)
        self.conv1, self.maxpool = _stem_layers(self.stem, in_channels)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock, 64)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


@register_model("preact_resnet18")
class PreActResNet18(_ResNet):
    """Pre-activation ResNet-18, the usual model of adversarial-training papers on CIFAR-10 (e.g. Rice et al.
    2020); ``stem`` as resnet18."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 stem: str | None = None):
        super().__init__()
        self.stem = _stem_of(stem, image_size)
        self.conv1, self.maxpool = _stem_layers(self.stem, in_channels)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(PreActBlock, 64)
        self.bn = nn.BatchNorm2d(512)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(torch.relu(self.bn(x))), 1)
