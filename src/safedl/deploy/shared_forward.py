"""One forward pass for the classifier and every detector that scores from the model's logits.

A feature-squeezing detector (Xu, Evans, Qi, NDSS 2018) compares the model's softmax on the preprocessed input
with its softmax on squeezed copies of it. The classifier computes the first of these anyway, so a pipeline whose
detectors score with the very model it serves runs the preprocessed input and every such detector's derived
inputs through the model as one batch: (1 + k) N images instead of N for the classifier plus (1 + k) N for the
detector, and no hand-off to the detector's thread. Our own optimisation (no paper); the scores are the detector's
own ``score_from_logits`` of the same logits, so a decision is the same as with separate passes up to the
floating-point effect of batching.

It applies only where it cannot change what is computed: no certifier, no randomized preprocessor (each pass
would draw its own noise), and a detector whose fitted ``model_`` is the pipeline's model object.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from safedl.defenses.protocols import ForwardSharingDetectorProtocol
from safedl.deploy.detector_guard import GuardedScoring, checked_scores
from safedl.utils.tensors import model_device


def can_share(*, preprocessors: Sequence[nn.Module], certifier: Any) -> bool:
    """Whether a pipeline of these parts may share its forward pass with detectors at all."""
    return certifier is None and not any(getattr(p, "randomized", False) for p in preprocessors)


def sharing_detectors(detectors: Sequence[Any]) -> list[Any]:
    """The (preprocessed-)detectors whose detector implements the forward-sharing protocol."""
    return [d for d in detectors if isinstance(d.detector, ForwardSharingDetectorProtocol)]


def _policy(guard: GuardedScoring | None, name: str, fn: Callable[[], Any], failures: dict[str, str]) -> Any:
    """``fn()`` under the detector failure policy (None: the offline evaluation, an exception propagates)."""
    return fn() if guard is None else guard.judge_inline(name, fn, failures)


def _derived(d: Any, xp: torch.Tensor) -> torch.Tensor:
    inputs = d.detector.model_inputs(xp)
    n = len(xp)
    if (not isinstance(inputs, torch.Tensor) or inputs.ndim != xp.ndim or tuple(inputs.shape[1:]) != tuple(xp.shape[1:])
            or n == 0 or len(inputs) % n):
        raise ValueError(f"model_inputs must be k x N images of shape {tuple(xp.shape[1:])}, got "
                         f"{getattr(inputs, 'shape', type(inputs).__name__)}")
    return inputs


def shared_forward(x: torch.Tensor, *, preprocessors: Sequence[nn.Module], model: nn.Module, post: nn.Module | None,
                   detectors: Sequence[Any], batch_size: int, guard: GuardedScoring | None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """The deployed output on x (logits, or log-scores after ``post``), the sharing ``detectors``' scores by name
    and, under a fail_open policy, the reasons of those that failed (the caller holds no_grad and eval mode). The model runs on chunks of ``batch_size``
    images of x, each with its derived images (so a chunk is (1 + k) x ``batch_size`` images)."""
    failures: dict[str, str] = {}
    dev = model_device(model)
    xp = x.to(dev)
    for p in preprocessors:
        xp = p(xp)
    n = len(xp)
    derived: list[tuple[Any, torch.Tensor]] = []
    for d in detectors:
        inputs = _policy(guard, d.name, lambda d=d: _derived(d, xp), failures)
        if inputs is not None:
            derived.append((d, inputs))
    own: list[torch.Tensor] = []
    theirs: list[list[torch.Tensor]] = [[] for _ in derived]
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        parts = [xp[i:i + m]]
        for _, inputs in derived:
            parts.extend(inputs[j * n + i: j * n + i + m] for j in range(len(inputs) // n))
        logits = model(torch.cat(parts)) if len(parts) > 1 else model(parts[0])
        own.append(logits[:m])
        off = m
        for k, (_, inputs) in enumerate(derived):
            width = len(inputs) // n * m
            theirs[k].append(logits[off:off + width])
            off += width
    logits = torch.cat(own) if own else torch.empty(0, 0, device=dev)
    scores: dict[str, torch.Tensor] = {}
    for k, (d, inputs) in enumerate(derived):
        chunks = theirs[k]
        s = _policy(guard, d.name, lambda d=d, chunks=chunks: _scores(d, logits, chunks, n, batch_size, guard),
                    failures)
        if s is not None:
            scores[d.name] = s.to(x.device)
    out = post(logits) if post is not None else logits
    return out.to(x.device), scores, failures


def _scores(d: Any, logits: torch.Tensor, chunks: list[torch.Tensor], n: int, batch_size: int,
            guard: GuardedScoring | None) -> torch.Tensor:
    """A detector's N scores, chunk by chunk (each chunk's derived logits are in block order, as fed)."""
    parts = [d.detector.score_from_logits(logits[i:i + batch_size], c)
             for i, c in zip(range(0, n, batch_size), chunks)]
    s = torch.cat(parts) if parts else torch.empty(0, device=logits.device)
    return s if guard is None else checked_scores(s, n)
