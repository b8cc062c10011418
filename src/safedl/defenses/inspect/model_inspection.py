"""Model inspection against a clean reference: weight and activation statistics compared layer by layer.

The reference is a model of the same architecture trained with the same recipe on data known to be clean (the
baseline). For every weight tensor of both models: std, max |w| / std and kurtosis; and on the trusted images, for
the penultimate features: the share of dormant units (mean activation below 1% of the layer's largest) and the
mean activation. A statistic is flagged when the inspected model's value differs from the reference's by more than a
factor ``max_ratio`` (``|log(model / reference)| > log(max_ratio)``); the model is suspicious when any is flagged.
Backdoors are claimed to leave unusually large weights and dormant units that only the trigger uses (Liu et al.,
"Fine-Pruning", RAID 2018). Measured (8x8 digits, tiny_cnn, the test recipe, reference = the seed-0 clean model):
clean models of seeds 1 and 2 are not flagged (largest |log ratio| 0.32, the dormant share), but neither are models
backdoored with a 10% 2x2 patch at seeds 0 and 1 (largest 0.41 / 0.22 vs the 0.405 cut): these statistics do not
reveal a backdoor trained in from scratch; they do reveal tampered weights (a test plants them). Diagnostics only;
``histograms`` hold per-layer weight counts for plotting. ``layers`` (default: all) restricts the inspection to the
named layers: module names as in ``model.named_modules()`` (e.g. ``1.conv.0``; a name covers the layers inside
it) and ``penultimate`` for the activation statistics; a name the model does not have is a ConfigError listing them.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_range


def _weight_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith("weight") or p.ndim < 2:
            continue
        w = p.detach().float().cpu().flatten()
        std = max(float(w.std()), 1e-12)
        z = (w - w.mean()) / std
        out[name] = {"std": std, "max_over_std": float(w.abs().max()) / std, "kurtosis": float((z**4).mean())}
    return out


def _activation_stats(model: nn.Module, data: Dataset, device) -> dict[str, float]:
    from safedl.models.features import extract_features

    f = extract_features(model.to(device), data.x).float()
    mean = f.mean(0)
    dormant = float((mean < 0.01 * mean.max().clamp_min(1e-12)).float().mean())
    return {"dormant_share": max(dormant, 1.0 / f.shape[1]), "mean_activation": max(float(mean.mean()), 1e-12)}


@register("inspector", "model_inspection")
class ModelInspection:
    """Weight and penultimate-activation statistics of a model against a clean reference model."""

    trusted_data: ClassVar[str] = "required"
    model_needs: tuple[str, ...] = ("features",)  # what the model must offer (safedl.models.features.model_problems)

    def __init__(self, *, max_ratio: float = 1.5, bins: int = 50, layers: list[str] | None = None):
        if layers is not None and (isinstance(layers, str) or not layers
                                   or not all(isinstance(n, str) and n for n in layers)):
            raise ConfigError(f"model_inspection: layers must be a non-empty list of layer names, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        self.max_ratio = check_range(self, "max_ratio", max_ratio, low=1.0, low_inclusive=False)
        self.bins = check_range(self, "bins", bins, low=2, high=1000, integer=True)

    def inspect(self, model: nn.Module, *, reference: nn.Module, data: Dataset,
                device: str | torch.device = "cpu") -> dict:
        ws, wr = _weight_stats(model), _weight_stats(reference)
        ws = {n: v for n, v in ws.items() if self._chosen(n, model)}
        stats = {f"{layer}.{k}": (v, wr[layer][k]) for layer, d in ws.items() for k, v in d.items()}
        if self.layers is None or "penultimate" in self.layers:
            am, ar = _activation_stats(model, data, device), _activation_stats(reference, data, device)
            stats.update({f"penultimate.{k}": (am[k], ar[k]) for k in am})
        rows, flagged = [], []
        for key, (v, r) in stats.items():
            lr = math.log(max(v, 1e-12) / max(r, 1e-12))
            rows.append({"statistic": key, "model": v, "reference": r, "log_ratio": lr})
            if abs(lr) > math.log(self.max_ratio):
                flagged.append(key)
        hist = {}
        for name, p in model.named_parameters():
            if name in ws:
                w = p.detach().float().cpu().flatten()
                lo, hi = float(w.min()), float(w.max())
                hist[name] = {"counts": torch.histc(w, bins=self.bins, min=lo, max=hi).tolist(), "range": [lo, hi]}
        self.report_ = {"suspicious": bool(flagged), "flagged_classes": [], "flagged_statistics": flagged,
                        "statistics": rows, "histograms": hist, "layers": self.layers or "all"}
        return self.report_

    def _chosen(self, param: str, model: nn.Module) -> bool:
        """Whether weight ``param`` (e.g. ``1.conv.0.weight``) lies in one of ``layers``; unknown names raise."""
        if self.layers is None:
            return True
        known = {n for n, _ in model.named_modules() if n}
        bad = [n for n in self.layers if n != "penultimate" and n not in known]
        if bad:
            raise ConfigError(f"model_inspection: layers {bad} are not layers of this model; its layers are: "
                              f"{', '.join(sorted(known))}, and penultimate")
        return any(param == f"{n}.weight" or param.startswith(f"{n}.") for n in self.layers)
