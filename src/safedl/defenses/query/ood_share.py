"""The out-of-distribution share of a query stream: a per-query naturalness test fitted on the training images and
the one-sided binomial test of how many of a key's recent queries fail it (shared by the copycat and Sybil
detectors)."""
from __future__ import annotations

import math

import torch

from safedl.errors import ConfigError
from safedl.utils.validate import check_fraction, check_positive


class PixelSubspace:
    """Per query, the L2 residual of the image outside the top ``components`` principal directions of the
    training images (PCA reconstruction error, e.g. Hoffmann, "Kernel PCA for novelty detection", 2007, linear
    case); a residual above ``threshold_`` marks the query out-of-distribution.

    ``fit(x, quantile=...)`` estimates the subspace on every other training image and sets ``threshold_`` to the
    ``1 - quantile`` quantile of the residuals of the held-out half (so a benign image fails about ``quantile`` of
    the time, measured on images the subspace was not fitted to). Natural images of another distribution and
    Jacobian-augmented points (dense sign steps) leave the subspace.
    """

    def __init__(self, *, components: int = 16):
        self.components = check_positive(self, "components", components, integer=True)
        self.mean_: torch.Tensor | None = None
        self.basis_: torch.Tensor | None = None
        self.threshold_: float | None = None

    def fit(self, x: torch.Tensor, *, quantile: float = 0.05) -> "PixelSubspace":
        q = float(check_fraction(self, "quantile", quantile))
        if len(x) < 4:
            raise ConfigError(f"PixelSubspace: fit needs at least 4 images, got {len(x)}")
        flat = x.detach().flatten(1).double().cpu()
        fit_part, held = flat[0::2], flat[1::2]
        self.mean_ = fit_part.mean(0)
        r = min(self.components, fit_part.shape[1], len(fit_part))
        self.basis_ = torch.linalg.svd(fit_part - self.mean_, full_matrices=False).Vh[:r].contiguous()
        self.threshold_ = float(torch.quantile(self.residual(held), 1.0 - q))
        return self

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """N residual norms (float64)."""
        if self.mean_ is None or self.basis_ is None:
            raise ConfigError("PixelSubspace: not fitted; call fit(training images) or load a calibration record")
        flat = x.detach().flatten(1).double().cpu()
        if flat.shape[1] != self.mean_.shape[0]:
            raise ConfigError(f"PixelSubspace: images have {flat.shape[1]} values, the subspace was fitted to "
                              f"{self.mean_.shape[0]}")
        c = flat - self.mean_
        return (c - (c @ self.basis_.T) @ self.basis_).norm(dim=1)

    def outside(self, x: torch.Tensor) -> torch.Tensor:
        """Bool N: the query's residual exceeds ``threshold_``."""
        assert self.threshold_ is not None
        return self.residual(x) > self.threshold_

    def to_record(self) -> dict:
        """JSON-ready state (the calibration file keeps it)."""
        if self.mean_ is None or self.basis_ is None or self.threshold_ is None:
            raise ConfigError("PixelSubspace: not fitted")
        return {"components": self.components, "threshold": self.threshold_, "mean": self.mean_.tolist(),
                "basis": self.basis_.tolist()}

    @classmethod
    def from_record(cls, rec: dict) -> "PixelSubspace":
        try:
            out = cls(components=int(rec["components"]))
            out.mean_ = torch.tensor(rec["mean"], dtype=torch.float64)
            out.basis_ = torch.tensor(rec["basis"], dtype=torch.float64).reshape(-1, len(out.mean_))
            out.threshold_ = float(rec["threshold"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"PixelSubspace: bad record ({exc}); needs components, threshold, mean, basis") from None
        return out


def binomial_tail(k: torch.Tensor, n: torch.Tensor, p: float) -> torch.Tensor:
    """P[Binomial(n, p) >= k] elementwise (float64; 1 where k <= 0)."""
    from scipy.stats import binom

    k_np, n_np = k.double().numpy(), n.double().numpy()
    return torch.from_numpy(binom.sf(k_np - 1, n_np, p)).double()


def window_counts(history: torch.Tensor, new: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query of ``new`` (bool), the number of True and of queries among the last ``window`` queries up to
    it (``history`` then ``new``, in order)."""
    seq = torch.cat([history.long(), new.long()])
    cum = torch.cat([torch.zeros(1, dtype=torch.long), seq.cumsum(0)])
    end = torch.arange(len(history) + 1, len(seq) + 1)
    start = (end - window).clamp_min(0)
    return cum[end] - cum[start], end - start


def suspicion(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p / log alpha: > 1 exactly when p < alpha (the threshold-unit score of ``QueryVerdict``)."""
    return p.clamp_min(1e-300).log() / math.log(alpha)
