"""Helpers of the service tests: images as bytes, a tiny stand-in bundle, free ports."""
from __future__ import annotations

import io
import socket
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


def png_bytes(img: torch.Tensor, fmt: str = "PNG") -> bytes:
    """A float [C, H, W] image in [0, 1] as PNG/JPEG/BMP/WEBP bytes (8-bit)."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr[0].numpy(), "L") if arr.shape[0] == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def quantized(img: torch.Tensor) -> torch.Tensor:
    """What the service sees after an 8-bit PNG round trip."""
    return (img.clamp(0, 1) * 255).round() / 255


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- temporary stand-in for safedl.deploy until it lands on main -------------------------------------------------
@dataclass(frozen=True)
class FakeDecision:
    labels: torch.Tensor
    probs: torch.Tensor
    rejected: torch.Tensor
    reasons: list
    detector_scores: dict
    thresholds: dict


class FakePipeline:
    """model -> softmax; one 'brightness' detector (mean pixel over 0.9 is rejected)."""

    def __init__(self, model, shape=(1, 8, 8), num_classes=10):
        self.model, self.input_shape = model, shape
        self.class_names = [f"digit_{i}" for i in range(num_classes)]
        self.num_classes = num_classes

    def decide(self, x):
        with torch.no_grad():
            p = self.model(x).softmax(1)
        score = x.mean((1, 2, 3))
        rej = score > 0.9
        return FakeDecision(p.argmax(1), p, rej, ["detector:brightness" if r else None for r in rej.tolist()],
                            {"brightness": score}, {"brightness": 0.9})


@dataclass
class FakeBundle:
    pipeline: object
    manifest: dict = field(default_factory=lambda: {"data": {"shape": [1, 8, 8]}, "metrics": {"clean_accuracy": 0.95}})
    version: str = "fakefake0001"
