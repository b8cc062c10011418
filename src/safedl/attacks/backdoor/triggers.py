"""Trigger shapes, placement and stamping shared by every backdoor (BadNets, blended, learned, clean-label).

A trigger is a patch ``pattern`` (C x h x w, values in [0, 1]) with a ``mask`` (1 x h x w, in [0, 1]) placed at a
row/column offset; stamping blends ``x' = (1 - a*m) * x + a*m * p`` (Gu et al. 2017 "BadNets" with a = 1; Chen et
al. 2017 "Targeted Backdoor Attacks ... Using Data Poisoning" blended injection with a < 1). All functions are batched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from safedl.errors import ConfigError

TRIGGERS = ("single_pixel", "pattern", "square", "random_noise", "image")
POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center", "random")


def channel_color(color: float | Sequence[float], channels: int, *, who: str = "trigger") -> torch.Tensor:
    """The trigger colour as a C x 1 x 1 tensor; a single value is used for every channel."""
    if isinstance(color, (int, float)):
        vals = [float(color)] * channels
    else:
        vals = [float(c) for c in color]
        if len(vals) == 1:
            vals = vals * channels
        if len(vals) != channels:
            raise ConfigError(f"{who}: color={list(color)!r} has {len(vals)} values but the images have {channels} channels")
    return torch.tensor(vals, dtype=torch.float32).view(channels, 1, 1)


def load_image_trigger(path: str | Path, *, channels: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A PNG (or any Pillow image) resized to h x w: pattern C x h x w and mask from its alpha channel."""
    import numpy as np
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"trigger image {str(path)!r} cannot be read ({exc})") from None
    img = img.convert("RGBA").resize((size[1], size[0]), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 4 x s x s
    rgb, alpha = arr[:3], arr[3:4]
    if channels == 1:
        pattern = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).unsqueeze(0)
    elif channels == 3:
        pattern = rgb
    else:
        pattern = rgb.mean(0, keepdim=True).expand(channels, -1, -1).clone()
    return pattern.contiguous(), alpha.contiguous()


def make_patch(kind: str, *, channels: int, size: tuple[int, int], color: float | Sequence[float] = 1.0,
               noise_seed: int = 0, image_path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pattern (C x h x w) and mask (1 x h x w) of a trigger kind; ``size`` is (h, w) in pixels."""
    col = channel_color(color, channels)
    h, w = size
    if kind == "single_pixel":
        return col.view(channels, 1, 1).clone(), torch.ones(1, 1, 1)
    if kind == "pattern":  # checkerboard, the BadNets-style pattern: colour on even cells, black on odd ones
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        board = ((ii + jj) % 2 == 0).float()
        return col * board.unsqueeze(0), torch.ones(1, h, w)
    if kind == "square":
        return col.expand(channels, h, w).clone(), torch.ones(1, h, w)
    if kind == "random_noise":  # one fixed noise pattern (seeded), so the trigger is a learnable constant
        g = torch.Generator().manual_seed(int(noise_seed))
        return torch.rand(channels, h, w, generator=g), torch.ones(1, h, w)
    if kind == "image":
        if image_path is None:
            raise ConfigError("trigger 'image' needs image_path")
        return load_image_trigger(image_path, channels=channels, size=size)
    raise ConfigError(f"unknown trigger {kind!r}; choose one of {', '.join(TRIGGERS)}")


def fixed_offset(position: str, *, image_hw: tuple[int, int], patch_hw: tuple[int, int], margin: int,
                 who: str = "trigger") -> tuple[int, int]:
    """Row and column of a patch's top-left pixel for a named position."""
    H, W = image_hw
    h, w = patch_hw
    if (h, w) == (H, W):  # a whole-image trigger (blended noise): no margin
        return 0, 0
    if h + 2 * margin > H or w + 2 * margin > W:
        raise ConfigError(f"{who}: a {h}x{w} trigger with margin {margin} does not fit in {H}x{W} images")
    rows = {"top": margin, "bottom": H - h - margin}
    cols = {"left": margin, "right": W - w - margin}
    if position == "center":
        return (H - h) // 2, (W - w) // 2
    if position in ("top_left", "top_right", "bottom_left", "bottom_right"):
        r, c = position.split("_")
        return rows[r], cols[c]
    raise ConfigError(f"{who}: position={position!r} has no fixed offset; choose one of {', '.join(POSITIONS)}")


def offsets(position: str, n: int, *, image_hw: tuple[int, int], patch_hw: tuple[int, int], margin: int,
            generator: torch.Generator | None, who: str = "trigger") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample offsets (rows, cols), int64 N: the same for a named position, uniform for ``random``."""
    H, W = image_hw
    h, w = patch_hw
    if position == "random":
        if h > H or w > W:
            raise ConfigError(f"{who}: a {h}x{w} trigger does not fit in {H}x{W} images")
        rows = torch.randint(0, H - h + 1, (n,), generator=generator)
        cols = torch.randint(0, W - w + 1, (n,), generator=generator)
        return rows, cols
    r, c = fixed_offset(position, image_hw=image_hw, patch_hw=patch_hw, margin=margin, who=who)
    return torch.full((n,), r, dtype=torch.long), torch.full((n,), c, dtype=torch.long)


def place(patch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Full-size canvases N x C x H x W holding ``patch`` (C x h x w) at each sample's offset and zeros elsewhere."""
    H, W = image_hw
    c, h, w = patch.shape
    dev = patch.device
    rr = torch.arange(H, device=dev).view(1, H) - rows.to(dev).view(-1, 1)  # N x H: row inside the patch
    cc = torch.arange(W, device=dev).view(1, W) - cols.to(dev).view(-1, 1)  # N x W
    valid = ((rr >= 0) & (rr < h)).unsqueeze(2) & ((cc >= 0) & (cc < w)).unsqueeze(1)  # N x H x W
    vals = patch[:, rr.clamp(0, h - 1).unsqueeze(2), cc.clamp(0, w - 1).unsqueeze(1)]  # C x N x H x W
    return (vals * valid.unsqueeze(0)).permute(1, 0, 2, 3)


def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          *, alpha: float = 1.0) -> torch.Tensor:
    """Blend the trigger into x (N x C x H x W) at the given offsets: (1 - a*m) * x + a*m * p, clipped to [0, 1]."""
    if len(x) == 0:
        return x.clone()
    hw = (x.shape[2], x.shape[3])
    pattern = pattern.to(device=x.device, dtype=x.dtype)
    mask = mask.to(device=x.device, dtype=x.dtype)
    if pattern.shape[0] != x.shape[1]:
        raise ConfigError(f"trigger has {pattern.shape[0]} channels but the images have {x.shape[1]}")
    P = place(pattern, rows, cols, hw)
    M = place(mask, rows, cols, hw) * float(alpha)
    return ((1 - M) * x + M * P).clamp(0, 1)


def region_side(ratio: float, image_hw: tuple[int, int]) -> int:
    """Side of the largest square whose area is at most ``ratio`` of the image (at least 1 pixel)."""
    H, W = image_hw
    return max(1, min(min(H, W), int(math.floor(math.sqrt(ratio * H * W) + 1e-9))))


def total_variation(t: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of ... x H x W tensors (sum of absolute neighbour differences)."""
    return (t[..., 1:, :] - t[..., :-1, :]).abs().sum() + (t[..., :, 1:] - t[..., :, :-1]).abs().sum()
