"""DAWN: Dynamic Adversarial Watermarking of Neural Networks (Szyller, Atli, Marchal & Asokan, ACM MM 2021): a keyed
hash of each query selects a small share of the answers to alter; a copy trained on the answers learns them."""
from __future__ import annotations

import hashlib
import hmac

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.utils.validate import check_fraction


def image_bytes(x: torch.Tensor) -> list[bytes]:
    """Per image, its 8-bit quantised pixels (what the service decodes; a re-sent image hashes the same)."""
    q = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [bytes(q[i].numpy().tobytes()) for i in range(len(q))]


class ResponseWatermark:
    """HMAC-SHA256(``key``, image) selects an image with probability ``rate``; its answer becomes a wrong label,
    chosen by the same digest uniformly among the other ``num_classes - 1`` classes (so an independent model agrees
    with it at a rate of at most 1 / (num_classes - 1) of its errors). Deterministic: the same image always gets
    the same answer (an attacker cannot average the watermark away by repeating queries), as in DAWN.
    """

    def __init__(self, *, key: bytes, num_classes: int, rate: float = 0.005):
        if len(key) < 16:
            raise ConfigError(f"ResponseWatermark: the key must be at least 16 bytes, got {len(key)}")
        if num_classes < 2:
            raise ConfigError(f"ResponseWatermark: num_classes must be at least 2, got {num_classes}")
        self._key, self.num_classes = bytes(key), int(num_classes)
        self.rate = float(check_fraction(self, "rate", rate))

    def digests(self, x: torch.Tensor) -> list[bytes]:
        return [hmac.new(self._key, b, hashlib.sha256).digest() for b in image_bytes(x)]

    def select(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of watermarked images, their watermark labels; -1 elsewhere) given the model's ``labels``."""
        mask, out = torch.zeros(len(x), dtype=torch.bool), torch.full((len(x),), -1, dtype=torch.long)
        for i, d in enumerate(self.digests(x)):
            if int.from_bytes(d[:8], "big") / 2.0 ** 64 < self.rate:
                mask[i] = True
                shift = 1 + int.from_bytes(d[8:16], "big") % (self.num_classes - 1)
                out[i] = (int(labels[i]) + shift) % self.num_classes
        return mask, out

    def apply(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``logits`` (or probabilities: any per-class scores) with, for each selected image, the top class's and
        the watermark class's entries swapped: the answer's label becomes the watermark label, its confidence is
        unchanged."""
        top = logits.argmax(1)
        mask, wm = self.select(x, top.cpu())
        if not bool(mask.any()):
            return logits
        out = logits.clone()
        rows = mask.nonzero().flatten().to(logits.device)
        t, w = top[rows], wm[mask].to(logits.device)
        vt, vw = out[rows, t].clone(), out[rows, w].clone()
        out[rows, t], out[rows, w] = vw, vt
        return out


class WatermarkedModel(nn.Module):
    """``model`` whose answers carry ``watermark`` (what the deployed system serves; offline stand-in)."""

    def __init__(self, model: nn.Module, watermark: ResponseWatermark):
        super().__init__()
        self.model, self.watermark = model, watermark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.watermark.apply(self.model(x), x)
