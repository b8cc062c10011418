"""Models that a defense trains (robust trainers, randomized smoothing's noise-trained base classifier), trained
with the baseline's recipe and seed and cached in the run directory under a content key.

The key covers everything the trained weights depend on: the component and its constructor parameters, the
recipe, the seed, the training data's hash and the architecture. Changing any of them (e.g. a trainer's
``epochs`` or ``eps``) on ``--resume`` trains a new model instead of silently reusing a stale one.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.utils.io import atomic_torch_save, atomic_write_json, json_hash

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    model: nn.Module
    time_s: float
    reloaded: bool
    facts: dict[str, Any] = field(default_factory=dict)


def defense_model_key(ctx: RunContext, component: Any) -> str:
    return json_hash({"kind": component.registry_kind, "name": component.registry_name,
                      "params": registry.creation_params(component), "recipe": ctx.recipe.model_dump(), "seed": ctx.seed,
                      "data": ctx.splits.train.content_hash(), "model": ctx.profile.model.model_dump()})


def train_defense_model(ctx: RunContext, component: Any, *,
                        architecture: Callable[[nn.Module], nn.Module] = lambda m: m,
                        facts: Callable[[], dict[str, Any]] = dict) -> TrainedModel:
    """Train a fresh baseline-architecture model with ``component.fit`` (or reload it when the content key
    matches). ``architecture`` maps a fresh model to the structure ``fit`` returns (e.g. DP-SGD's GroupNorm), so
    the cached weights load into the right layers; ``facts`` are saved with the weights (e.g. epsilon spent)."""
    key = defense_model_key(ctx, component)
    folder = ctx.layout.defense_model_dir(f"{component.registry_name}-{key[:16]}")
    weights, meta = folder / "model.pt", folder / "train.json"
    if weights.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            if info.get("key") == key:
                model = architecture(ctx.build_model())
                model.load_state_dict(torch.load(weights, map_location=ctx.device, weights_only=True))
                log.info("%s: reusing the trained model in %s", component.registry_name, folder)
                return TrainedModel(model.to(ctx.device).eval(), float(info["time_s"]), True, info.get("facts", {}))
        except (ValueError, KeyError, RuntimeError) as exc:  # a damaged cache entry is retrained, not trusted
            log.warning("%s: cached model in %s unusable (%s); retraining", component.registry_name, folder, exc)
    t0 = time.perf_counter()
    model = component.fit(ctx.build_model(), ctx.splits.train, recipe=ctx.recipe, seed=ctx.seed, device=ctx.device,
                          val=ctx.splits.val)
    elapsed = time.perf_counter() - t0
    model = model.to(ctx.device).eval()
    atomic_torch_save(weights, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    info = {"key": key, "time_s": elapsed, "facts": facts()}
    atomic_write_json(meta, info)  # written last: marks the entry complete
    return TrainedModel(model, elapsed, False, info["facts"])
