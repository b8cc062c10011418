"""The one way to read a model's penultimate representation: a forward hook, so it works on any nn.Module.

Feature-space defenses (spectral signatures, activation clustering, anomaly detection, influence functions, the
Mahalanobis detector) and feature-collision poisoning need "the representation the classifier head sees". Zoo
models expose it as ``features(x)``; a user's own model (an ``nn.Sequential`` CNN from an entry point, a checkpoint
or a TorchScript file) usually does not. Here it is read with a forward hook:

- by default, the INPUT of the model's last ``nn.Linear`` (in registration order), flattened to N x D: for every
  zoo model this is exactly ``features(x)``;
- or the OUTPUT of the module at ``layer`` (a path as in ``model.named_modules()``, e.g. ``"1.6"`` or
  ``"backbone.pool"``), set by the profile key ``model.feature_layer`` and carried on the model with
  ``set_feature_layer``.

The hook keeps the autograd graph (callers that need gradients through the features, e.g. feature collision, get
them). PyTorch runs no Python hooks inside a compiled TorchScript model; there the helper falls back to the model's
own ``features`` method when it was exported, and otherwise fails with a clear ``ConfigError``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.utils.tensors import eval_mode, model_device

_ATTR = "safedl_feature_layer"
HEAD_INPUT = "<input of the last nn.Linear>"  # layer= value: ignore the model's feature_layer setting


def set_feature_layer(model: nn.Module, layer: str | None) -> nn.Module:
    """Record which module's output is the model's feature representation (None: the last linear layer's input)."""
    if layer is not None:
        object.__setattr__(model, _ATTR, layer)
    return model


def _modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        return list(model.named_modules())
    except Exception:  # noqa: BLE001 - exotic containers; treated as having no submodules
        return [("", model)]


def _is_scripted(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def last_linear(model: nn.Module) -> nn.Module:
    """The model's last ``nn.Linear`` in registration order (the classifier head of every zoo model)."""
    linears = [m for _, m in _modules(model)
               if isinstance(m, nn.Linear) or getattr(m, "original_name", None) == "Linear"]  # scripted Linear
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer whose input could serve as its features; "
                          "name the feature layer with the profile key model.feature_layer (a module path)")
    return linears[-1]


def feature_module(model: nn.Module, layer: str | None = None) -> tuple[nn.Module, bool]:
    """(module, read_input): the hooked module and whether its input (True) or output (False) is the feature."""
    layer = layer if layer is not None else getattr(model, _ATTR, None)
    if layer is None or layer == HEAD_INPUT:
        return last_linear(model), True
    found = dict(_modules(model))
    if layer not in found or layer == "":
        names = [n for n in found if n][:30]
        raise ConfigError(f"model.feature_layer {layer!r}: no such module in {type(model).__name__}; module paths "
                          f"are: {', '.join(names) or '(none)'}")
    return found[layer], False


def features(model: nn.Module, x: torch.Tensor, *, layer: str | None = None) -> torch.Tensor:
    """N x D features of ``x`` (on the model's device, in the autograd graph when ``x`` or the weights need it)."""
    if _is_scripted(model):
        return _scripted_features(model, x, layer)
    module, read_input = feature_module(model, layer)
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        t = inp[0] if read_input else out
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"the feature layer of {type(model).__name__} gives a {type(t).__name__}, not a tensor")
        got.append(t)

    h = module.register_forward_hook(hook)
    try:
        model(x)
    finally:
        h.remove()
    if not got:
        raise ConfigError(f"the feature layer of {type(model).__name__} ({type(module).__name__}) is never called by "
                          "its forward(); name another layer with model.feature_layer")
    return got[-1].flatten(1)


def _is_sequential(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) or getattr(model, "original_name", None) == "Sequential"


def _walk(model: nn.Module, x: torch.Tensor, target: nn.Module, read_input: bool) -> tuple[torch.Tensor, bool]:
    """Run a (scripted) Sequential child by child; stop at ``target`` and return its input or output."""
    for child in model.children():
        if child is target:
            return (x if read_input else child(x)), True
        if _is_sequential(child):
            x, found = _walk(child, x, target, read_input)
            if found:
                return x, True
        else:
            x = child(x)
    return x, False


def _scripted_features(model: nn.Module, x: torch.Tensor, layer: str | None) -> torch.Tensor:
    """TorchScript runs no Python hooks inside compiled code: use an exported ``features`` method, or run a scripted
    Sequential one child at a time up to the feature layer."""
    layer = layer if layer is not None else getattr(model, _ATTR, None)
    if layer in (None, HEAD_INPUT) and hasattr(model, "features"):
        return model.features(x).flatten(1)
    if _is_sequential(model):
        target, read_input = feature_module(model, layer)
        out, found = _walk(model, x, target, read_input)
        if found:
            return out.flatten(1)
    raise ConfigError(f"a TorchScript model ({getattr(model, 'original_name', type(model).__name__)}) runs no Python "
                      "forward hooks inside its compiled forward and its feature layer is not a step of a scripted "
                      "nn.Sequential, so its features cannot be read; script an "
                      "nn.Sequential, export a features(x) method with @torch.jit.export, or give the model as an "
                      "entry point instead")


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, *, layer: str | None = None,
                     batch_size: int = 512) -> torch.Tensor:
    """Batched ``features`` without gradients, in eval mode, returned on CPU."""
    dev = model_device(model)
    outs = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            outs.append(features(model, x[i : i + batch_size].to(dev), layer=layer).cpu())
    return torch.cat(outs) if outs else torch.empty(0, 0)


def feature_problem(model: nn.Module, sample: torch.Tensor, *, layer: str | None = None) -> str | None:
    """Why features cannot be read from ``model`` on ``sample`` (a couple of images), or None when they can."""
    try:
        extract_features(model, sample, layer=layer)
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - the model's own forward failed on the hooked path
        return f"reading its features failed ({type(exc).__name__}: {exc})"
    return None


NEEDS = {
    "features": "a readable penultimate representation (the input of the last nn.Linear, or model.feature_layer)",
    "head": "a last nn.Linear layer (the classifier head) whose input can be read",
    "conv": "an nn.Conv2d layer",
    "hooks": "Python forward hooks on its layers (not a TorchScript model)",
}


def model_problems(model: nn.Module, needs: Iterable[str], sample: torch.Tensor, *,
                   layer: str | None = None) -> list[str]:
    """Why ``model`` cannot give what a component needs (``NEEDS`` keys), one reason per unmet need."""
    out = []
    for need in needs:
        if need == "features":
            why = feature_problem(model, sample, layer=layer)
        elif need == "head":
            why = feature_problem(model, sample, layer=HEAD_INPUT)
        elif need == "conv":
            why = None if any(isinstance(m, nn.Conv2d) for _, m in _modules(model)) else \
                f"{type(model).__name__} has no nn.Conv2d layer"
        elif need == "hooks":
            why = "a TorchScript model runs no Python forward hooks inside its compiled forward" \
                if _is_scripted(model) else None
        else:
            raise ValueError(f"unknown model need {need!r}; known: {', '.join(NEEDS)}")
        if why:
            out.append(f"needs {NEEDS[need]}: {why}")
    return out
