"""Model inspection: per-layer weight statistics and histograms; layers whose statistics are outliers are flagged.

For every weight tensor: mean, std, max |w|, kurtosis and the share of near-zero weights. A layer is flagged when
its kurtosis or its max |w| / std ratio is an outlier among the model's layers (robust z-score, median/MAD, above
``z_threshold``): backdoor and fine-tuning attacks often leave a few unusually large weights in one layer.
Diagnostics only; ``histograms_`` holds per-layer counts for plotting.
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.registry import register
from safedl.utils.validate import check_positive, check_range


def _robust_z(v: torch.Tensor) -> torch.Tensor:
    med = v.median()
    mad = (v - med).abs().median().clamp_min(1e-12) * 1.4826
    return (v - med) / mad


@register("inspector", "model_inspection")
class ModelInspection:
    """Per-layer weight statistics and histograms; robust-z outlier layers are flagged."""

    def __init__(self, *, z_threshold: float = 3.5, bins: int = 50):
        self.z_threshold = check_positive(self, "z_threshold", z_threshold)
        self.bins = check_range(self, "bins", bins, low=2, high=1000, integer=True)

    def inspect(self, model: nn.Module, **_: object) -> dict:
        layers, hist = [], {}
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.ndim < 2:
                continue
            w = p.detach().float().cpu().flatten()
            mean, std = float(w.mean()), float(w.std())
            z = (w - mean) / max(std, 1e-12)
            layers.append({"layer": name, "n": w.numel(), "mean": mean, "std": std, "max_abs": float(w.abs().max()),
                           "kurtosis": float((z**4).mean() - 3.0), "near_zero": float((w.abs() < 1e-3 * max(std, 1e-12)).float().mean()),
                           "max_over_std": float(w.abs().max()) / max(std, 1e-12)})
            lo, hi = float(w.min()), float(w.max())
            hist[name] = {"counts": torch.histc(w, bins=self.bins, min=lo, max=hi).tolist(), "range": [lo, hi]}
        flagged = []
        if len(layers) >= 3:
            kz = _robust_z(torch.tensor([l["kurtosis"] for l in layers]))
            rz = _robust_z(torch.tensor([l["max_over_std"] for l in layers]))
            for l, a, b in zip(layers, kz.tolist(), rz.tolist()):
                l["kurtosis_z"], l["max_over_std_z"] = a, b
                if a > self.z_threshold or b > self.z_threshold:
                    flagged.append(l["layer"])
        self.histograms_ = hist
        self.report_ = {"layers": layers, "flagged_layers": flagged}
        return self.report_
