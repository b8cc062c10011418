"""A content-addressed cache of trained models, shared by runs and profiles.

A model trained by :func:`cached_train` is stored under the sha256 of everything the training depends on: the
architecture (the module tree), the initial weights (so the initialisation seed), the training data and sample
weights, the validation data (early stopping and history), the recipe, the training seed, the device type and the
torch version. The same key gives the same trained weights, so a hit loads them instead of training; the torch RNG
state after training is stored too and restored on a hit, so what runs next draws the same random numbers.

Where: ``$SAFEDL_CACHE_DIR`` or ``$XDG_CACHE_HOME/safedl/models`` (``~/.cache/safedl/models``);
``SAFEDL_MODEL_CACHE=off`` turns it off. ``safedl cache list`` and ``safedl cache clear`` manage it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.models.train import TrainRecipe, TrainReport, train_model
from safedl.utils.io import atomic_torch_save, atomic_write_json, json_hash, tensor_hash

log = logging.getLogger(__name__)

#: bump when what a key covers changes
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$SAFEDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/safedl/models``, else ``~/.cache/safedl/models``."""
    if os.environ.get("SAFEDL_CACHE_DIR"):
        return Path(os.environ["SAFEDL_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "safedl" / "models"


def cache_enabled() -> bool:
    """False when ``SAFEDL_MODEL_CACHE`` is ``off``, ``0``, ``false`` or ``no``."""
    return os.environ.get("SAFEDL_MODEL_CACHE", "on").strip().lower() not in {"off", "0", "false", "no"}


@dataclass(frozen=True)
class CachedModel:
    """One cache entry: its key, what it was trained for and when, and its size on disk."""

    key: str
    description: str
    created: float
    train_time_s: float
    size_bytes: int


class ModelCache:
    """Trained models by content key, one folder per key (``model.pt`` weights, ``meta.json``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits: list[str] = []  # descriptions of the trainings this object answered from the cache

    def key(self, model: nn.Module, train: Dataset, *, recipe: TrainRecipe, seed: int, val: Dataset | None,
            device: torch.device | str, sample_weight: torch.Tensor | None = None) -> str:
        """The content key of training ``model`` (as it is now, untrained) on ``train`` with ``recipe`` and ``seed``."""
        state = model.state_dict()
        parts = {
            "version": CACHE_VERSION, "torch": torch.__version__, "device": torch.device(device).type,
            "architecture": repr(model), "init": tensor_hash(*state.values()), "names": list(state),
            "train": tensor_hash(train.x, train.y),
            "weights": None if sample_weight is None else tensor_hash(sample_weight),
            "val": None if val is None or not len(val) else tensor_hash(val.x, val.y),
            "recipe": recipe.model_dump(mode="json"), "seed": int(seed),
        }
        return json_hash(parts)

    def load(self, key: str, model: nn.Module) -> TrainReport | None:
        """Load the entry's weights into ``model`` and restore the RNG state; None when there is no intact entry."""
        d = self.root / key
        try:
            meta = json.loads((d / "meta.json").read_text())
            blob = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            if d.exists():
                log.warning("model cache: entry %s is unreadable (%s); training again", key[:12], exc)
            return None
        model.load_state_dict(blob["state_dict"])
        torch.set_rng_state(blob["rng_state"])
        r = meta["report"]
        return TrainReport(epochs_run=r["epochs_run"], time_s=r["time_s"], history=r["history"],
                           best_val_accuracy=r["best_val_accuracy"])

    def store(self, key: str, model: nn.Module, report: TrainReport, *, description: str) -> None:
        """Save a trained model under ``key`` (weights first, meta.json last: an entry without it is not used)."""
        d = self.root / key
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_torch_save(d / "model.pt", {"state_dict": state, "rng_state": torch.get_rng_state()})
        atomic_write_json(d / "meta.json", {
            "key": key, "description": description, "created": time.time(),
            "report": {"epochs_run": report.epochs_run, "time_s": report.time_s, "history": report.history,
                       "best_val_accuracy": report.best_val_accuracy}})

    def entries(self) -> list[CachedModel]:
        """Every intact entry, oldest first."""
        out = []
        for d in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append(CachedModel(key=d.name, description=str(meta.get("description", "")),
                                   created=float(meta.get("created", 0.0)),
                                   train_time_s=float(meta.get("report", {}).get("time_s", 0.0)), size_bytes=size))
        return sorted(out, key=lambda e: e.created)

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        n = 0
        for d in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n


def cached_train(model: nn.Module, train: Dataset, *, recipe: TrainRecipe, seed: int, val: Dataset | None = None,
                 device: torch.device | str = "cpu", description: str = "training",
                 sample_weight: torch.Tensor | None = None, cache: ModelCache | None = None,
                 **train_kw: Any) -> tuple[TrainReport, bool]:
    """:func:`train_model`, reusing a cached model with the same content key; returns (report, whether reused).

    Trainings with a custom ``loss_fn`` or an ``on_epoch_end`` callback are never cached (code is not content).
    """
    if cache is None or train_kw.get("loss_fn") is not None or train_kw.get("on_epoch_end") is not None:
        report = train_model(model, train, recipe=recipe, seed=seed, val=val, device=device, description=description,
                             sample_weight=sample_weight, **train_kw)
        return report, False
    key = cache.key(model, train, recipe=recipe, seed=seed, val=val, device=device, sample_weight=sample_weight)
    hit = cache.load(key, model)
    if hit is not None:
        log.info("%s: reusing cached model %s (trained in %.1f s)", description, key[:12], hit.time_s)
        cache.hits.append(description)
        model.to(device).eval()
        return hit, True
    report = train_model(model, train, recipe=recipe, seed=seed, val=val, device=device, description=description,
                         sample_weight=sample_weight, **train_kw)
    cache.store(key, model, report, description=description)
    return report, False


def run_cache() -> ModelCache | None:
    """The cache runs use: the default folder, or None when ``SAFEDL_MODEL_CACHE`` turns it off."""
    return ModelCache() if cache_enabled() else None
