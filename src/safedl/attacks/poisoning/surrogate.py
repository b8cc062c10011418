"""The attacker's surrogate model: a network trained on clean data, for attacks that optimise against one
(clean-label feature collision and backdoor, learned triggers)."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.errors import ConfigError
from safedl.models.features import feature_module, features
from safedl.models.normalize import with_normalization
from safedl.models.train import TrainRecipe, train_model
from safedl.models.zoo import build_model

log = logging.getLogger(__name__)


def train_surrogate(train: Dataset, *, seed: int, device: torch.device | str = "cpu",
                    recipe: TrainRecipe | None = None) -> nn.Module:
    """Train a zoo network on clean ``train`` (small_cnn for images of 16 px and more, tiny_cnn below), with
    normalization from the data, without touching the caller's global random state. Returns it in eval mode."""
    c, h, w = train.shape
    arch = "small_cnn" if min(h, w) >= 16 else "tiny_cnn"
    mean = train.x.mean(dim=(0, 2, 3)).tolist()
    std = [max(s, 1e-3) for s in train.x.std(dim=(0, 2, 3)).tolist()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_model(arch, in_channels=c, num_classes=train.num_classes, image_size=h)
    model = with_normalization(net, mean, std)
    log.info("training a %s surrogate on %d clean samples (seed %d)", arch, len(train), seed)
    train_model(model, train, recipe=recipe or TrainRecipe(), seed=int(seed), device=device,
                description="surrogate")
    return model.eval()


def feature_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> penultimate features (``safedl.models.features``: the last linear layer's input, or the model's
    ``feature_layer``); the logits for a model whose features cannot be read."""
    try:
        feature_module(model)
    except ConfigError:
        return model
    return lambda x: features(model, x)
