"""Out-of-memory back-off: halve the batch and retry (CPU test with a computation that fails above a size)."""
from __future__ import annotations

import pytest
import torch

from safedl.errors import ConfigError
from safedl.utils.backoff import run_with_backoff


def _fits(limit):
    calls = []

    def fn(sl):
        calls.append(sl.stop - sl.start)
        if sl.stop - sl.start > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.arange(sl.start, sl.stop)

    return fn, calls


def test_halves_until_it_fits_and_keeps_every_sample_in_order():
    fn, calls = _fits(40)
    out, rep = run_with_backoff(fn, 250, batch_size=128)
    assert torch.equal(torch.cat(out), torch.arange(250))
    assert rep.failed_sizes == [128, 64] and rep.used == 32 and rep.requested == 128
    assert calls[:3] == [128, 64, 32] and max(calls[3:]) == 32
    assert "ran at batch size 32" in rep.note


def test_no_oom_no_note():
    fn, calls = _fits(1000)
    out, rep = run_with_backoff(fn, 250, batch_size=100)
    assert calls == [100, 100, 50] and rep.note is None and rep.used == 100


def test_gives_up_at_min_batch_and_rejects_bad_sizes():
    fn, _ = _fits(3)
    with pytest.raises(torch.OutOfMemoryError):
        run_with_backoff(fn, 20, batch_size=16, min_batch=8)
    with pytest.raises(ConfigError, match="batch_size"):
        run_with_backoff(fn, 20, batch_size=0)


def test_other_errors_are_not_swallowed():
    def fn(sl):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape"):
        run_with_backoff(fn, 10, batch_size=4)


def test_run_evasion_backs_off_and_reports(tiny_model, eval_batch):
    from safedl import registry
    from safedl.evaluate.attack_evasion import run_evasion

    x, y = eval_batch
    fgsm = registry.create("evasion", "fgsm", eps=0.1)

    def limited(model, xb, yb, *, target=None):
        if len(xb) > 32:
            raise torch.OutOfMemoryError("simulated")
        return fgsm(model, xb, yb, target=target)

    reports = []
    x_adv, _, _, _ = run_evasion(tiny_model, limited, x, y, target=None, batch_size=128, on_backoff=reports.append)
    assert torch.allclose(x_adv, fgsm(tiny_model, x, y), atol=1e-6)  # FGSM is per sample: same examples
    assert reports[0].used == 32 and reports[0].failed_sizes == [128, 64]
