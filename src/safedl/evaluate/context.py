"""RunContext: everything a stage evaluator needs, and the honest-evaluation helpers every stage shares.

The run spine (``safedl.run``) builds one per stage and calls an evaluator with it; it lives here, with the
evaluators, because ``safedl.evaluate`` never imports ``safedl.run``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from safedl.data.dataset import Dataset, Splits
from safedl.models.cache import ModelCache, cached_train, run_cache
from safedl.models.train import LossFn, TrainRecipe
from safedl.profile import Profile
from safedl.rundir import RunDir
from safedl.utils.tensors import seed_everything

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Shared state of one run.

    ``build_model()`` returns a freshly initialised model of the baseline's architecture, seeded exactly like the
    baseline; ``train_like_baseline`` trains one with the baseline's recipe and seed, so a drop in a retrained model
    comes from the attack or defense, not from a different recipe.
    """

    profile: Profile
    splits: Splits
    device: torch.device
    run_dir: Path
    baseline: nn.Module
    build_fresh: Callable[[], nn.Module]
    outcomes: dict[str, Any] = field(default_factory=dict)  # attack id -> AttackOutcome (filled by the spine)
    model_cache: ModelCache | None = field(default_factory=run_cache)  # trained models reused across runs
    model_meta: dict[str, Any] = field(default_factory=dict)  # how to rebuild the architecture (checkpoint meta)
    # strong-suite batches other stages already ran (batch start -> SuiteResult; safedl.evaluate.suite_shards)
    suite_batches: dict[int, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.profile.seed

    @property
    def recipe(self) -> TrainRecipe:
        return self.profile.training

    def build_model(self) -> nn.Module:
        """A new, untrained model of the baseline's architecture, initialised with the baseline's seed."""
        seed_everything(self.seed)
        return self.build_fresh().to(self.device)

    def train_like_baseline(self, train: Dataset, *, model: nn.Module | None = None, loss_fn: LossFn | None = None,
                            description: str = "retraining", recipe: TrainRecipe | None = None,
                            sample_weight: torch.Tensor | None = None, on_epoch_end=None) -> nn.Module:
        """Train (a fresh copy of) the baseline architecture on ``train`` with the baseline recipe and seed."""
        model = self.build_model() if model is None else model.to(self.device)
        cached_train(model, train, recipe=recipe or self.recipe, seed=self.seed, val=self.splits.val, device=self.device,
                     loss_fn=loss_fn, description=description, sample_weight=sample_weight, on_epoch_end=on_epoch_end,
                     cache=self.model_cache)
        return model.eval()

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``evaluation.n_eval`` test images and labels (the same ones for every attack and defense)."""
        n = self.profile.evaluation.n_eval
        return self.splits.test.x[:n].to(self.device), self.splits.test.y[:n].to(self.device)

    @property
    def layout(self) -> RunDir:
        """The run directory's layout (every path a stage writes comes from it)."""
        return RunDir(self.run_dir)

    def stage_dir(self, *parts: str) -> Path:
        return self.layout.stage_dir(*parts)

    def artifact_dir(self, *parts: str) -> Path:
        """Where figures and example images go (paths in results.json are relative to the run directory)."""
        return self.layout.artifact_dir(*parts)

    def rel(self, path: Path) -> str:
        return self.layout.rel(path)
