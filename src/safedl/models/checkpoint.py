"""Checkpoints: weights plus the metadata needed to rebuild the model and to know what it was trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedl.errors import CheckpointError
from safedl.models.normalize import with_normalization
from safedl.models.zoo import build_model
from safedl.utils.io import atomic_torch_save


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``{"state_dict", "meta"}`` atomically. ``meta`` must hold ``arch``, ``arch_params``, ``in_channels``,
    ``num_classes``, ``image_size``, ``mean``, ``std`` to be reloadable with ``load_checkpoint``; it may also hold
    the data hash, the recipe and the accuracy."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(path, {"state_dict": state, "meta": dict(meta)})


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a zoo model from a checkpoint written by ``save_checkpoint``; returns (model in eval mode, meta)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        net = build_model(meta["arch"], in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                          image_size=meta["image_size"], **meta.get("arch_params", {}))
        model = with_normalization(net, meta["mean"], meta["std"])
        model.load_state_dict(blob["state_dict"])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    return model.to(device).eval(), meta
