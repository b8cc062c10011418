"""Adaptive attacks on defended systems (Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018; Tramer et al., "On Adaptive Attacks to Adversarial Example Defenses", NeurIPS 2020).

- :class:`BPDA`: forward through the real (non-differentiable) preprocessor, backward through its differentiable
  approximation (identity unless the preprocessor provides one).
- :class:`EOT`: Expectation over Transformation for randomized defenses: the wrapped model's output is the log of
  the softmax averaged over ``samples`` random draws, so any loss an attack takes on it has the average gradient.
- :func:`defended_model`: preprocessors -> model -> postprocessors as one ``nn.Module`` any registered evasion
  attack can run against; with ``adaptive=True`` it is the attacker-facing version (BPDA, EOT, straight-through
  postprocessing), with ``adaptive=False`` it is the deployed system itself.
- :class:`DetectorAwarePGD`: PGD on cross-entropy minus ``lam`` times the detectors' scores, so the examples fool
  the classifier while staying under the detectors' thresholds (Carlini & Wagner, "Adversarial Examples Are Not
  Easily Detected", AISec 2017).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.base import input_grad, make_generator
from safedl.attacks.evasion._lp import project, random_start, steepest_step
from safedl.utils.tensors import eval_mode, frozen_params
from safedl.utils.validate import check_choice, check_positive


def bpda(fn: Callable[[torch.Tensor], torch.Tensor], approx: Callable[[torch.Tensor], torch.Tensor] | None,
         x: torch.Tensor) -> torch.Tensor:
    """Value of ``fn(x)``, gradient of ``approx(x)`` (identity when None): approx(x) + (fn(x) - approx(x)).detach()."""
    with torch.no_grad():
        real = fn(x.detach())
    surrogate = x if approx is None else approx(x)
    return surrogate + (real - surrogate).detach()


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation around one preprocessor."""

    def __init__(self, preprocessor: nn.Module, *, identity: bool = False):
        super().__init__()
        self.preprocessor = preprocessor
        self.identity = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approx = None if self.identity else getattr(self.preprocessor, "approximation", None)
        return bpda(self.preprocessor, approx, x)


class EOT(nn.Module):
    """log E_t[softmax(model(x))] estimated with ``samples`` random draws, batched in one forward pass."""

    def __init__(self, model: nn.Module, *, samples: int = 8):
        super().__init__()
        self.model = model
        self.samples = check_positive("eot", "samples", samples, integer=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        rep = x.repeat(self.samples, *([1] * (x.ndim - 1)))
        probs = self.model(rep).softmax(1).view(self.samples, n, -1).mean(0)
        return probs.clamp_min(1e-12).log()


class _Post(nn.Module):
    """Postprocessors (logits -> scores) as a module returning log-scores, so softmax gives the scores back."""

    def __init__(self, postprocessors: Sequence[Callable], *, straight_through: bool):
        super().__init__()
        self.posts = list(postprocessors)
        self.straight_through = straight_through

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.straight_through):
            s = logits
            for i, p in enumerate(self.posts):
                # a postprocessor takes logits; after the first one the input is already scores: pass their log
                s = p(s if i == 0 else s.clamp_min(1e-12).log())
            out = s.clamp_min(1e-12).log()
        if self.straight_through:
            # rounding / labels-only outputs have no useful gradient: the attacker differentiates the raw model
            lsm = logits.log_softmax(1)
            return lsm + (out - lsm).detach()
        return out


class DefendedModel(nn.Module):
    """preprocessors -> model -> postprocessors, as one module (see :func:`defended_model`)."""

    def __init__(self, preprocessors: Sequence[nn.Module], model: nn.Module, postprocessors: Sequence[Callable] = (),
                 *, adaptive: bool = True, eot_samples: int = 8):
        super().__init__()
        self.preprocessors = nn.ModuleList(preprocessors)
        self.model = model
        self.adaptive = adaptive
        self.randomized = any(getattr(p, "randomized", False) for p in preprocessors)
        stages: list[nn.Module] = []
        for p in preprocessors:
            stages.append(BPDA(p) if adaptive and not getattr(p, "differentiable", True) else p)
        inner: nn.Module = nn.Sequential(*stages, model)
        if adaptive and self.randomized:
            inner = EOT(inner, samples=eot_samples)
        self.inner = inner
        self.post = _Post(postprocessors, straight_through=adaptive) if postprocessors else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return self.post(out) if self.post is not None else out


