"""Checkpoints: weights plus the metadata needed to rebuild the model and to know what it was trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedl.errors import CheckpointError
from safedl.models.normalize import unwrap, with_normalization
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


def load_network_state(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Load a state dict into ``model`` (a Normalize-wrapped network or a bare one), accepting what users bring:
    the wrapped model's own keys, the bare network's keys (e.g. ``torchvision.models.resnet18().state_dict()``
    into the zoo's ``resnet18``: normalization stays the profile's), and either with DataParallel's ``module.``
    prefix. Returns which layout matched; raises CheckpointError naming missing and unexpected keys."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError("not a state dict (a mapping of parameter names to tensors)")
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    targets = [("model", model)] + ([("network", unwrap(model))] if unwrap(model) is not model else [])
    for name, target in targets:
        want = set(target.state_dict())
        if set(stripped) == want:
            try:
                target.load_state_dict(stripped)
            except RuntimeError as exc:  # the right names, the wrong shapes
                raise CheckpointError(f"the parameter shapes do not fit the {name}: {str(exc).splitlines()[-1]}"
                                      ) from None
            return name
    want = set(targets[-1][1].state_dict())
    missing, unexpected = sorted(want - set(stripped)), sorted(set(stripped) - want)
    raise CheckpointError(f"its parameter names fit neither the model nor its network: missing {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''}")
