"""The rank-sum test of the ownership verification (issue 26): its null is exact (against enumeration), a suspect
that ranks the watermark class high is caught even when its top-1 label never matches, and a suspect that knows
nothing of the key is not."""
from __future__ import annotations

import itertools

import torch

from safedl.defenses.ownership import ResponseWatermark, verify_ownership
from safedl.defenses.ownership.verify import rank_sum_p_value, watermark_ranks


def test_the_rank_sum_null_is_exact():
    for n, m in ((1, 9), (3, 4), (4, 5)):
        sums = [sum(r) for r in itertools.product(range(1, m + 1), repeat=n)]
        for s in range(n, n * m + 1):
            assert abs(rank_sum_p_value(s, n=n, m=m) - sum(v <= s for v in sums) / len(sums)) < 1e-12


def test_ranks_skip_the_victim_class_and_break_ties_by_class_index():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.3, 0.3, 0.3, 0.1]])
    assert watermark_ranks(scores, torch.tensor([1, 0]), torch.tensor([3, 1])).tolist() == [2, 1]


def test_a_runner_up_copy_is_caught_by_ranks_and_a_keyless_suspect_is_not():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 1, 8, 8, generator=g)
    victim = torch.randint(10, (4000,), generator=g)
    wm = ResponseWatermark(key=b"k" * 32, num_classes=10, rate=0.005)
    mask, wl = wm.select(x, victim)
    runner_up = torch.rand(4000, 10, generator=g)
    runner_up[torch.arange(4000), victim] = 2.0  # top-1 is always the victim's label: never the watermark's
    runner_up[mask, wl[mask]] = 1.5  # but the watermark class comes second on the watermarked images
    v = verify_ownership(watermark=wm, evidence=x, victim_labels=victim, suspect_scores=runner_up)
    assert v.matches == 0 and v.test == "rank" and v.copy and v.p_value < 1e-6
    labels_only = verify_ownership(watermark=wm, evidence=x, victim_labels=victim, suspect_labels=runner_up.argmax(1))
    assert labels_only.test == "label" and not labels_only.copy
    keyless = torch.rand(4000, 10, generator=g)
    assert not verify_ownership(watermark=wm, evidence=x, victim_labels=victim, suspect_scores=keyless).copy
