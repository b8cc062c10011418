"""One evasion-defense stage's inputs on the seeded tiny digits model, for tests that call
``evaluate_evasion_defense`` directly: the run context and the attack outcome the stage receives."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safedl import registry
from safedl.data.dataset import Splits
from safedl.evaluate.base import AttackOutcome
from safedl.evaluate.context import RunContext
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import EvaluationSpec, Profile


def tiny_run_context(tmp_path: Path, splits: Splits, baseline: torch.nn.Module, *, n_eval: int = 48,
                     **evaluation: Any) -> RunContext:
    """A CPU run context whose fresh models are the tiny digits CNN, evaluating ``n_eval`` images in one batch."""
    profile = Profile(training=TrainRecipe(epochs=2, batch_size=64, lr=3e-3, augment="none"),
                      evaluation=EvaluationSpec(n_eval=n_eval, batch_size=n_eval, **evaluation))
    return RunContext(profile=profile, splits=splits, device=torch.device("cpu"), run_dir=tmp_path,
                      baseline=baseline, build_fresh=lambda: with_normalization(
                          build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                          splits.mean, splits.std))


def transferred_outcome(model: torch.nn.Module, eval_batch: tuple[torch.Tensor, torch.Tensor], *, name: str,
                        params: dict[str, Any], n: int = 48) -> AttackOutcome:
    """The attack stage's outcome: ``name`` run untargeted on the first ``n`` evaluation images of ``model``."""
    x, y = eval_batch[0][:n], eval_batch[1][:n]
    spec = {"name": name, "params": params, "targeted": False}
    x_adv = registry.create("evasion", name, **params)(model, x, y)
    return AttackOutcome(entry={"id": name, "category": "evasion"},
                         state={"x": x, "y": y, "x_adv": x_adv, "target": None, "spec": spec})
