"""Helpers of the canary / rollout tests: tiny seeded digits models (a good one per seed, a backdoored one, one
trained on shuffled labels) exported as real bundles with a probe set, and a rollout poller."""
from __future__ import annotations

import time

import torch

from safedl import registry
from safedl.deploy import SecurePipeline, export_bundle
from safedl.deploy.probes import probe_set
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.tensors import seed_everything

RECIPE = TrainRecipe(epochs=6, batch_size=64, lr=3e-3, augment="none")  # stable and canaries: one recipe
TARGET = 0


def stamp(x: torch.Tensor) -> torch.Tensor:
    """The test backdoor's trigger: a white 2x2 patch in the bottom-right corner."""
    x = x.clone()
    x[..., -2:, -2:] = 1.0
    return x


def train(splits, *, seed: int, labels: str = "clean", poison_fraction: float = 0.1):
    """A tiny CNN trained with RECIPE; ``labels``: clean, shuffled (a seeded permutation) or backdoor (that share
    of the training images stamped and relabelled TARGET)."""
    from safedl.data.dataset import Dataset

    train_set = splits.train
    x, y = train_set.x, train_set.y
    gen = torch.Generator().manual_seed(seed)
    if labels == "shuffled":
        y = y[torch.randperm(len(y), generator=gen)]
    elif labels == "backdoor":
        idx = torch.randperm(len(y), generator=gen)[: int(poison_fraction * len(y))]
        x, y = x.clone(), y.clone()
        x[idx], y[idx] = stamp(x[idx]), TARGET
    data = Dataset(x, y, train_set.num_classes, train_set.name, train_set.class_names)
    seed_everything(seed)
    net = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8)
    model = with_normalization(net, splits.mean, splits.std)
    train_model(model, data, recipe=RECIPE, seed=seed)
    return model.eval()


def probes_for(stable, splits, *, n: int = 200):
    """The probe set: n clean test images, FGSM examples made on ``stable``, n triggered test images."""
    x, y = splits.test.x, splits.test.y
    fgsm = registry.create("evasion", "fgsm", eps=0.15)
    x_adv = fgsm(stable, x[:n], y[:n])
    keep = y != TARGET
    return probe_set(clean=(x, y), adversarial=[(x_adv, y[:n])],
                     triggered=[(stamp(x[keep]), y[keep], torch.full_like(y[keep], TARGET))], n=n, seed=0)


def bundle(model, splits, out, *, probes=None, postprocessors=()):
    """``model`` behind feature squeezing (and the named ``postprocessors``), as a real bundle (with ``probes``
    when given)."""
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=5)
    post = [registry.create("postprocessor", name) for name in postprocessors]
    pipe = SecurePipeline(model=model, preprocessors=[squeeze], postprocessors=post,
                          class_names=splits.train.class_names, input_shape=splits.shape)
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": list(splits.mean), "std": list(splits.std)}
    data = {"name": "digits", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    return export_bundle(pipe, out, model_spec=spec, data=data, probes=probes)


def wait_final(get_status, *, timeout_s: float = 15.0) -> dict:
    """Poll the rollout status until it is no longer progressing (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = get_status()
        if s["state"] != "progressing" or time.monotonic() > deadline:
            return s
        time.sleep(0.05)
