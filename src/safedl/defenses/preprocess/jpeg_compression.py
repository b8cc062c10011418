"""JPEG compression as an input defense (Dziugaite et al. 2016; Das et al. 2017; Guo et al. ICLR 2018), with the
differentiable JPEG approximation of Shin & Song ("JPEG-resistant Adversarial Images", NeurIPS-W 2017) for BPDA."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_range

# The standard JPEG quantization tables (ITU-T T.81, Annex K), row-major.
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def quant_table(base: list[int], quality: int) -> torch.Tensor:
    """libjpeg's quality scaling of a base table (the one Pillow uses)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = torch.tensor([(b * scale + 50) // 100 for b in base], dtype=torch.float32).clamp(1, 255)
    return q.view(8, 8)


def _dct_matrix() -> torch.Tensor:
    m = torch.zeros(8, 8)
    for k in range(8):
        for n in range(8):
            m[k, n] = math.cos(math.pi * (2 * n + 1) * k / 16) * (math.sqrt(1 / 8) if k == 0 else math.sqrt(2 / 8))
    return m


_D = _dct_matrix()
_RGB2YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def soft_round(x: torch.Tensor) -> torch.Tensor:
    """Shin & Song's differentiable rounding: round(x) + (x - round(x))^3 (value close to round, gradient nonzero)."""
    r = torch.round(x)
    return r + (x - r) ** 3


@register("preprocessor", "jpeg_compression")
class JPEGCompression(Preprocessor):
    """Encode and decode every image as JPEG at ``quality`` with Pillow (4:4:4, no chroma subsampling).

    ``forward`` runs the real codec (not differentiable); ``approximation`` is a differentiable JPEG in torch
    (colour transform, 8x8 block DCT, quantization with the same tables and a cubic soft rounding) that BPDA
    back-propagates through.
    """

    differentiable = False

    def __init__(self, *, quality: int = 75):
        super().__init__()
        self.quality = check_range(self, "quality", quality, low=1, high=100, integer=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        c = x.shape[1]
        if c not in (1, 3):
            raise ValueError(f"jpeg_compression: images must have 1 or 3 channels, got {c}")
        arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty_like(arr)
        mode = "L" if c == 1 else "RGB"
        for i, img in enumerate(arr):  # the codec itself works one image at a time
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if c == 1 else img, mode=mode).save(buf, format="JPEG", quality=self.quality,
                                                                             subsampling=0)
            buf.seek(0)
            dec = np.asarray(Image.open(buf).convert(mode))
            out[i] = dec[..., None] if c == 1 else dec
        return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        dev, dt = x.device, x.dtype
        v = x * 255
        if c == 3:
            v = torch.einsum("ij,njhw->nihw", _RGB2YCC.to(dev, dt), v)
            v = v + torch.tensor([0.0, 128.0, 128.0], device=dev, dtype=dt).view(1, 3, 1, 1)
        ph, pw = (-h) % 8, (-w) % 8
        v = F.pad(v, (0, pw, 0, ph), mode="replicate") - 128
        hh, ww = v.shape[-2:]
        blocks = v.reshape(n, c, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5)  # N C bh bw 8 8
        d = _D.to(dev, dt)
        coef = d @ blocks @ d.T
        tables = [quant_table(_LUMA, self.quality)] + [quant_table(_CHROMA, self.quality)] * (c - 1)
        q = torch.stack(tables).to(dev, dt).view(1, c, 1, 1, 8, 8)
        coef = soft_round(coef / q) * q
        rec = d.T @ coef @ d
        v = rec.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww)[..., :h, :w] + 128
        if c == 3:
            v = v - torch.tensor([0.0, 128.0, 128.0], device=dev, dtype=dt).view(1, 3, 1, 1)
            v = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB2YCC).to(dev, dt), v)
        return (v / 255).clamp(0, 1)
