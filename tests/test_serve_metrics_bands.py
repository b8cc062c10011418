"""Detector score bands (serve/metrics.py): each image is counted in exactly the band of |score| / threshold."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("prometheus_client")

from safedl.serve.metrics import Metrics  # noqa: E402


def _bands(m: Metrics, detector: str) -> dict[str, float]:
    return {band: m.registry.get_sample_value("safedl_detector_score_band_total",
                                              {"detector": detector, "band": band}) or 0.0
            for band in ("lt_0.5", "0.5_1", "1_2", "ge_2")}


def test_each_image_lands_in_the_band_of_its_score_over_the_threshold():
    m = Metrics()
    d = {"reasons": [None] * 6, "thresholds": {"squeeze": 2.0, "none": 0.0},
         "detector_scores": {"squeeze": torch.tensor([0.2, 1.0, -1.4, 2.0, 3.9, 4.0]),
                             "none": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])}}
    m.observe_decision(d, tier="full")
    # ratios 0.1, 0.5, 0.7, 1.0, 1.95, 2.0: the lower bound of a band belongs to it
    assert _bands(m, "squeeze") == {"lt_0.5": 1, "0.5_1": 2, "1_2": 2, "ge_2": 1}
    assert _bands(m, "none") == {"lt_0.5": 0, "0.5_1": 0, "1_2": 0, "ge_2": 6}  # no threshold: every image over
