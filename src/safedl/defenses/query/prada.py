"""PRADA (Juuti, Szyller, Marchal & Asokan, "PRADA: Protecting Against DNN Model Stealing Attacks", EuroS&P 2019)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from safedl.defenses.query.base import KeyStore, QueryVerdict, encode
from safedl.defenses.query.history import SharedHistory
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive, check_range

_CALIBRATION_CHUNK = 50


@dataclass
class _KeyState:
    growing: torch.Tensor | None = None      # ring of growing-set features: max_growing x D
    growing_cls: torch.Tensor | None = None  # their classes (-1 = empty slot)
    g_ptr: int = 0
    dg_n: torch.Tensor | None = None         # per class: count, sum and sum of squares of the added distances
    dg_s: torch.Tensor | None = None
    dg_ss: torch.Tensor | None = None
    thr: torch.Tensor | None = None          # per class threshold T_c
    dmin: torch.Tensor | None = None         # ring of the last `window` minimum distances
    d_ptr: int = 0
    d_filled: int = 0
    n_seen: int = 0
    since: int | None = None                 # the key's count over all writers after the last shared exchange


#: a class index travels in the shared history as one more feature in its dtype (float16: integers up to 2048 exact)
MAX_SHARED_CLASSES = 2048


@register("query_detector", "prada")
class PRADA:
    """Per key, the minimum distance of each new query to the key's earlier ("growing set") queries of the same
    predicted class; a Shapiro-Wilk W of those distances below ``delta`` flags the key.

    Natural queries give roughly normal minimum distances; synthetic ones (Jacobian augmentation, small fixed
    steps from a seed set) give a spiky distribution and a low W. As in the paper, a query joins its class's growing
    set only when its distance exceeds T_c = max(T_c, mean - std of the distances that admitted earlier members),
    and the test runs once at least ``min_queries`` distances exist. ``classify`` (images -> labels, e.g. the victim's
    answers) groups by class; without it all queries form one group (our simplification). Bounded memory: the growing
    set keeps its last ``max_growing`` members, the distance list its last ``window`` values (the paper keeps all);
    at most ``max_keys`` keys. ``calibrate(benign_streams, fpr)`` sets ``delta_`` to the ``fpr`` quantile of the W
    values benign streams produce (``fpr`` its default target). Distances are L2 in ``encoder``'s feature space
    (pixels without one).

    ``shared`` (a :class:`~safedl.defenses.query.history.SharedHistory`, e.g. the service database's): every batch
    (features and classes) is appended to the key's shared history under ``name`` and, in the same exchange, the
    queries other workers or replicas sent under the key since this one last saw it are run through Algorithm 1
    first, in the history's order, so every process's growing sets and distance list follow the key's whole
    stream and an attacker spreading queries over replicas is flagged at the same query number as on one (each
    process then does the work of the whole stream). Features are rounded to the history's dtype here too. A
    process that first meets a key late starts from the last ``max(window, max_growing)`` queries. While the
    shared history is unavailable a batch is judged on what this process holds.
    """

    def __init__(self, *, delta: float = 0.9, min_queries: int = 100, window: int = 2000, max_growing: int = 2000,
                 num_classes: int = 10, fpr: float = 0.01,
                 classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 encoder: nn.Module | None = None, max_keys: int = 1000, shared: SharedHistory | None = None,
                 name: str = "prada"):
        self.delta = float(check_range(self, "delta", delta, low=0.0, high=1.0, low_inclusive=False))
        self.delta_ = self.delta  # calibrate() replaces it
        self.fpr = float(check_fraction(self, "fpr", fpr))
        self.min_queries = check_range(self, "min_queries", min_queries, low=3, integer=True)
        self.window = check_positive(self, "window", window, integer=True)
        if self.window < self.min_queries:
            raise ConfigError(f"PRADA: window={window} must be at least min_queries={min_queries}")
        self.max_growing = check_positive(self, "max_growing", max_growing, integer=True)
        self.num_classes = check_positive(self, "num_classes", num_classes, integer=True)
        self.max_keys = check_positive(self, "max_keys", max_keys, integer=True)
        self.classify, self.encoder = classify, encoder
        if shared is not None and not isinstance(shared, SharedHistory):
            raise ConfigError(f"PRADA: shared={shared!r} is not a SharedHistory (exchange, forget, dtype)")
        if shared is not None and self.num_classes > MAX_SHARED_CLASSES:
            raise ConfigError(f"PRADA: a shared history holds class indices up to {MAX_SHARED_CLASSES}; "
                              f"num_classes={num_classes}")
        self.shared, self.name = shared, str(name)
        self._store: KeyStore[_KeyState] = KeyStore(_KeyState, max_keys=self.max_keys)

    def _init(self, st: _KeyState, dim: int, device: torch.device) -> None:
        k = self.num_classes  # without classify (and labels) only class 0 is used
        st.growing = torch.zeros(self.max_growing, dim, device=device)
        st.growing_cls = torch.full((self.max_growing,), -1, dtype=torch.long, device=device)
        st.dg_n, st.dg_s, st.dg_ss, st.thr = (torch.zeros(k, dtype=torch.float64) for _ in range(4))
        st.dmin = torch.zeros(self.window, dtype=torch.float64)

    def _ingest(self, st: _KeyState, f: torch.Tensor, cls: torch.Tensor) -> None:
        """Algorithm 1 of the paper for each incoming query (a loop over the batch, vectorised over stored ones)."""
        if st.growing is None:
            self._init(st, f.shape[1], f.device)
        assert st.growing is not None and st.growing_cls is not None and st.dmin is not None
        for i in range(len(f)):
            c = int(cls[i])
            same = st.growing_cls == c
            if not bool(same.any()):
                self._add(st, f[i], c, None)
                continue
            d = float(torch.linalg.vector_norm(st.growing[same] - f[i], dim=1).min())  # only its class's members
            st.dmin[st.d_ptr] = d
            st.d_ptr = (st.d_ptr + 1) % self.window
            st.d_filled = min(self.window, st.d_filled + 1)
            if d > float(st.thr[c]):
                self._add(st, f[i], c, d)

    def _add(self, st: _KeyState, f: torch.Tensor, c: int, d: float | None) -> None:
        st.growing[st.g_ptr] = f
        st.growing_cls[st.g_ptr] = c
        st.g_ptr = (st.g_ptr + 1) % self.max_growing
        if d is None:
            return
        st.dg_n[c] += 1
        st.dg_s[c] += d
        st.dg_ss[c] += d * d
        n = st.dg_n[c]
        mean = st.dg_s[c] / n
        std = (st.dg_ss[c] / n - mean * mean).clamp_min(0).sqrt()
        st.thr[c] = torch.maximum(st.thr[c], mean - std)

    def _w(self, st: _KeyState) -> float | None:
        if st.d_filled < self.min_queries:
            return None
        from scipy.stats import shapiro

        d = st.dmin[: st.d_filled].numpy()
        if float(d.max() - d.min()) <= 1e-12:  # identical distances: as far from normal as it gets
            return 0.0
        return float(shapiro(d).statistic)

    def _classes(self, x: torch.Tensor) -> torch.Tensor:
        if self.classify is None:
            return torch.zeros(len(x), dtype=torch.long)
        with torch.no_grad():
            return self.classify(x).long().cpu()

    def observe(self, key: str, x: torch.Tensor, *, labels: torch.Tensor | None = None) -> QueryVerdict:
        """Update the key's growing set and distance list with the batch, then test their normality. ``labels``:
        the classes the service answered for ``x`` (instead of calling ``classify``)."""
        st = self._store.get(key)
        cls = self._classes(x) if labels is None else labels.long().cpu()
        f, before = encode(self.encoder, x), st.n_seen
        if self.shared is not None:
            f, before = self._exchange(key, st, f, cls)
        self._ingest(st, f, cls)
        st.n_seen = before + len(x)
        w = self._w(st)
        if w is None:
            return QueryVerdict(False, 0.0, st.n_seen)
        flagged = w < self.delta_
        return QueryVerdict(flagged, self.delta_ / max(w, 1e-12), st.n_seen, before + len(x) if flagged else None,
                            len(x) if flagged else 0)

    def _exchange(self, key: str, st: _KeyState, f: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Share the batch and ingest what the others sent first; the batch's features as shared and the key's
        query count before it (over all writers when the exchange answered)."""
        assert self.shared is not None
        f = f.to(self.shared.dtype).float()
        rows = torch.cat((f, cls.to(f.device, f.dtype)[:, None]), 1)
        ex = self.shared.exchange(detector=self.name, key=key, feats=rows, since=st.since,
                                  window=max(self.window, self.max_growing))
        if ex is None:
            return f, st.n_seen
        if len(ex.earlier):
            e = ex.earlier.to(device=f.device, dtype=f.dtype)
            self._ingest(st, e[:, :-1], e[:, -1].round().long())
        st.since = ex.n_before + len(f)
        return f, ex.n_before

    def calibrate(self, streams: Sequence[torch.Tensor], *, fpr: float | None = None) -> "PRADA":
        """Set ``delta_`` to the ``fpr`` quantile (default ``self.fpr``) of the W statistics benign streams produce."""
        fpr = self.fpr if fpr is None else float(check_fraction(self, "fpr", fpr))
        ws = []
        for s in streams:
            st = _KeyState()
            for i in range(0, len(s), _CALIBRATION_CHUNK):
                xb = s[i:i + _CALIBRATION_CHUNK]
                self._ingest(st, encode(self.encoder, xb), self._classes(xb))
                w = self._w(st)
                if w is not None:
                    ws.append(w)
        if not ws:
            raise ConfigError(f"PRADA: calibration needs streams longer than min_queries={self.min_queries}")
        self.delta_ = float(torch.quantile(torch.tensor(ws, dtype=torch.float64), fpr))
        return self

    def reset(self, key: str | None = None) -> None:
        self._store.reset(key)
