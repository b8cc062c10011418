"""Dynamic micro-batching: concurrent requests share one forward pass (the way TorchServe's batch_delay and
Triton's dynamic batcher with max_queue_delay do), off the event loop, in one model thread.

Our variant: a batch waits for more requests (at most ``max_wait_s``, at most ``max_batch`` images) only while
other requests have been admitted but not yet submitted (``expect()``/``cancel()``), so a lone client pays no wait;
and when the model is idle and no other request is queued or expected, ``try_inline`` runs the batch of one in the
calling worker thread (still off the event loop), saving the hand-off to the model thread. One forward pass runs
at a time either way.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("safedl.serve.batcher")
_STOP = object()


@dataclass
class _Job:
    x: torch.Tensor
    future: cf.Future


def slice_decision(d: Any, start: int, stop: int) -> dict:
    """Rows [start, stop) of a Decision as a plain dict of tensors/lists (the batch is split back per request)."""
    return {"labels": d.labels[start:stop], "probs": d.probs[start:stop], "rejected": d.rejected[start:stop],
            "reasons": list(d.reasons[start:stop]),
            "detector_scores": {k: v[start:stop] for k, v in d.detector_scores.items()},
            "thresholds": dict(d.thresholds), "bundle_version": getattr(d, "bundle_version", None),
            "detector_failures": dict(getattr(d, "detector_failures", None) or {})}


class MicroBatcher:
    def __init__(self, decide: Callable[[torch.Tensor], Any], *, max_batch: int = 64, max_wait_s: float = 0.003,
                 on_batch: Callable[[int], None] | None = None):
        self.decide = decide
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._expected = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._carry: _Job | None = None
        self._busy = threading.Lock()  # held during every forward pass
        self._closed = False  # set (under _lock) before the stop marker: no job is queued after it

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def exclusive(self) -> threading.Lock:
        """The model lock: while it is held no forward pass runs (a bundle swap holds it to change the pipeline)."""
        return self._busy

    def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="safedl-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every queued job, then stop (graceful shutdown)."""
        if self._thread is not None:
            with self._lock:
                self._closed = True
                self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def expect(self) -> None:
        """A request was admitted and will submit soon: a forming batch may wait for it."""
        with self._lock:
            self._expected += 1

    def cancel(self) -> None:
        """An expected request will not submit (it failed before the model)."""
        with self._lock:
            self._expected = max(0, self._expected - 1)

    def try_inline(self, x: torch.Tensor) -> dict | None:
        """``slice_decision`` of ``x`` computed now in this thread if the model is idle and no other request is
        queued or expected; None otherwise (then ``submit`` it). Counts as this request's submission."""
        if self._expected > 1 or not self._queue.empty() or not self.running or not self._busy.acquire(blocking=False):
            return None
        try:
            with torch.inference_mode():
                d = self.decide(x)
        finally:
            self._busy.release()
        with self._lock:  # submitted (on an error the caller's cancel() does this)
            self._expected = max(0, self._expected - 1)
        if self.on_batch is not None:
            self.on_batch(x.shape[0])
        return slice_decision(d, 0, x.shape[0])

    def submit(self, x: torch.Tensor) -> cf.Future:
        """Queue images ``x`` [n, C, H, W]; the future gets ``slice_decision`` of their rows."""
        fut = self.try_submit(x)
        if fut is None:
            fut = cf.Future()
            fut.set_exception(RuntimeError("the model worker is not running"))
        return fut

    def try_submit(self, x: torch.Tensor) -> cf.Future | None:
        """``submit``, or None when this batcher is stopping or stopped (nothing queued: the caller may send
        the images elsewhere). A job queued here is always answered: the stop marker goes in after it."""
        fut: cf.Future = cf.Future()
        with self._lock:
            self._expected = max(0, self._expected - 1)
            if self._closed or not self.running:
                return None
            self._queue.put(_Job(x, fut))
        return fut

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, n = [first], first.x.shape[0]
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._expected == 0:
                    break
                try:
                    job = self._queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if job is _STOP:
                return jobs, True
            if n + job.x.shape[0] > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            n += job.x.shape[0]
        return jobs, False

    def _run(self) -> None:
        while True:
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                first = self._queue.get()
            if first is _STOP:
                break
            jobs, saw_stop = self._gather(first)
            self._forward(jobs)
            if saw_stop:
                break
        leftover = [self._carry] if self._carry is not None else []  # queued before the stop marker
        self._carry = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                leftover.append(job)
        for job in leftover:
            self._forward([job])

    def _forward(self, jobs: list[_Job]) -> None:
        try:
            x = jobs[0].x if len(jobs) == 1 else torch.cat([j.x for j in jobs])
            with self._busy, torch.inference_mode():
                d = self.decide(x)
            if self.on_batch is not None:
                self.on_batch(x.shape[0])
        except Exception as exc:  # the model failed: every request in the batch gets the error
            log.exception("model batch of %d requests failed", len(jobs))
            for j in jobs:
                j.future.set_exception(exc)
            return
        start = 0
        for j in jobs:
            stop = start + j.x.shape[0]
            j.future.set_result(slice_decision(d, start, stop))
            start = stop
