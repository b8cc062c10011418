"""Triggers land exactly where asked, on 1- and 3-channel images; blending, colours and bad parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safedl import registry
from safedl.attacks.backdoor import triggers
from safedl.errors import ConfigError

CORNERS = {"top_left": (1, 1), "top_right": (1, 12 - 3 - 1), "bottom_left": (12 - 3 - 1, 1),
           "bottom_right": (12 - 3 - 1, 12 - 3 - 1), "center": ((12 - 3) // 2, (12 - 3) // 2)}


def _images(c: int, n: int = 6, size: int = 12) -> torch.Tensor:
    # mid-grey noise so that every trigger value (0 or 1) changes the pixels it covers
    return 0.3 + 0.4 * torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(c))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("position", sorted(CORNERS))
@pytest.mark.parametrize("kind", ["pattern", "square", "random_noise"])
def test_trigger_lands_where_asked(channels, position, kind):
    x = _images(channels)
    attack = registry.create("backdoor", "static_patch", trigger=kind, patch_size=3, position=position, margin=1)
    xt = attack.apply_trigger(x)
    r, c = CORNERS[position]
    pattern, mask = attack.trigger_pattern(tuple(x.shape[1:]))
    assert pattern.shape == (channels, 3, 3) and mask.shape == (1, 3, 3)
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[r : r + 3, c : c + 3] = True
    assert torch.equal(xt[:, :, ~inside], x[:, :, ~inside])  # nothing outside the patch moves
    assert torch.allclose(xt[:, :, r : r + 3, c : c + 3], pattern.expand(len(x), -1, -1, -1))
    if kind == "pattern":  # a checkerboard: lit on even cells, black on odd ones
        assert float(pattern[0, 0, 0]) == 1.0 and float(pattern[0, 0, 1]) == 0.0


@pytest.mark.parametrize("channels", [1, 3])
def test_single_pixel_and_colour(channels):
    x = _images(channels)
    color = [1.0, 0.0, 0.5][:channels]
    attack = registry.create("backdoor", "static_patch", trigger="single_pixel", position="top_left", margin=0,
                             color=color)
    xt = attack.apply_trigger(x)
    assert torch.allclose(xt[:, :, 0, 0], torch.tensor(color).expand(len(x), -1))
    changed = (xt != x).any(1)
    assert int(changed.flatten(1).sum(1).max()) == 1


def test_colour_list_must_match_channels():
    attack = registry.create("backdoor", "static_patch", color=[1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="channels"):
        attack.apply_trigger(_images(1))


@pytest.mark.parametrize("channels", [1, 3])
def test_random_position_stays_inside_and_differs(channels):
    x = _images(channels, n=40)
    attack = registry.create("backdoor", "static_patch", trigger="square", patch_size=3, position="random")
    xt = attack.apply_trigger(x)
    changed = (xt != x).any(1)  # N x H x W
    rows = changed.any(2).float().argmax(1)
    cols = changed.any(1).float().argmax(1)
    assert all(int(changed[i].sum()) == 9 for i in range(len(x)))  # a whole 3x3 square, inside the image
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # positions vary
    assert torch.equal(xt, attack.apply_trigger(x))  # deterministic by default
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert not torch.equal(attack.apply_trigger(x, generator=g1), attack.apply_trigger(x, generator=g2))


def test_blend_alpha_blends():
    x = _images(1)
    attack = registry.create("backdoor", "static_patch", trigger="square", patch_size=4, position="center",
                             blend_alpha=0.2)
    xt = attack.apply_trigger(x)
    r = (12 - 4) // 2
    assert torch.allclose(xt[:, :, r : r + 4, r : r + 4], 0.8 * x[:, :, r : r + 4, r : r + 4] + 0.2, atol=1e-6)


def test_full_image_blended_noise():
    x = _images(3)
    attack = registry.create("backdoor", "static_patch", trigger="random_noise", patch_size=None, blend_alpha=0.1)
    xt = attack.apply_trigger(x)
    assert bool((xt != x).all())  # every pixel moves a little
    assert float((xt - x).abs().max()) <= 0.1 + 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_image_trigger_from_png(tmp_path, channels):
    from PIL import Image

    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[..., 3] = 255  # opaque
    arr[0, 0, 3] = 0   # one transparent pixel: the mask comes from the alpha channel
    path = tmp_path / "logo.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    attack = registry.create("backdoor", "static_patch", trigger="image", image_path=str(path), patch_size=4,
                             position="bottom_left", margin=0)
    x = _images(channels)
    xt = attack.apply_trigger(x)
    region = xt[:, :, 8:12, 0:4]
    if channels == 3:
        assert torch.allclose(region[:, 0, 1:, :], torch.ones(1))
        assert torch.allclose(region[:, 1:, 1:, :], torch.zeros(1))
    else:
        assert torch.allclose(region[:, 0, 1:, :], torch.full((1,), 0.299), atol=1e-3)
    assert torch.equal(region[:, :, 0, 0], x[:, :, 8, 0])  # transparent pixel untouched
    assert torch.equal(xt[:, :, :8], x[:, :, :8])


def test_place_matches_a_loop_reference():
    patch = torch.rand(2, 3, 4)
    rows, cols = torch.tensor([0, 5, 2]), torch.tensor([1, 0, 4])
    got = triggers.place(patch, rows, cols, (8, 8))
    for i in range(3):
        ref = torch.zeros(2, 8, 8)
        ref[:, rows[i] : rows[i] + 3, cols[i] : cols[i] + 4] = patch
        assert torch.equal(got[i], ref)


@pytest.mark.parametrize("name,key,value", [
    ("static_patch", "trigger", "star"), ("static_patch", "position", "somewhere"),
    ("static_patch", "poison_fraction", 1.5), ("static_patch", "label_mode", "sneaky"),
    ("static_patch", "blend_alpha", -0.1), ("static_patch", "patch_size", 0), ("static_patch", "color", 2.0),
    ("static_patch", "target_class", -1), ("static_patch", "image_path", "/no/such/file.png"),
    ("learned_trigger", "patch_size_ratio", 0.0), ("learned_trigger", "steps", 0),
    ("learned_trigger", "lambda_l1", -1.0), ("learned_trigger", "poison_fraction", -0.1),
])
def test_invalid_backdoor_params_raise_config_error(name, key, value):
    extra = {"trigger": "image"} if key == "image_path" else {}
    with pytest.raises(ConfigError, match=key):
        registry.create("backdoor", name, **{key: value}, **extra)


def test_image_trigger_needs_a_path():
    with pytest.raises(ConfigError, match="image_path"):
        registry.create("backdoor", "static_patch", trigger="image")


def test_patch_that_does_not_fit_is_a_config_error():
    for size in (7, 9):  # 7 + 2 * margin > 8; 9 > 8
        attack = registry.create("backdoor", "static_patch", patch_size=size, margin=1)
        with pytest.raises(ConfigError, match="does not fit"):
            attack.apply_trigger(torch.rand(2, 1, 8, 8))


def test_clean_label_trigger_at_all_four_corners():
    attack = registry.create("poisoning", "clean_label", all_corners=True, trigger="square", patch_size=3)
    x = _images(3)
    xt = attack.apply_trigger(x)
    changed = (xt != x).any(1).any(0)
    expected = torch.zeros(12, 12, dtype=torch.bool)
    for r, c in ((1, 1), (1, 8), (8, 1), (8, 8)):
        expected[r : r + 3, c : c + 3] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("key,value", [("eot_shift", -1), ("eot_samples", 0), ("all_corners", "yes")])
def test_invalid_clean_label_trigger_params(key, value):
    with pytest.raises(ConfigError, match=key):
        registry.create("poisoning", "clean_label", **{key: value})
