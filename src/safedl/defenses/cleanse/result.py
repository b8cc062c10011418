"""The one result type every cleanser returns (cleanlab style: a mask, a score, and facts about the decision)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DetectionResult:
    """Per-sample poison decisions.

    ``is_suspect`` (bool, N): True = flagged as poison (never ART's 1 = clean). ``score`` (float, N): higher = more
    suspicious, comparable across the whole set so an AUROC can be computed from it. ``info``: JSON-friendly facts
    (which classes were judged poisoned, thresholds used, per-class statistics ...).
    """

    is_suspect: torch.Tensor
    score: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.is_suspect = torch.as_tensor(self.is_suspect).bool().cpu()
        self.score = torch.as_tensor(self.score).float().cpu()
        if self.is_suspect.ndim != 1 or self.score.shape != self.is_suspect.shape:
            raise ValueError(f"is_suspect {tuple(self.is_suspect.shape)} and score {tuple(self.score.shape)} "
                             "must be vectors of the same length")

    def __len__(self) -> int:
        return len(self.is_suspect)

    @property
    def n_flagged(self) -> int:
        return int(self.is_suspect.sum())

    @property
    def keep(self) -> torch.Tensor:
        """Bool mask of the samples to keep (not flagged)."""
        return ~self.is_suspect
