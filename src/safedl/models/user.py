"""User models: a ``module:function`` entry point that returns an nn.Module, or a TorchScript file."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedl.errors import ConfigError


def load_entry_point(spec: str, **kwargs: Any) -> nn.Module:
    """Import ``module:function`` and call it with ``kwargs``; it must return an nn.Module taking [0, 1] images."""
    if ":" not in spec:
        raise ConfigError(f"model entry point {spec!r} must look like 'package.module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as exc:  # ImportError, AttributeError, or any error raised while the module runs
        raise ConfigError(f"model entry point {spec!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"model entry point {spec!r} is a {type(fn).__name__}, not a function")
    try:
        model = fn(**kwargs)
    except TypeError as exc:  # the profile passed arguments the function does not take
        raise ConfigError(f"model entry point {spec!r} rejected its arguments {sorted(kwargs)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model entry point {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_torchscript(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a TorchScript model file (it must take [0, 1] images and include its own normalization)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: TorchScript model file not found")
    try:
        return torch.jit.load(str(p), map_location=map_location)
    except Exception as exc:
        raise ConfigError(f"{p}: not a loadable TorchScript file ({exc})") from None
