"""Offline stand-in for the service's per-key monitoring: the victim as the counted query interface sees it."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from safedl.defenses.query.base import QueryDetector
from safedl.utils.validate import check_positive


class ObservedModel(nn.Module):
    """Wrap the victim so that every query batch it answers is first shown to each detector under ``key``.

    Black-box attacks reach the model only through :class:`~safedl.attacks.query.QueryInterface`, which calls
    the model once per query batch, so this sees exactly the queries an API key would send. Batches are observed in
    chunks of ``chunk`` queries; ``first_detection_`` maps each detector's name to the key's query number at its first
    flag, and ``queries_`` counts the queries answered.
    """

    def __init__(self, model: nn.Module, detectors: Mapping[str, QueryDetector], *, key: str, chunk: int = 16):
        super().__init__()
        self.model = model
        self.detectors = dict(detectors)
        self.key = key
        self.chunk = check_positive(self, "chunk", chunk, integer=True)
        self.first_detection_: dict[str, int] = {}
        self.queries_ = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(0, len(x), self.chunk):
            xc = x[i:i + self.chunk]
            for name, det in self.detectors.items():
                v = det.observe(self.key, xc)
                if v.flagged and name not in self.first_detection_:
                    self.first_detection_[name] = v.first_at or v.n_seen
        self.queries_ += len(x)
        return self.model(x)
