"""What a deployed system does when one of its detectors fails: the bundle's detector failure policy.

A detector *fails* when its ``score`` raises, does not return within ``timeout_s``, or returns something that is
not one finite score per image (a NaN score would compare below every threshold and pass the image silently).
``fail_closed`` (the default): the batch is refused (:class:`DetectorUnavailable`; the service answers 503).
``fail_open``: the batch is answered without that detector, and the failure is reported in the Decision
(``detector_failures``) so the service counts, logs and audits it.

The timeout is real: each detector scores in its own daemon thread, and the caller waits at most ``timeout_s``
for it. A call that timed out keeps that thread until it returns; meanwhile the detector fails at once (it is
"still busy"), so a hung detector costs each batch nothing more than the refusal. A detector that shares the
classifier's forward pass (deploy/shared_forward.py: feature squeezing) runs in the calling thread instead
(:meth:`GuardedScoring.judge_inline`): its exceptions and non-finite scores go through the policy, the timeout does
not apply (its work is the model's forward pass; ``SecurePipeline.share_forward = False`` gives it its own thread
back). Our own design (no paper); the
fail-closed default follows the secure-defaults principle (Saltzer & Schroeder 1975, "fail-safe defaults").
"""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from safedl.errors import SafedlError, UserError

POLICIES = ("fail_closed", "fail_open")
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 600.0


class DetectorUnavailable(SafedlError, RuntimeError):
    """A detector failed under ``fail_closed``: the batch must not be answered (HTTP 503)."""

    def __init__(self, detector: str, reason: str):
        self.detector, self.reason = detector, reason
        super().__init__(f"detector {detector!r} failed ({reason}); the bundle's policy is fail_closed")


@dataclass(frozen=True, kw_only=True)
class DetectorFailurePolicy:
    """``mode``: fail_closed | fail_open; ``timeout_s``: the longest a detector may score one batch."""

    mode: str = "fail_closed"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise UserError(f"--detector-failure {self.mode!r}: choose one of {' | '.join(POLICIES)}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < float(t) <= MAX_TIMEOUT_S:
            raise UserError(f"--detector-timeout-s {t!r}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")

    def to_manifest(self) -> dict[str, Any]:
        return {"policy": self.mode, "timeout_s": float(self.timeout_s)}

    @classmethod
    def from_manifest(cls, rec: Any, *, where: str) -> "DetectorFailurePolicy":
        """The policy a manifest records (``{"policy": ..., "timeout_s": ...}``); absent: the default."""
        if rec is None:
            return cls()
        if not isinstance(rec, dict) or set(rec) - {"policy", "timeout_s"}:
            raise UserError(f"{where}: detector_failure must be {{'policy': fail_closed | fail_open, 'timeout_s': "
                            f"seconds}}, got {rec!r}")
        return cls(mode=rec.get("policy", "fail_closed"), timeout_s=rec.get("timeout_s", DEFAULT_TIMEOUT_S))


class _Worker:
    """One daemon thread that runs one detector's calls, one at a time."""

    def __init__(self, name: str):
        self._jobs: queue.Queue = queue.Queue()
        self.busy = False
        threading.Thread(target=self._run, name=f"safedl-detector-{name}", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, x, fut = self._jobs.get()
            try:
                with torch.inference_mode():
                    result = fn(x)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller as the detector's failure
                self.busy = False  # before the caller wakes: its next call must not find this one running
                fut.set_exception(exc)
            else:
                self.busy = False
                fut.set_result(result)

    def call(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, timeout_s: float) -> torch.Tensor:
        if self.busy:
            raise TimeoutError("still running a call that timed out")
        fut: cf.Future = cf.Future()
        self.busy = True
        self._jobs.put((fn, x, fut))
        try:
            return fut.result(timeout=timeout_s)
        except cf.TimeoutError:
            raise TimeoutError(f"no score within {timeout_s:g} s") from None


class GuardedScoring:
    """Scores a batch with every detector under ``policy``: ``score(detectors, x) -> (scores, failures)``."""

    def __init__(self, policy: DetectorFailurePolicy):
        self.policy = policy
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()

    def _worker(self, name: str) -> _Worker:
        with self._lock:
            if name not in self._workers:
                self._workers[name] = _Worker(name)
            return self._workers[name]

    def judge_inline(self, name: str, fn: Callable[[], Any], failures: dict[str, str]) -> Any:
        """``fn()`` run in the calling thread for detector ``name`` (a detector that shares the classifier's
        forward pass, deploy/shared_forward.py: its work is that forward, so there is no thread to time out; the
        timeout does not apply): an exception goes through the policy as in :meth:`score` (fail_closed raises
        :class:`DetectorUnavailable`, fail_open records the reason in ``failures`` and returns None)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any failure of a detector is handled by the policy
            reason = f"{type(exc).__name__}: {exc}"[:200]
            if self.policy.mode == "fail_closed":
                raise DetectorUnavailable(name, reason) from exc
            failures[name] = reason
            return None

    def score(self, detectors: list[Any], x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Per detector name its scores, and per failed detector why (fail_open only; fail_closed raises)."""
        scores: dict[str, torch.Tensor] = {}
        failures: dict[str, str] = {}
        for d in detectors:
            try:
                s = self._worker(d.name).call(d.score, x, float(self.policy.timeout_s))
                scores[d.name] = checked_scores(s, len(x)).to(x.device)
            except Exception as exc:  # noqa: BLE001 - any failure of a detector is handled by the policy
                reason = f"{type(exc).__name__}: {exc}"[:200]
                if self.policy.mode == "fail_closed":
                    raise DetectorUnavailable(d.name, reason) from exc
                failures[d.name] = reason
        return scores, failures


def checked_scores(s: Any, n: int) -> torch.Tensor:
    """One finite score per image, or ValueError."""
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != (n,):
        raise ValueError(f"expected {n} scores, got {getattr(s, 'shape', type(s).__name__)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{int((~torch.isfinite(s)).sum())} of {n} scores are not finite (NaN or inf)")
    return s
