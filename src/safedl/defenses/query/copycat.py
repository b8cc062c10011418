"""Per-key detection of natural-image model stealing (Copycat / Knockoff pools of another distribution, Jacobian
augmentation): a sequential one-sided binomial test of the key's out-of-distribution share (our own detector; the
per-query test is :class:`~safedl.defenses.query.ood_share.PixelSubspace`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from safedl.defenses.query.base import KeyStore, QueryVerdict, first_flag
from safedl.defenses.query.ood_share import PixelSubspace, binomial_tail, suspicion, window_counts
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_is_fitted, check_positive


@dataclass
class _KeyState:
    ood: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # last `window` flags
    n_seen: int = 0


@register("query_detector", "copycat")
class CopycatDetector:
    """Flag a key once the share of its last ``window`` queries that leave the training images' pixel subspace is
    implausibly high for benign traffic: P[Binomial(n, ``null_rate``) >= k] < ``alpha`` with n >= ``min_queries``.

    Benign queries fail the per-query test at its calibrated rate (``quantile`` of held-out training images, 5% by
    default); ``null_rate`` (2x by default) leaves room for benign keys whose images are harder than the training
    set. Queries from another distribution and Jacobian-augmented points fail it far more often. In-distribution
    copycats (natural images of the training distribution) are, by design, not separable by this test: the output
    defense and the ownership proof cover them. ``fit(x_train)`` fits the subspace; or pass a fitted ``subspace``.
    Memory per key: ``window`` booleans; at most ``max_keys`` keys.
    """

    def __init__(self, *, subspace: PixelSubspace | None = None, components: int = 16, quantile: float = 0.05,
                 null_rate: float | None = None, alpha: float = 1e-4, min_queries: int = 50, window: int = 1000,
                 max_keys: int = 1000):
        self.components = check_positive(self, "components", components, integer=True)
        self.quantile = float(check_fraction(self, "quantile", quantile))
        self.null_rate = None if null_rate is None else float(check_fraction(self, "null_rate", null_rate))
        self.alpha = float(check_fraction(self, "alpha", alpha))
        self.min_queries = check_positive(self, "min_queries", min_queries, integer=True)
        self.window = check_positive(self, "window", window, integer=True)
        if self.window < self.min_queries:
            raise ConfigError(f"CopycatDetector: window={window} must be at least min_queries={min_queries}")
        self.max_keys = check_positive(self, "max_keys", max_keys, integer=True)
        self.subspace = subspace
        self.subspace_ = subspace  # fit() replaces it
        self._store: KeyStore[_KeyState] = KeyStore(_KeyState, max_keys=self.max_keys)

    @property
    def effective_null_rate(self) -> float:
        """``null_rate``, or 2 x ``quantile`` when it is None."""
        return 2 * self.quantile if self.null_rate is None else self.null_rate

    def fit(self, x_train: torch.Tensor) -> "CopycatDetector":
        """Fit the per-query test on training images (subspace on one half, threshold on the other)."""
        self.subspace_ = PixelSubspace(components=self.components).fit(x_train, quantile=self.quantile)
        return self

    def calibrate(self, streams: Sequence[torch.Tensor]) -> "CopycatDetector":
        """``fit`` on benign streams of training images (the run's and the service's calibration streams)."""
        if not streams:
            raise ConfigError("CopycatDetector: calibration needs at least one benign stream")
        return self.fit(torch.cat([s.detach().cpu() for s in streams]))

    @property
    def threshold_(self) -> float | None:
        """The per-query residual threshold (None before fitting)."""
        return None if self.subspace_ is None else self.subspace_.threshold_

    def p_values(self, history: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per new query: the binomial tail p-value of the OOD count in its window, and the window's size."""
        k, n = window_counts(history, new, self.window)
        return binomial_tail(k, n, self.effective_null_rate), n

    def observe(self, key: str, x: torch.Tensor) -> QueryVerdict:
        """Test each query of the batch, then the key's OOD share after each of them."""
        check_is_fitted(self, "subspace_", verb="fit")
        st = self._store.get(key)
        new = self.subspace_.outside(x)
        p, n = self.p_values(st.ood, new)
        st.ood = torch.cat([st.ood, new])[-self.window:]
        before = st.n_seen
        st.n_seen += len(x)
        judged = n >= self.min_queries
        flags = judged & (p < self.alpha)
        score = torch.where(judged, suspicion(p, self.alpha), torch.zeros_like(p))
        return QueryVerdict(bool(flags.any()), float(score.max()) if len(x) else 0.0, st.n_seen,
                            first_flag(flags, before), int(flags.sum()))

    def reset(self, key: str | None = None) -> None:
        self._store.reset(key)
