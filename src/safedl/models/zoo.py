"""Model zoo: small networks for 28x28 grayscale, 8x8 digits and 32x32 colour images (registry kind ``model``).

Every network exposes ``features(x)`` (penultimate representation) and ``classifier`` (last linear layer), which
feature-space defenses (spectral signatures, activation clustering, Mahalanobis, LID) rely on.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from safedl import registry
from safedl.errors import UnknownComponentError


def register_model(name: str) -> Callable:
    """Register a network class (or factory) as registry kind ``model``."""
    return registry.register("model", name)


def model_names() -> list[str]:
    return registry.names("model")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    """Build a zoo network by name (without normalization; see ``with_normalization``)."""
    if name not in model_names():
        raise UnknownComponentError(f"unknown model {name!r}; zoo models are: {', '.join(model_names())}")
    fn = registry.get("model", name)
    return fn(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)


class _Classifier(nn.Module):
    """Body -> penultimate features -> linear classifier (subclasses set ``self.body`` and ``self.classifier``).

    No class-level attribute annotations: TorchScript reads them as attribute types and cannot script them.
    """

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


@register_model("small_cnn")
class SmallCNN(_Classifier):
    """Two conv blocks (32, 64 channels) and a 128-unit hidden layer; the default for 28x28 grayscale."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32,
                 hidden: int = 128):
        super().__init__()
        side = image_size // 4
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU())
        self.body = nn.Sequential(self.conv, self.head)
        self.classifier = nn.Linear(hidden, num_classes)


@register_model("mlp")
class MLP(_Classifier):
    """A fully connected network with two hidden layers."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 256):
        super().__init__()
        d = in_channels * image_size * image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU())
        self.classifier = nn.Linear(hidden // 2, num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


@register_model("resnet_small")
class ResNetSmall(_Classifier):
    """A ResNet with three stages of two basic blocks (16, 32, 64 channels), for 32x32 colour images (He et al. 2016)."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            _BasicBlock(w, w, 1), _BasicBlock(w, w, 1),
            _BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w, 1),
            _BasicBlock(2 * w, 4 * w, 2), _BasicBlock(4 * w, 4 * w, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, num_classes)


@register_model("tiny_cnn")
class TinyCNN(_Classifier):
    """A very small CNN (8 and 16 channels) for tests and 8x8 digits."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, width: int = 8,
                 hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, hidden), nn.ReLU(),
        )
        self.classifier = nn.Linear(hidden, num_classes)
