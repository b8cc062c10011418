"""A bounded cache of decoded inputs by content hash, per API key: the same bytes sent again by the same key skip
decoding (and the service's resizing and channel conversion), nothing else.

- Per key: an entry is found only by the key that stored it, so a hit can never tell one key that another sent
  the same image (the timing of a hit is a signal only about the key's own earlier uploads). Keys are evicted as
  a whole, least recently used first, once ``max_keys`` hold entries; a key's own entries are evicted least
  recently used first past ``max_bytes_per_key``; the tensors held never exceed ``max_keys * max_bytes_per_key``.
- Only decoding is skipped: the request is authenticated, rate-limited, its declared pixels charged to the key's
  budget, its images to the daily quota, and it is classified, monitored and audited as any other (the caller,
  serve/service.py, does those around ``decode``).
- The hash is the sha256 of the item's bytes as received (for a ``.npy`` item, the whole file); an entry keeps
  the decoded rows, the per-image sha256 and shapes the audit records. Cached tensors are never handed out to be
  changed: the request's batch is a new tensor (``torch.cat``).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from safedl.serve.decode import Decoded, InputError


@dataclass(frozen=True)
class _Entry:
    x: torch.Tensor
    sha256: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        return self.x.element_size() * self.x.nelement()


class InputCache:
    """``decode(key_id, items, decode_items) -> (Decoded, hits)``; ``hits``/``misses`` count items."""

    def __init__(self, *, max_bytes_per_key: int = 2 * 2**20, max_keys: int = 256):
        if max_bytes_per_key < 1 or max_keys < 1:
            raise ValueError("InputCache: max_bytes_per_key and max_keys must be positive")
        self.max_bytes_per_key, self.max_keys = int(max_bytes_per_key), int(max_keys)
        self._keys: OrderedDict[str, OrderedDict[str, _Entry]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def _get(self, key_id: str, digest: str) -> _Entry | None:
        with self._lock:
            entries = self._keys.get(key_id)
            entry = entries.get(digest) if entries is not None else None
            if entry is not None:
                entries.move_to_end(digest)
                self._keys.move_to_end(key_id)
            return entry

    def _put(self, key_id: str, digest: str, entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes_per_key:
            return
        with self._lock:
            entries = self._keys.get(key_id)
            if entries is None:
                while len(self._keys) >= self.max_keys:
                    gone, _ = self._keys.popitem(last=False)
                    self._bytes.pop(gone, None)
                entries = self._keys[key_id] = OrderedDict()
                self._bytes[key_id] = 0
            if digest in entries:
                return
            entries[digest] = entry
            self._bytes[key_id] += entry.nbytes
            while self._bytes[key_id] > self.max_bytes_per_key:
                _, old = entries.popitem(last=False)
                self._bytes[key_id] -= old.nbytes
            self._keys.move_to_end(key_id)

    def decode(self, key_id: str, items: list[bytes],
               decode_items: Callable[[list[bytes]], Decoded]) -> tuple[Decoded, int]:
        """The request's images: cached entries of this key for items seen before, ``decode_items([item])`` for
        each other item; returns the Decoded request and the number of cached items. The caller checks the
        request's totals (image count, pixels) as for any request."""
        if not items:
            return decode_items(items), 0  # refused there (no images)
        digests = [hashlib.sha256(item).hexdigest() for item in items]
        found = [self._get(key_id, d) for d in digests]
        missing = [i for i, e in enumerate(found) if e is None]
        for i in missing:  # one item at a time: its rows are exactly what it decodes to
            fresh = _decode_one(decode_items, items[i], index=i)
            entry = _Entry(x=fresh.x.clone(), sha256=tuple(fresh.sha256), shapes=tuple(tuple(s) for s in fresh.shapes))
            found[i] = entry
            self._put(key_id, digests[i], entry)
        hits = len(items) - len(missing)
        with self._lock:
            self.hits += hits
            self.misses += len(missing)
        out = Decoded(x=torch.cat([e.x for e in found]))
        for item, e in zip(items, found):
            out.sha256 += list(e.sha256)
            out.shapes += [list(s) for s in e.shapes]
            out.raw += [item] * len(e.sha256)
        return out, hits



def _decode_one(decode_items: Callable[[list[bytes]], Decoded], item: bytes, *, index: int) -> Decoded:
    """``decode_items([item])``; a refusal names the item's place in the request (``image <index>``)."""
    try:
        return decode_items([item])
    except InputError as exc:
        if index and exc.message.startswith("image 0"):
            raise InputError(exc.status, exc.code, f"image {index}" + exc.message[len("image 0"):]) from None
        raise
