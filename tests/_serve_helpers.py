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


def make_bundle(model, splits, out, *, fpr: float = 0.1):
    """Export the default deployed system of the tests (feature squeezing + its detector around ``model``, digits)
    as a real bundle at ``out``, through ``safedl.deploy.export_bundle``."""
    from safedl import registry
    from safedl.deploy import SecurePipeline, export_bundle

    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=4)
    det = registry.create("detector", "feature_squeezing_detector", bit_depth=2, fpr=fpr)
    det.fit(splits.train.x[:300], model=model, x_calibration=splits.val.x, seed=0)
    pipe = SecurePipeline(model=model, preprocessors=[squeeze], detectors=[det],
                          class_names=splits.train.class_names, input_shape=splits.shape)
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": list(splits.mean), "std": list(splits.std)}
    data = {"name": "digits", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    return export_bundle(pipe, out, model_spec=spec, data=data,
                         metrics={"pgd": {"metrics": {"robust_accuracy": {"value": 0.5, "ci95": [0.4, 0.6], "n": 100}}}})
