"""Cross-key (Sybil) detection of one extraction split over several API keys (our own detector, on the
out-of-distribution share of :mod:`safedl.defenses.query.ood_share`)."""
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
class _Flags:
    ood: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    n_seen: int = 0
    member: bool = False  # in the suspect pool: its later queries count towards the pooled test


@register("query_detector", "sybil")
class SybilDetector:
    """Flag the keys that share one extraction: a key whose own last ``window`` queries carry weak evidence of an
    excess OOD share (binomial tail at ``null_rate`` below ``key_alpha``, n >= ``min_queries``) joins a suspect pool;
    the queries pool members send *after* joining are tested together (tail below ``alpha`` over the pool's last
    ``global_window`` such queries), and members whose own evidence still holds are flagged while it does.

    An attack split over m keys gives each key only 1/m of the queries, so the per-key copycat test needs about m
    times longer; pooled, the evidence accumulates at the attack's full rate. Only queries sent after a key joined
    enter the pooled test, so the selection of members does not bias it: benign keys that join by chance add queries
    at the benign rate. ``global_verdict()`` says whether the pooled test holds. Per-key memory: ``window``
    booleans; at most ``max_keys`` keys.
    """

    def __init__(self, *, subspace: PixelSubspace | None = None, components: int = 16, quantile: float = 0.05,
                 null_rate: float | None = None, alpha: float = 1e-4, key_alpha: float = 1e-2,
                 min_queries: int = 30, window: int = 1000, global_window: int = 2000, max_keys: int = 1000):
        self.components = check_positive(self, "components", components, integer=True)
        self.quantile = float(check_fraction(self, "quantile", quantile))
        self.null_rate = None if null_rate is None else float(check_fraction(self, "null_rate", null_rate))
        self.alpha = float(check_fraction(self, "alpha", alpha))
        self.key_alpha = float(check_fraction(self, "key_alpha", key_alpha))
        self.min_queries = check_positive(self, "min_queries", min_queries, integer=True)
        self.window = check_positive(self, "window", window, integer=True)
        self.global_window = check_positive(self, "global_window", global_window, integer=True)
        self.max_keys = check_positive(self, "max_keys", max_keys, integer=True)
        self.subspace = subspace
        self.subspace_ = subspace  # fit() replaces it
        self._store: KeyStore[_Flags] = KeyStore(_Flags, max_keys=self.max_keys)
        self._global = _Flags()
        self._global_verdict = QueryVerdict(False, 0.0, 0)

    @property
    def effective_null_rate(self) -> float:
        """``null_rate``, or 2 x ``quantile`` when it is None."""
        return 2 * self.quantile if self.null_rate is None else self.null_rate

    def fit(self, x_train: torch.Tensor) -> "SybilDetector":
        self.subspace_ = PixelSubspace(components=self.components).fit(x_train, quantile=self.quantile)
        return self

    def calibrate(self, streams: Sequence[torch.Tensor]) -> "SybilDetector":
        """``fit`` on benign streams of training images."""
        if not streams:
            raise ConfigError("SybilDetector: calibration needs at least one benign stream")
        return self.fit(torch.cat([s.detach().cpu() for s in streams]))

    def observe(self, key: str, x: torch.Tensor) -> QueryVerdict:
        """Update the key's window (and, for a pool member, the pool's); flag queries where both tests hold."""
        check_is_fitted(self, "subspace_", verb="fit")
        new = self.subspace_.outside(x)
        st = self._store.get(key)
        kk, nk = window_counts(st.ood, new, self.window)
        pk = binomial_tail(kk, nk, self.effective_null_rate)
        st.ood = torch.cat([st.ood, new])[-self.window:]
        before = st.n_seen
        st.n_seen += len(x)
        key_ok = (nk >= self.min_queries) & (pk < self.key_alpha)
        if not st.member:
            st.member = bool(key_ok.any())  # its next batches count towards the pool
            return QueryVerdict(False, 0.0, st.n_seen)
        kg, ng = window_counts(self._global.ood, new, self.global_window)
        pg = binomial_tail(kg, ng, self.effective_null_rate)
        self._global.ood = torch.cat([self._global.ood, new])[-self.global_window:]
        g_before = self._global.n_seen
        self._global.n_seen += len(x)
        g_flags = (ng >= self.min_queries) & (pg < self.alpha)
        self._global_verdict = QueryVerdict(bool(g_flags.any()), float(suspicion(pg, self.alpha).max()),
                                            self._global.n_seen, first_flag(g_flags, g_before), int(g_flags.sum()))
        flags = g_flags & key_ok
        # suspicion in threshold units: the weaker of the two tests (> 1 exactly when both hold)
        score = torch.minimum(suspicion(pg, self.alpha), suspicion(pk, self.key_alpha))
        score = torch.where((ng >= self.min_queries) & (nk >= self.min_queries), score, torch.zeros_like(score))
        return QueryVerdict(bool(flags.any()), float(score.max()) if len(x) else 0.0, st.n_seen,
                            first_flag(flags, before), int(flags.sum()))

    def global_verdict(self) -> QueryVerdict:
        return self._global_verdict

    def reset(self, key: str | None = None) -> None:
        self._store.reset(key)
        if key is None:
            self._global = _Flags()
