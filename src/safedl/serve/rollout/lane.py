"""A version served next to the stable one: its own micro-batcher (so a canary's forward passes never mix with
the stable version's) and, for a shadow, a bounded queue of traffic batches compared off the request path."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from typing import Any, Callable

import torch

from safedl.serve.batcher import MicroBatcher

log = logging.getLogger("safedl.serve.rollout")
SHADOW_QUEUE = 64
RETIRE_MAX_S = 120.0  # a retired lane waits this long at most for its requests in flight (body timeout: 30 s)


def key_share(key_id: str) -> float:
    """Where a key falls in [0, 1): the first 8 bytes of sha256(key id), so a key stays on one version while the
    canary's share only grows (a key on the canary at 5% is still on it at 25%)."""
    return int.from_bytes(hashlib.sha256(key_id.encode()).digest()[:8], "big") / 2.0 ** 64


def tagged_decide(pipe: Any, x: torch.Tensor, version: str) -> Any:
    """The pipeline on its device, the answer back on the CPU, tagged with the bundle version."""
    dev = getattr(pipe, "device", None)
    if dev is None or torch.device(dev).type == "cpu":
        return dataclasses.replace(pipe.decide(x), bundle_version=version)
    d = pipe.decide(x.to(dev))
    return type(d)(labels=d.labels.cpu(), probs=d.probs.cpu(), rejected=d.rejected.cpu(), reasons=d.reasons,
                   detector_scores={k: v.cpu() for k, v in d.detector_scores.items()}, thresholds=d.thresholds,
                   bundle_version=version, detector_failures=d.detector_failures)


class Lane:
    """The canary's or shadow's bundle, batcher and (shadow) comparison thread."""

    def __init__(self, bundle: Any, *, role: str, max_batch: int, max_wait_s: float,
                 on_compare: Callable[[int, int], None] | None = None, on_drop: Callable[[], None] | None = None):
        self.bundle, self.role = bundle, role
        self.batcher = MicroBatcher(self.decide, max_batch=max_batch, max_wait_s=max_wait_s)
        self._on_compare, self._on_drop = on_compare, on_drop
        self._queue: queue.Queue = queue.Queue(maxsize=SHADOW_QUEUE)
        self._thread: threading.Thread | None = None
        self._inflight, self._retired = 0, False
        self._idle = threading.Condition()

    @property
    def version(self) -> str:
        return self.bundle.version

    def decide(self, x: torch.Tensor) -> Any:
        return tagged_decide(self.bundle.pipeline, x, self.version)

    def decide_locked(self, x: torch.Tensor) -> Any:
        """A forward pass outside the batcher (probe runs), holding its model lock."""
        with self.batcher.exclusive(), torch.inference_mode():
            return self.decide(x)

    def start(self) -> None:
        self.batcher.start()
        if self.role == "shadow":
            self._thread = threading.Thread(target=self._compare_loop, name="safedl-shadow", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10.0)
        self.batcher.stop()

    def acquire(self) -> bool:
        """A request is routed here (False once the lane is retired: route it to the stable version)."""
        with self._idle:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        """A request routed here has its answer (or its error)."""
        with self._idle:
            self._inflight = max(0, self._inflight - 1)
            self._idle.notify_all()

    @property
    def inflight(self) -> int:
        with self._idle:
            return self._inflight

    def retire(self, *, grace_s: float, max_s: float | None = None) -> None:
        """No new request is routed here; in a thread, stop once ``grace_s`` seconds passed and every request in
        flight here has finished (at most ``max_s``; a request still in flight after that is re-routed to the
        stable version when it reaches the model, by ``MicroBatcher.try_submit``)."""
        with self._idle:
            self._retired = True
        limit = RETIRE_MAX_S if max_s is None else max_s

        def later() -> None:
            time.sleep(grace_s)
            deadline = time.monotonic() + max(0.0, limit - grace_s)
            with self._idle:
                while self._inflight and time.monotonic() < deadline:
                    self._idle.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                left = self._inflight
            if left:
                log.warning("lane %s stopped with %d request(s) in flight; they go to the stable version",
                            self.version, left)
            self.stop()

        threading.Thread(target=later, name="safedl-lane-retire", daemon=True).start()

    def shadow(self, x: torch.Tensor, labels: torch.Tensor, rejected: torch.Tensor) -> None:
        """Queue a stable answer to be compared with this version's (dropped, and counted, when the queue is full)."""
        try:
            self._queue.put_nowait((x, labels, rejected))
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def _compare_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            x, labels, rejected = item
            try:
                d = self.decide_locked(x)
            except Exception as exc:  # noqa: BLE001 - the shadow never affects the answer
                log.warning("shadow %s failed on a traffic batch: %s", self.version, exc)
                continue
            differ = int(((d.labels != labels) | (d.rejected != rejected)).sum())
            if self._on_compare is not None:
                self._on_compare(int(x.shape[0]), differ)
