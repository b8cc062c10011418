"""Per-image boolean records (correct / robust / hit), stored compactly in results.json for paired comparisons.

``pack(mask)`` -> ``{"n": N, "bits": base64 of the mask packed 8 per byte}`` (1,000 images: 168 characters).
"""
from __future__ import annotations

import base64
from typing import Any

import torch

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack(mask: torch.Tensor) -> dict[str, Any]:
    m = mask.detach().flatten().to("cpu", torch.bool)
    n = len(m)
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = m.to(torch.uint8)
    packed = (padded.view(-1, 8) * _WEIGHTS).sum(1).to(torch.uint8)
    return {"n": n, "bits": base64.b64encode(bytes(packed.tolist())).decode("ascii")}


def unpack(record: dict[str, Any]) -> torch.Tensor:
    n = int(record["n"])
    raw = torch.tensor(list(base64.b64decode(record["bits"])), dtype=torch.uint8)
    bits = ((raw.view(-1, 1) & _WEIGHTS) > 0).flatten()
    return bits[:n].clone()
