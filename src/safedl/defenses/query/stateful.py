"""Stateful detection of query-based black-box attacks (Chen, Carlini & Wagner, "Stateful Detection of Black-Box
Adversarial Attacks", ACM SPAI 2020 / arXiv 2019)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from safedl.defenses.query.base import KeyStore, QueryVerdict, encode, first_flag
from safedl.defenses.query.history import SharedHistory
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive

_CALIBRATION_CHUNK = 50


@dataclass
class _KeyState:
    feats: torch.Tensor | None = None   # ring buffer: history x D
    filled: int = 0
    ptr: int = 0
    n_seen: int = 0
    since: int | None = None            # the key's count over all writers after the last shared exchange
    scores: list = field(default_factory=list)  # only used during calibration


@register("query_detector", "stateful_detector")
class StatefulDetector:
    """Per key, the mean distance of each query to its ``k`` nearest neighbours among the key's last ``history``
    queries (in ``encoder``'s feature space; flattened pixels without one); a mean below ``threshold`` flags the key.

    Query-based attacks (square, NES, HopSkipJump) send long runs of near-identical images, so their k-NN
    distances collapse, while benign traffic (even a user retrying an image a few times) keeps most of its k
    neighbours far away. ``calibrate(benign_streams, fpr=...)`` sets ``threshold_`` to the ``fpr`` quantile of the
    per-query k-NN distances of benign streams (the paper's procedure; it used a contrastively trained encoder,
    here any given encoder, e.g. the victim's penultimate features, or pixels). Unlike the paper, the buffer is
    not cleared after a detection: the service decides what to do with a flagged key. ``fpr`` is the calibration's
default target. Memory per key:
    ``history * D`` floats; at most ``max_keys`` keys (least recently seen forgotten first). Within a batch each
    query also sees the batch's earlier queries (so the window is briefly up to history + batch size).

    ``shared`` (a :class:`~safedl.defenses.query.history.SharedHistory`, e.g. the service database's): every batch
    is appended to the key's shared history under ``name`` and, in the same exchange, the queries other workers
    or replicas sent under the key since this one last saw it enter the window first, so the k-NN runs over the
    union of the key's queries and ``n_seen`` / ``first_at`` count them all (an attacker spreading queries over
    replicas is flagged at the same query number as on one). Features are then rounded to the shared
    history's dtype (float16) here too, so every replica judges the same numbers. While the shared history is
    unavailable a batch is judged on what this process holds.
    """

    def __init__(self, *, k: int = 50, history: int = 1000, threshold: float | None = None,
                 fpr: float = 1e-3, encoder: nn.Module | None = None, max_keys: int = 1000,
                 shared: SharedHistory | None = None, name: str = "stateful"):
        self.k = check_positive(self, "k", k, integer=True)
        self.fpr = float(check_fraction(self, "fpr", fpr))
        self.history = check_positive(self, "history", history, integer=True)
        if self.history < self.k:
            raise ConfigError(f"StatefulDetector: history={history} must be at least k={k}")
        self.max_keys = check_positive(self, "max_keys", max_keys, integer=True)
        self.encoder = encoder
        if shared is not None and not isinstance(shared, SharedHistory):
            raise ConfigError(f"StatefulDetector: shared={shared!r} is not a SharedHistory (exchange, forget, dtype)")
        self.shared, self.name = shared, str(name)
        self.threshold = None if threshold is None else float(check_positive(self, "threshold", threshold))
        self.threshold_ = self.threshold  # calibrate() replaces it
        self._store: KeyStore[_KeyState] = KeyStore(_KeyState, max_keys=self.max_keys)

    def _knn_means(self, st: _KeyState, f: torch.Tensor) -> torch.Tensor:
        """Mean distance of each row of ``f`` to its k nearest earlier queries (inf where fewer than k exist)."""
        n = len(f)
        past = f.new_zeros(0, f.shape[1]) if st.feats is None else st.feats[: st.filled]
        d_past = torch.cdist(f, past) if len(past) else f.new_zeros(n, 0)
        d_new = torch.cdist(f, f).masked_fill(~torch.ones(n, n, dtype=torch.bool, device=f.device).tril(-1),
                                               float("inf"))
        d = torch.cat([d_past, d_new], 1)
        kk = min(self.k, d.shape[1])
        if kk == 0:
            return f.new_full((n,), float("inf"))
        near = d.topk(kk, dim=1, largest=False).values.mean(1)
        enough = (len(past) + torch.arange(n, device=f.device)) >= self.k
        return torch.where(enough, near, torch.full_like(near, float("inf")))

    def _push(self, st: _KeyState, f: torch.Tensor) -> None:
        f = f[-self.history:]
        if st.feats is None:
            st.feats = f.new_zeros(self.history, f.shape[1])
        idx = (st.ptr + torch.arange(len(f), device=f.device)) % self.history
        st.feats[idx] = f
        st.ptr = int((st.ptr + len(f)) % self.history)
        st.filled = min(self.history, st.filled + len(f))

    def observe(self, key: str, x: torch.Tensor) -> QueryVerdict:
        """Score each query of the batch against the key's recent queries, then remember them."""
        if self.threshold_ is None:
            raise ConfigError("StatefulDetector: no threshold; pass threshold= or call calibrate() on benign streams")
        st = self._store.get(key)
        f = encode(self.encoder, x)
        before = st.n_seen
        if self.shared is not None:
            f = f.to(self.shared.dtype).float()
            ex = self.shared.exchange(detector=self.name, key=key, feats=f, since=st.since, window=self.history)
            if ex is not None:
                if len(ex.earlier):
                    self._push(st, ex.earlier.to(device=f.device, dtype=f.dtype))
                before, st.since = ex.n_before, ex.n_before + len(x)
        dist = self._knn_means(st, f)
        self._push(st, f)
        st.n_seen = before + len(x)
        flags = dist < self.threshold_
        suspicion = (self.threshold_ / dist.clamp_min(1e-12)).where(torch.isfinite(dist), torch.zeros_like(dist))
        return QueryVerdict(bool(flags.any()), float(suspicion.max()) if len(x) else 0.0, st.n_seen,
                            first_flag(flags, before), int(flags.sum()))

    def calibrate(self, streams: Sequence[torch.Tensor], *, fpr: float | None = None) -> "StatefulDetector":
        """Set ``threshold_`` to the ``fpr`` quantile (default ``self.fpr``) of benign per-query k-NN distances
        (streams in order)."""
        fpr = self.fpr if fpr is None else float(check_fraction(self, "fpr", fpr))
        scores = []
        for s in streams:
            st = _KeyState()
            for i in range(0, len(s), _CALIBRATION_CHUNK):
                f = encode(self.encoder, s[i:i + _CALIBRATION_CHUNK])
                scores.append(self._knn_means(st, f))
                self._push(st, f)
        all_scores = torch.cat(scores) if scores else torch.empty(0)
        all_scores = all_scores[torch.isfinite(all_scores)]
        if len(all_scores) == 0:
            raise ConfigError(f"StatefulDetector: calibration needs streams longer than k={self.k} queries")
        self.threshold_ = float(torch.quantile(all_scores.double(), fpr))
        return self

    def reset(self, key: str | None = None) -> None:
        self._store.reset(key)
