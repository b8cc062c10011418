"""Image-statistics detector (our own): spectral high-frequency energy, gradient magnitude and residual kurtosis of
each input image, standardised against clean data.

It rests on the observation that adversarial perturbations add high-frequency energy that natural images of a
domain do not have (e.g. Harder et al., "SpectralDefense", IJCNN 2021). It implements neither SpectralDefense (a
classifier on Fourier features of the network's activations) nor Grosse et al. 2017's statistical test (a kernel
two-sample test on a batch): it is a per-image z-score of three hand-chosen input statistics, model-free."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from safedl.defenses.detect._base import Detector
from safedl.registry import register
from safedl.utils.validate import check_fraction

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def image_statistics(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """N x 3: high-frequency energy fraction, mean gradient magnitude, kurtosis of the Laplacian residual."""
    g = x.mean(1, keepdim=True)
    n, _, h, w = g.shape
    spec = torch.fft.fft2(g - g.mean((2, 3), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(h, device=x.device).abs().view(h, 1)
    fx = torch.fft.fftfreq(w, device=x.device).abs().view(1, w)
    high = (torch.sqrt(fy**2 + fx**2) > cutoff * 0.5).to(x.dtype)  # cutoff as a fraction of the Nyquist frequency
    hf = (spec * high).flatten(1).sum(1) / spec.flatten(1).sum(1).clamp_min(1e-12)
    dy = g[..., 1:, :-1] - g[..., :-1, :-1]
    dx = g[..., :-1, 1:] - g[..., :-1, :-1]
    grad = torch.sqrt(dx**2 + dy**2 + 1e-12).flatten(1).mean(1)
    res = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), _LAPLACE.to(x.device, x.dtype)).flatten(1)
    c = res - res.mean(1, keepdim=True)
    kurt = (c**4).mean(1) / ((c**2).mean(1) ** 2).clamp_min(1e-12)
    return torch.stack([hf, grad, kurt], 1)


@register("detector", "frequency_statistics")
class FrequencyStatistics(Detector):
    """Our per-image detector: largest |z-score| of three input statistics (high-frequency energy, gradients, kurtosis).

    The means and spreads are fitted on clean images; the threshold on the score is calibrated on held-out clean
    images for the target ``fpr`` (nothing is hand-set). It needs no model and is differentiable end to end.
    """

    def __init__(self, *, cutoff: float = 0.5, fpr: float = 0.05, calibration_fraction: float = 0.3,
                 batch_size: int = 1000):
        self.cutoff = float(check_fraction(self, "cutoff", cutoff, allow_zero=False, allow_one=False))
        self._init_common(fpr, calibration_fraction, batch_size)

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        s = image_statistics(x, self.cutoff)
        self.mean_ = s.mean(0)
        self.std_ = s.std(0).clamp_min(1e-8)

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        z = (image_statistics(x, self.cutoff) - self.mean_.to(x.device)) / self.std_.to(x.device)
        return z.abs().max(1).values
