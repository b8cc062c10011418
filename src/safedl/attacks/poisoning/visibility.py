"""How visible a poison is: L-inf, L2 and SSIM between poisoned and original images, batched in torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g.view(-1, 1) * g.view(1, -1)).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity (Wang et al., "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE TIP 2004): Gaussian window (11, sigma 1.5), K1 = 0.01, K2 = 0.03, valid convolution, mean over
    the SSIM map and channels. Windows shrink to the image for small images (8x8 digits). Returns N values."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two N x C x H x W tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) == 0:
        return torch.empty(0, device=a.device)
    a, b = a.float(), b.float()
    c = a.shape[1]
    size = min(window_size, a.shape[2], a.shape[3])
    if size % 2 == 0:
        size -= 1
    sig = sigma * size / window_size if size < window_size else sigma
    w = _gaussian_window(size, sig, c, a.device, a.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def visibility(original: torch.Tensor, poisoned: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample L-inf and L2 distances and SSIM between original and poisoned images (N each)."""
    d = (poisoned.float() - original.float()).flatten(1)
    return {"linf": d.abs().amax(1) if d.shape[1] else torch.zeros(len(d)), "l2": d.norm(dim=1),
            "ssim": ssim(original, poisoned)}
