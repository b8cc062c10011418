"""Poisoning during fine-tuning (``training.mode: finetune``): the victim does not retrain from scratch but
fine-tunes its clean model (the run's baseline, i.e. ``model.checkpoint`` when one is given) on the newly arrived
samples, which carry the poison, plus optionally a small replayed share of the clean training set.

This is the setting of transfer-learning poisoning (Shafahi et al. 2018, Sec. 3 "fine-tuning"; Gu et al. 2017,
BadNets Sec. 5 "transfer learning"): the attacker's samples are all the update sees, so a few dozen of them move the
model far more than they would in a full retraining.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from safedl.attacks.backdoor.base import select_indices
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import DataError
from safedl.evaluate.context import RunContext

log = logging.getLogger(__name__)


def finetune_data(poisoned: PoisonedDataset, *, replay_fraction: float, generator: torch.Generator
                  ) -> tuple[Dataset, int, int]:
    """The fine-tuning set: every new (poisoned) sample plus ``replay_fraction`` of the clean ones (seeded draw);
    returns it with the number of new and replayed samples."""
    new = poisoned.is_poison
    if not bool(new.any()):
        raise DataError(f"{poisoned.name}: training.mode finetune needs new samples, but the attack changed none")
    clean = ~new
    replay = select_indices(candidates=clean, k=int(round(replay_fraction * int(clean.sum()))), generator=generator)
    keep = new.clone()
    keep[replay] = True
    return poisoned.clean_view().subset(keep), int(new.sum()), len(replay)


def train_poisoned(ctx: RunContext, poisoned: PoisonedDataset, *, description: str,
                   notes: list[str]) -> tuple[nn.Module, dict | None]:
    """The poisoned model as ``training.mode`` says: retrained like the baseline (``scratch``), or a copy of the
    clean baseline fine-tuned on the new samples (``finetune``); returns it and the fine-tuning facts (or None)."""
    recipe = ctx.recipe
    if recipe.mode != "finetune":
        notes.append("poisoned model: the baseline's architecture, recipe and seed; only the training data differ")
        return ctx.train_like_baseline(poisoned, description=description), None
    ft = recipe.finetune
    data, n_new, n_replay = finetune_data(poisoned, replay_fraction=ft.replay_fraction,
                                          generator=torch.Generator().manual_seed(int(ctx.seed)))
    update = {"epochs": ft.epochs, "early_stopping_patience": None, "batch_size": min(recipe.batch_size, len(data))}
    if ft.lr is not None:
        update["lr"] = ft.lr
    model = copy.deepcopy(ctx.baseline)
    model = ctx.train_like_baseline(data, model=model, recipe=recipe.model_copy(update=update),
                                    description=f"{description} (fine-tuning)")
    source = "model.checkpoint" if ctx.profile.model.checkpoint else "the run's clean baseline"
    notes.append(f"poisoned model: fine-tuned from {source} (training.mode finetune) for {ft.epochs} epochs on the "
                 f"{n_new} new (poisoned) samples" + (f" and {n_replay} replayed clean samples" if n_replay else
                                                      " only") + ", not retrained from scratch")
    log.info("fine-tuned on %d new and %d replayed samples", n_new, n_replay)
    return model, {"new_samples": n_new, "replayed_samples": n_replay, "epochs": ft.epochs,
                   "lr": float(update.get("lr", recipe.lr)), "start": source}
