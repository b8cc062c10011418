"""Exact ground truth of every poisoning attack: the mask marks exactly the changed samples, originals are kept,
the same seed gives the same poison, clean-label attacks never touch a label, flip maps are respected."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.attacks.poisoning.surrogate import feature_fn
from safedl.attacks.poisoning.visibility import ssim
from safedl.data.dataset import PoisonedDataset
from safedl.errors import ConfigError
from safedl.utils.tensors import predict

# (kind, name, params, needs a surrogate)
ATTACKS = [
    ("backdoor", "static_patch", {"poison_fraction": 0.1}, False),
    ("backdoor", "static_patch", {"poison_fraction": 0.05, "label_mode": "clean", "trigger": "square"}, False),
    ("backdoor", "static_patch", {"poison_fraction": 0.1, "trigger": "random_noise", "patch_size": None,
                                  "blend_alpha": 0.1, "target_class": 3}, False),
    ("poisoning", "label_flipping", {"strategy": "fully_random", "flip_rate": 0.1}, False),
    ("poisoning", "label_flipping", {"strategy": "many_to_one", "flip_rate": 0.2, "target_class": 2}, False),
    ("poisoning", "label_flipping", {"strategy": "one_to_one", "flip_rate": 0.5, "source_classes": [7],
                                     "target_class": 1}, False),
    ("poisoning", "label_consistent_backdoor", {"eps": 0.1, "steps": 5, "all_corners": False, "eot_shift": 0}, True),
    ("poisoning", "clean_label", {"method": "clean_label_backdoor", "eps": 0.1, "steps": 3, "eot_shift": 1,
                                  "eot_samples": 2, "class_fraction": 0.3, "all_corners": True}, True),
    ("poisoning", "feature_collision", {"n_victims": 3, "poisons_per_victim": 5, "fc_steps": 20, "source_class": 6},
     True),
    ("backdoor", "learned_trigger", {"steps": 20, "batch_size": 32, "patch_size_ratio": 0.1}, True),
]
IDS = [f"{n}-{i}" for i, (_, n, _, _) in enumerate(ATTACKS)]


def _poison(spec, splits, surrogate, seed=0) -> PoisonedDataset:
    kind, name, params, needs = spec
    attack = registry.create(kind, name, **params)
    if needs:
        kw = {}
        if getattr(attack, "needs_victims", False):
            vm = attack.victim_mask(splits.test.y)
            kw = {"victims": splits.test.x[vm][:3], "victim_labels": splits.test.y[vm][:3]}
        attack.fit(splits.train, surrogate=surrogate, **kw)
    return attack.poison(splits.train, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def poisoned(digits_splits, tiny_model):
    return {i: _poison(spec, digits_splits, tiny_model) for i, spec in zip(IDS, ATTACKS)}


@pytest.mark.parametrize("key", IDS)
def test_mask_marks_exactly_the_changed_samples(key, poisoned, digits_splits):
    p = poisoned[key]
    train = digits_splits.train
    assert torch.equal(p.original_x, train.x) and torch.equal(p.original_y, train.y)
    changed = (p.x != train.x).flatten(1).any(1) | (p.y != train.y)
    assert torch.equal(p.is_poison, changed)
    assert p.n_poison > 0
    assert float(p.x.min()) >= 0.0 and float(p.x.max()) <= 1.0
    assert p.x.shape == train.x.shape and p.x.dtype == torch.float32 and p.y.dtype == torch.int64


@pytest.mark.parametrize("i", range(len(ATTACKS)), ids=IDS)
def test_deterministic_under_seed(i, poisoned, digits_splits, tiny_model):
    again = _poison(ATTACKS[i], digits_splits, tiny_model, seed=0)
    first = poisoned[IDS[i]]
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    assert torch.equal(again.is_poison, first.is_poison)
    other = _poison(ATTACKS[i], digits_splits, tiny_model, seed=1)
    assert not torch.equal(other.is_poison, first.is_poison)  # the seed picks the samples


@pytest.mark.parametrize("key", [k for k, s in zip(IDS, ATTACKS)
                                 if s[1] in ("clean_label", "label_consistent_backdoor", "feature_collision")
                                 or s[2].get("label_mode") == "clean"])
def test_clean_label_attacks_keep_every_label(key, poisoned):
    p = poisoned[key]
    assert torch.equal(p.y, p.original_y)
    target = p.info["target_class"]
    assert bool((p.original_y[p.is_poison] == target).all())  # only target-class images are touched


def test_dirty_label_backdoor_relabels_non_target_samples(poisoned, digits_splits):
    p = poisoned[IDS[0]]
    n = len(digits_splits.train)
    assert p.n_poison == round(0.1 * n)
    assert bool((p.y[p.is_poison] == 0).all()) and bool((p.original_y[p.is_poison] != 0).all())
    assert p.info["trigger"]["pattern"].shape == (1, 3, 3)


def test_flip_maps_are_respected(poisoned, digits_splits):
    y0 = digits_splits.train.y
    counts = torch.bincount(y0, minlength=10)
    rand = poisoned[IDS[3]]
    assert rand.n_poison == round(0.1 * len(y0)) and bool((rand.y[rand.is_poison] != y0[rand.is_poison]).all())
    assert torch.equal(rand.x, rand.original_x)  # labels only
    m2o = poisoned[IDS[4]]
    assert m2o.info["flip_map"] == {c: 2 for c in range(10) if c != 2}
    assert bool((m2o.y[m2o.is_poison] == 2).all())
    flipped_per_class = torch.bincount(y0[m2o.is_poison], minlength=10)
    for c in range(10):
        assert int(flipped_per_class[c]) == (0 if c == 2 else round(0.2 * int(counts[c])))
    assert torch.tensor(m2o.info["flip_counts"]).sum() == m2o.n_poison
    o2o = poisoned[IDS[5]]
    assert o2o.info["flip_map"] == {7: 1}
    assert bool((y0[o2o.is_poison] == 7).all()) and bool((o2o.y[o2o.is_poison] == 1).all())
    assert o2o.n_poison == round(0.5 * int(counts[7]))


def test_clean_label_backdoor_respects_the_linf_budget(poisoned, digits_splits):
    p = poisoned[IDS[6]]
    d = (p.x - p.original_x)[p.is_poison]
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[4:7, 4:7] = False  # the 3x3 trigger at bottom_right with margin 1
    assert float(d[:, :, outside].abs().max()) <= 0.1 + 1e-6
    assert float(d[:, :, outside].abs().max()) > 0.05  # PGD actually perturbed them


def test_feature_collision_pulls_poisons_to_the_victims(poisoned, digits_splits, tiny_model):
    p = poisoned[IDS[8]]
    idx, owner = p.info["poison_indices"], p.info["poison_owner"]  # crafting order: poison i serves victim owner[i]
    f = feature_fn(tiny_model)
    with torch.no_grad():
        fv = f(p.info["victims"])[owner]
        before = (f(p.original_x[idx]) - fv).norm(dim=1)
        after = (f(p.x[idx]) - fv).norm(dim=1)
    assert set(torch.nonzero(p.is_poison).flatten().tolist()) <= set(idx.tolist())
    assert float(after.mean()) < 0.7 * float(before.mean())
    assert bool((p.y == p.original_y).all())


def test_learned_trigger_beats_a_random_trigger_on_the_surrogate(digits_splits, tiny_model):
    attack = registry.create("backdoor", "learned_trigger", steps=60, batch_size=64, patch_size_ratio=0.25,
                             position="bottom_right")
    attack.fit(digits_splits.train, surrogate=tiny_model)
    pattern, mask = attack.trigger_pattern((1, 8, 8))
    assert pattern.shape == mask.shape == (1, 4, 4) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    x = digits_splits.test.x[digits_splits.test.y != 0]
    xt = attack.apply_trigger(x)
    assert torch.equal(xt[:, :, :3], x[:, :, :3]) and torch.equal(xt[:, :, :, :3], x[:, :, :, :3])
    learned = float((predict(tiny_model, xt) == 0).float().mean())
    rand = registry.create("backdoor", "static_patch", trigger="random_noise", patch_size=4)
    random_rate = float((predict(tiny_model, rand.apply_trigger(x)) == 0).float().mean())
    assert learned > random_rate + 0.3


@pytest.mark.parametrize("kind,name,params,match", [
    ("poisoning", "label_flipping", {"strategy": "one_to_one", "target_class": 1}, "source"),
    ("poisoning", "label_flipping", {"strategy": "many_to_one", "target_class": None}, "target_class"),
    ("poisoning", "label_flipping", {"flip_rate": 0.0}, "flip_rate"),
    ("poisoning", "label_flipping", {"strategy": "swap"}, "strategy"),
    ("poisoning", "label_flipping", {"source_classes": [0], "target_class": 0}, "target_class"),
    ("poisoning", "clean_label", {"method": "bullseye"}, "method"),
    ("poisoning", "label_consistent_backdoor", {"eps": 1.5}, "eps"),
    ("poisoning", "label_consistent_backdoor", {"class_fraction": 0.0}, "class_fraction"),
    ("poisoning", "feature_collision", {"opacity": 1.0}, "opacity"),
    ("poisoning", "clean_label", {"opacity": 0.5}, "do not apply to method='clean_label_backdoor'"),
    ("poisoning", "label_consistent_backdoor", {"trigger": "star"}, "trigger"),
    ("poisoning", "feature_collision", {"source_class": 0, "target_class": 0}, "source_class"),
])
def test_invalid_poisoning_params_raise_config_error(kind, name, params, match):
    with pytest.raises(ConfigError, match=match):
        registry.create(kind, name, **params)


def test_the_clean_label_alias_builds_the_class_its_method_names():
    """``clean_label`` stays for one release: it builds the registered class, which a bundle then records."""
    fc = registry.create("poisoning", "clean_label", method="feature_collision", n_victims=3)
    lcb = registry.create("poisoning", "clean_label", eps=0.1)
    assert (fc.registry_name, registry.creation_params(fc)) == ("feature_collision", {"n_victims": 3})
    assert (lcb.registry_name, registry.creation_params(lcb)) == ("label_consistent_backdoor", {"eps": 0.1})


def test_class_out_of_range_is_a_config_error(digits_splits):
    attack = registry.create("poisoning", "label_flipping", strategy="many_to_one", target_class=12)
    with pytest.raises(ConfigError, match="target_class"):
        attack.poison(digits_splits.train, generator=torch.Generator().manual_seed(0))


def _ssim_reference(a, b, size, sigma):
    # slow per-window reference of Wang et al. 2004 with the same Gaussian window
    import numpy as np

    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                pa, pb = a[ch, i : i + size, j : j + size], b[ch, i : i + size, j : j + size]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                cov = (w * pa * pb).sum() - ma * mb
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 14, 14, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    fast = ssim(a, b)
    for i in range(3):
        ref = _ssim_reference(a[i].double().numpy(), b[i].double().numpy(), 11, 1.5)
        assert abs(float(fast[i]) - ref) < 1e-4
    assert torch.allclose(ssim(a, a), torch.ones(3))
    assert bool((fast < 0.95).all())