def defended_model(preprocessors: Sequence[nn.Module], model: nn.Module, postprocessors: Sequence[Callable] | None = None,
                   *, adaptive: bool = True, eot_samples: int = 8) -> DefendedModel:
    """The defended system as an ``nn.Module`` that any registered evasion attack can attack.

    ``adaptive=True``: non-differentiable preprocessors are wrapped in BPDA, randomized ones are averaged with EOT
    over ``eot_samples`` draws, and postprocessors are straight-through (forward value kept, gradient of the raw
    log-softmax). ``adaptive=False``: exactly the deployed computation. The output is logits or log-scores, so an
    attack's softmax/cross-entropy sees the defended scores.
    """
    return DefendedModel(list(preprocessors), model, list(postprocessors or []), adaptive=adaptive,
                         eot_samples=eot_samples)


class DetectorAwarePGD:
    """PGD that fools the classifier and evades detectors: maximise CE(model(x'), y) - lam * sum_d s_d(x') / scale_d.

    Each detector must expose a differentiable ``score_torch(x)`` (detectors with non-differentiable parts use
    BPDA inside it) and a ``threshold_``. Scores are divided by the detector's clean-score spread so ``lam`` is
    comparable across detectors. Per sample it keeps the last iterate that is misclassified and under every
    threshold (else the last iterate), so the result is the attacker's best evading example.
    """

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", steps: int = 40, alpha: float | None = None,
                 lam: float = 1.0, seed: int | None = 0):
        self.norm = check_choice("detector_aware_pgd", "norm", norm, ("linf", "l2"))
        self.eps = float(check_positive("detector_aware_pgd", "eps", eps))
        self.steps = check_positive("detector_aware_pgd", "steps", steps, integer=True)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        self.lam = float(check_positive("detector_aware_pgd", "lam", lam, allow_zero=True))
        self.seed = seed

    def __call__(self, model: nn.Module, detectors: Sequence, x: torch.Tensor, y: torch.Tensor, *,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        x = x.detach()
        with eval_mode(model), frozen_params(model):
            delta = random_start(x, self.norm, self.eps, gen)
            best = (x + delta).clone()
            found_any = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            sign, labels = (1.0, y) if target is None else (-1.0, target)
            for _ in range(self.steps):
                xa = (x + delta).requires_grad_(True)
                logits = model(xa)
                ce = F.cross_entropy(logits, labels, reduction="none")
                evade = torch.zeros_like(ce)
                ok = torch.ones_like(ce, dtype=torch.bool)
                for d in detectors:
                    s = d.score_torch(xa)
                    evade = evade + s / d.score_scale_
                    ok &= s.detach() <= d.threshold_
                fooled = (logits.argmax(1) != y) if target is None else (logits.argmax(1) == target)
                best = torch.where((fooled & ok).view(-1, 1, 1, 1), xa.detach(), best)
                found_any |= fooled & ok
                loss = (sign * ce - self.lam * evade).sum()
                g = input_grad(loss, xa)
                delta = project(delta + self.alpha * steepest_step(g, self.norm), self.norm, self.eps)
                delta = (x + delta).clamp(0, 1) - x
            # the final iterate replaces samples that never reached a fooled-and-undetected point
            with torch.no_grad():
                xa = x + delta
                logits = model(xa)
                ok = torch.ones(len(x), dtype=torch.bool, device=x.device)
                for d in detectors:
                    ok &= d.score_torch(xa) <= d.threshold_
                fooled = (logits.argmax(1) != y) if target is None else (logits.argmax(1) == target)
                best = torch.where((found_any & ~(fooled & ok)).view(-1, 1, 1, 1), best, xa)
        return best.detach()
