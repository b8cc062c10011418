"""The baseline stage: the undefended model every attack and defense is measured against."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from safedl.data.dataset import Splits
from safedl.models.checkpoint import save_checkpoint
from safedl.models.cache import cached_train, run_cache
from safedl.models.train import accuracy
from safedl.profile import Profile
from safedl.run.cache import StageCache
from safedl.run.prepare import load_user_checkpoint
from safedl.utils.bits import pack as pack_bits
from safedl.utils.clock import StageClock
from safedl.utils.confusion import confusion_counts
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger(__name__)


def baseline_stage(profile: Profile, *, cache: StageCache, key: str, splits: Splits, fresh, model_meta: dict,
                   device: torch.device, base_dir: Path) -> tuple[nn.Module, dict]:
    """The baseline model (trained, loaded from the user's checkpoint, or reused from a finished stage) and its
    results.json entry; runs in the driver's process before the stage graph."""
    p = profile
    seed_everything(p.seed)
    model = fresh().to(device)
    cached = cache.cached("baseline", key)
    ckpt = cache.layout.baseline_model
    if cached is not None and ckpt.is_file():
        log.info("baseline: reusing finished stage")
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model.to(device).eval(), cached["entry"]
    clock = StageClock()
    history: list = []
    reused = False
    if p.model.checkpoint:
        path = Path(p.model.checkpoint)
        path = path if path.is_absolute() else base_dir / path
        load_user_checkpoint(model, path)
        source = f"checkpoint {path}"
    elif p.model.torchscript:
        source = "TorchScript model as given (not retrained)"
    else:
        log.info("baseline: training %s for %d epochs", p.model.arch or p.model.entry_point, p.training.epochs)
        report, reused = cached_train(model, splits.train, recipe=p.training, seed=p.seed, val=splits.val,
                                      device=device, description="baseline", cache=run_cache())
        history = report.history
        source = "trained (reused from the model cache)" if reused else "trained"
    model.eval()
    pred = predict(model, splits.test.x.to(device)).cpu()
    correct = pred == splits.test.y
    per_class = []
    for c in range(splits.num_classes):
        m = splits.test.y == c
        per_class.append(float(correct[m].float().mean()) if bool(m.any()) else float("nan"))
    entry = {
        "source": source,
        "metrics": {"clean_accuracy": proportion(int(correct.sum()), len(correct)),
                    "val_accuracy": proportion(round(accuracy(model, splits.val, device=device) * len(splits.val)),
                                               len(splits.val)) if len(splits.val) else None},
        "per_class": {"clean_accuracy": per_class},
        "per_image": {"clean_correct": pack_bits(correct)},  # test split order; for paired comparisons
        "confusion": confusion_counts(pred, splits.test.y, splits.num_classes),  # clean, row = true class
        "history": history,
        "time_s": clock.wall(),
        "cpu_s": clock.cpu(),
        "recipe": p.training.model_dump(),
        "notes": _baseline_notes(p, splits),
        "reused_models": ["baseline"] if reused else [],
    }
    if splits.field is not None:  # dataset.field_test: the held-out field set
        field_correct = predict(model, splits.field.x.to(device)).cpu() == splits.field.y
        entry["metrics"]["field_accuracy"] = proportion(int(field_correct.sum()), len(field_correct))
        entry["per_image"]["field_correct"] = pack_bits(field_correct)
    meta = dict(model_meta, data_hash=splits.hashes()["train"], recipe=p.training.model_dump(),
                clean_accuracy=entry["metrics"]["clean_accuracy"]["value"])
    save_checkpoint(ckpt, model, meta)
    cache.finish("baseline", key, entry)
    return model, entry


def _baseline_notes(profile: Profile, splits: Splits) -> list[str]:
    n_eval, n_test = profile.evaluation.n_eval, len(splits.test)
    if n_eval > n_test:
        msg = (f"evaluation.n_eval = {n_eval} is larger than the test split ({n_test} images): attacks and defenses "
               f"are measured on all {n_test} test images")
        log.warning(msg)
        return [msg]
    return []
