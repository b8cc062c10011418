"""Micro-batching: concurrent requests share one forward pass, each gets exactly its own rows back, a lone request
runs at once in the caller's thread, and stop() answers every queued request first."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from safedl.serve.batcher import MicroBatcher


@dataclass(frozen=True)
class D:
    labels: torch.Tensor
    probs: torch.Tensor
    rejected: torch.Tensor
    reasons: list
    detector_scores: dict
    thresholds: dict


class Recorder:
    """decide(x): label = the image's first pixel (so rows can be traced), records batch sizes and threads."""

    def __init__(self, delay: float = 0.0):
        self.sizes, self.threads, self.delay = [], [], delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x):
        self.gate.wait(10)
        self.sizes.append(x.shape[0])
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        lab = x[:, 0, 0, 0].long()
        return D(lab, torch.nn.functional.one_hot(lab, 50).float(), lab % 2 == 1,
                 ["odd" if v % 2 else None for v in lab.tolist()], {"s": x[:, 0, 0, 0] * 2}, {"s": 1.0})


def _img(v, n=1):
    return torch.full((n, 1, 2, 2), float(v))


def test_concurrent_requests_share_one_forward_pass_and_get_their_own_rows():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=64, max_wait_s=0.05)
    b.start()
    try:
        rec.gate.clear()  # hold the model: the first job blocks it, the next ones queue up
        first = b.submit(_img(1))
        time.sleep(0.05)
        for _ in range(6):
            b.expect()
        futs = [b.submit(_img(v, n=v % 3 + 1)) for v in range(10, 16)]
        rec.gate.set()
        out = [f.result(10) for f in futs]
        assert first.result(10)["labels"].tolist() == [1]
    finally:
        b.stop()
    assert rec.sizes == [1, sum(v % 3 + 1 for v in range(10, 16))]  # six requests, one forward pass
    for v, o in zip(range(10, 16), out):
        n = v % 3 + 1
        assert o["labels"].tolist() == [v] * n and o["rejected"].tolist() == [v % 2 == 1] * n
        assert o["detector_scores"]["s"].tolist() == [2.0 * v] * n and o["reasons"] == (["odd" if v % 2 else None] * n)


def test_batches_respect_max_batch():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=4, max_wait_s=0.05)
    b.start()
    try:
        rec.gate.clear()
        first = b.submit(_img(0))
        time.sleep(0.05)
        futs = [b.submit(_img(v)) for v in range(1, 10)]
        rec.gate.set()
        assert [f.result(10)["labels"].tolist() for f in futs] == [[v] for v in range(1, 10)]
        first.result(10)
    finally:
        b.stop()
    assert max(rec.sizes) <= 4 and sum(rec.sizes) == 10


def test_lone_request_runs_inline_and_busy_model_defers():
    rec = Recorder(delay=0.2)
    b = MicroBatcher(rec, max_batch=8, max_wait_s=0.003)
    b.start()
    try:
        b.expect()
        d = b.try_inline(_img(3))
        assert d["labels"].tolist() == [3] and rec.threads[-1] == threading.current_thread().name
        busy = b.submit(_img(4))  # the model thread now holds the model for 0.2 s
        time.sleep(0.05)
        b.expect()
        assert b.try_inline(_img(5)) is None  # busy: the caller submits instead
        assert b.submit(_img(5)).result(10)["labels"].tolist() == [5] and busy.result(10)["labels"].tolist() == [4]
        assert rec.threads[-1] == "safedl-model"
    finally:
        b.stop()


def test_stop_answers_every_queued_request():
    rec = Recorder(delay=0.01)
    b = MicroBatcher(rec, max_batch=2, max_wait_s=0.0)
    b.start()
    rec.gate.clear()
    futs = [b.submit(_img(v)) for v in range(7)]
    rec.gate.set()
    b.stop()
    assert [f.result(0)["labels"].tolist() for f in futs] == [[v] for v in range(7)]
