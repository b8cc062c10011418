"""Tensor helpers shared by attacks, defenses and training."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Only modules whose mode differs are written (``nn.Module.__setattr__`` is slow: writing every submodule's flag
    twice cost about 1 ms a call for a small CNN, on every served request)."""
    modes = [(m, m.training) for m in model.modules()]
    if any(was_training for _, was_training in modes):
        model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            if m.training != was_training:
                m.training = was_training


@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily stop gradient tracking for parameters, so input gradients skip weight-gradient work."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits for x in eval mode, batched, on x's device."""
    dev = model_device(model)
    outs = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i : i + batch_size].to(dev)).to(x.device))
    if not outs:
        return torch.empty(0, 0, device=x.device)
    return torch.cat(outs)


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels for x, batched."""
    return predict_logits(model, x, batch_size=batch_size).argmax(1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from safedl.errors import ConfigError

        raise ConfigError(f"--device {device!s}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    return dev
