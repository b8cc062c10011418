"""The query-detector protocol, its verdict, and the bounded per-key state store they share."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

S = TypeVar("S")


@dataclass(frozen=True)
class QueryVerdict:
    """A detector's answer after one query batch of a key.

    ``flagged``: some query of the batch looks like an attack. ``score``: the batch's highest suspicion in units of
    the threshold (> 1 exactly when flagged; 0 while the key has too few queries to judge). ``n_seen``: queries seen
    from the key so far, this batch included. ``first_at``: the key's query number (1-based) of the batch's first
    flagged query, or None. ``n_flagged``: how many queries of the batch look like an attack.
    """

    flagged: bool
    score: float
    n_seen: int
    first_at: int | None = None
    n_flagged: int = 0


@runtime_checkable
class QueryDetector(Protocol):
    """What the service and the offline simulation rely on: observe one key's query batch, forget a key."""

    def observe(self, key: str, x: torch.Tensor) -> QueryVerdict: ...

    def reset(self, key: str | None = None) -> None: ...


class KeyStore(Generic[S]):
    """Per-key state, at most ``max_keys`` keys: the least recently seen key is forgotten first (bounded memory)."""

    def __init__(self, factory: Callable[[], S], *, max_keys: int):
        self._factory, self.max_keys = factory, int(max_keys)
        self._states: OrderedDict[str, S] = OrderedDict()

    def get(self, key: str) -> S:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = self._factory()
            while len(self._states) > self.max_keys:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._states.clear()
        else:
            self._states.pop(key, None)

    def __len__(self) -> int:
        return len(self._states)


def encode(encoder: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """N x D features: the encoder's output (flattened, no gradients), or the flattened pixels without one."""
    with torch.no_grad():
        if encoder is None:
            return x.detach().flatten(1).float()
        was = encoder.training
        encoder.eval()
        try:
            return encoder(x).flatten(1).float()
        finally:
            encoder.train(was)


def first_flag(flags: torch.Tensor, n_before: int) -> int | None:
    """1-based query number of the first True in ``flags`` (one entry per query of the batch), or None."""
    hits = flags.nonzero()
    return None if len(hits) == 0 else n_before + int(hits[0, 0]) + 1
