"""Where a query detector's per-key history can be shared: the interface (``SharedHistory``) and what one exchange
returns (``Exchange``). A detector that keeps a window of each key's recent queries (the stateful k-NN detector;
any copycat detector over feature vectors) appends each observed batch's features to the shared history and, in
the same exchange, gets the features the other writers (workers, replicas) appended for the key since it last
asked, so that it judges the union of the key's queries, not only the share one process saw.

The database implementation is serve/stores/history.py (SQLite or PostgreSQL, the service's stores); tests and
simulations may pass any object with this shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Exchange:
    """The answer to one ``SharedHistory.exchange``.

    ``earlier``: M x D features the other writers appended for the key after the caller's ``since`` (all writers'
    last ``window`` queries when ``since`` is None), oldest first; every one of them precedes the batch.
    ``n_before``: the key's query count over all writers before the batch (the batch's queries are numbered
    ``n_before + 1 ...``; the caller's next ``since`` is ``n_before + len(batch)``). ``lost``: queries of the key before the batch that ``earlier`` does not hold
    although the caller asked for them (dropped as the oldest, or written with another feature size).
    """

    earlier: torch.Tensor
    n_before: int
    lost: int = 0


@runtime_checkable
class SharedHistory(Protocol):
    """A per-key history of feature vectors shared by every process that observes the key's queries."""

    #: the dtype features are stored in (a detector rounds its own copy the same way, so every writer judges the
    #: same numbers)
    dtype: torch.dtype

    def exchange(self, *, detector: str, key: str, feats: torch.Tensor, since: int | None,
                 window: int) -> Exchange | None:
        """Append ``feats`` (N x D, the batch) under ``(detector, key)`` and return what others wrote since
        ``since`` (the caller's count after its previous exchange; None: it holds nothing of the key), at most
        the last ``window`` queries before the batch. None: the shared history is unavailable for this batch
        (the caller goes on with what it holds; the batch is not shared)."""
        ...

    def forget(self, *, detector: str, key: str | None = None) -> None:
        """Delete the detector's shared history of ``key`` (every key when None)."""
        ...
