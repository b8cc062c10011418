"""Images of queued inputs: the full-size PNG of ``safedl review show --png`` (the ``/review`` page's small ones are
the monitor's gallery thumbnails, serve/monitor/core.py)."""
from __future__ import annotations

import io

import torch


def png_bytes(img: torch.Tensor) -> bytes:
    """A [C, H, W] image in [0, 1] as PNG bytes (1 channel: grayscale; 3 or more: RGB of the first three)."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr[0].numpy(), "L") if arr.shape[0] == 1 else \
        Image.fromarray(arr[:3].permute(1, 2, 0).contiguous().numpy(), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
