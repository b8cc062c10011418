"""Adaptive attacks on defended systems (Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018; Tramer et al., "On Adaptive Attacks to Adversarial Example Defenses", NeurIPS 2020).

- :class:`BPDA`: forward through the real (non-differentiable) preprocessor, backward through its differentiable
  approximation (identity unless the preprocessor provides one).
- :class:`EOT`: Expectation over Transformation for randomized defenses: the wrapped model's output is the log of
  the softmax averaged over ``samples`` random draws, so any loss an attack takes on it has the average gradient.
- :func:`defended_model`: preprocessors -> model -> postprocessors as one ``nn.Module`` any registered evasion
  attack can run against; with ``adaptive=True`` it is the attacker-facing version (BPDA, EOT, straight-through
  postprocessing), with ``adaptive=False`` it is the deployed system itself.
- :func:`strong_adaptive_suite`: APGD-CE and APGD-DLR with restarts through BPDA/EOT on the defended system,
  per-sample worst case (the headline adaptive robust accuracy, with its budget).
- :class:`DetectorAwarePGD`: PGD on cross-entropy minus ``lam`` times the detectors' scores, so the examples fool
  the classifier while staying under the detectors' thresholds (Carlini & Wagner, "Adversarial Examples Are Not
  Easily Detected", AISec 2017).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.base import make_generator
from safedl.attacks.evasion._lp import pgd_steps, random_start
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
                 *, adaptive: bool = True, eot_samples: int = 8, bpda: str = "approx"):
        super().__init__()
        check_choice("defended_model", "bpda", bpda, ("approx", "identity"))
        self.preprocessors = nn.ModuleList(preprocessors)
        self.model = model
        self.adaptive = adaptive
        self.randomized = any(getattr(p, "randomized", False) for p in preprocessors)
        stages: list[nn.Module] = []
        for p in preprocessors:
            nondiff = adaptive and not getattr(p, "differentiable", True)
            stages.append(BPDA(p, identity=bpda == "identity") if nondiff else p)
        inner: nn.Module = nn.Sequential(*stages, model)
        if adaptive and self.randomized:
            inner = EOT(inner, samples=eot_samples)
        self.inner = inner
        self.post = _Post(postprocessors, straight_through=adaptive) if postprocessors else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return self.post(out) if self.post is not None else out


def defended_model(preprocessors: Sequence[nn.Module], model: nn.Module, postprocessors: Sequence[Callable] | None = None,
                   *, adaptive: bool = True, eot_samples: int = 8, bpda: str = "approx") -> DefendedModel:
    """The defended system as an ``nn.Module`` that any registered evasion attack can attack.

    ``adaptive=True``: non-differentiable preprocessors are wrapped in BPDA, randomized ones are averaged with EOT
    over ``eot_samples`` draws, and postprocessors are straight-through (forward value kept, gradient of the raw
    log-softmax); ``bpda="identity"`` ignores the preprocessors' own approximations (a smooth surrogate can have
    vanishing gradients, e.g. JPEG's cubic rounding, so an evaluation should try both). ``adaptive=False``: exactly
    the deployed computation. The output is logits or log-scores, so an
    attack's softmax/cross-entropy sees the defended scores.
    """
    return DefendedModel(list(preprocessors), model, list(postprocessors or []), adaptive=adaptive,
                         eot_samples=eot_samples, bpda=bpda)


class DetectorAwarePGD:
    """PGD that fools the classifier and evades detectors at once (Carlini & Wagner 2017's combined objective).

    It minimises, per sample, ``relu(margin + kappa) + lam * sum_d relu((s_d(x') - t_d) / scale_d + m)``: the
    classification margin of the true label (or the target's, when targeted) and each detector's score above its
    threshold ``t_d``, in units of the detector's clean-score spread ``scale_d``. Both terms are hinges, so once a
    sample is misclassified the steps work on the detectors and vice versa. Each detector must expose a
    differentiable ``score_torch(x)`` (non-differentiable parts use BPDA inside it), ``threshold_`` and
    ``score_scale_``. Per sample the result is the last iterate that was misclassified and undetected, else the
    final iterate.
    """

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", steps: int = 40, alpha: float | None = None,
                 lam: float = 1.0, kappa: float = 1.0, margin: float = 0.1, seed: int | None = 0):
        self.norm = check_choice("detector_aware_pgd", "norm", norm, ("linf", "l2"))
        self.eps = float(check_positive("detector_aware_pgd", "eps", eps))
        self.steps = check_positive("detector_aware_pgd", "steps", steps, integer=True)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        self.lam = float(check_positive("detector_aware_pgd", "lam", lam, allow_zero=True))
        self.kappa = float(check_positive("detector_aware_pgd", "kappa", kappa, allow_zero=True))
        self.margin = float(check_positive("detector_aware_pgd", "margin", margin, allow_zero=True))
        self.seed = seed

    def _status(self, model, detectors, xa, y, target):
        logits = model(xa)
        onehot = F.one_hot(y if target is None else target, logits.shape[1]).bool()
        own = logits[onehot]
        other = logits.masked_fill(onehot, float("-inf")).max(1).values
        margin = own - other if target is None else other - own  # < 0: the attack succeeds
        det_loss = torch.zeros_like(margin)
        undetected = torch.ones_like(margin, dtype=torch.bool)
        for d in detectors:
            s = d.score_torch(xa)
            det_loss = det_loss + torch.relu((s - d.threshold_) / d.score_scale_ + self.margin)
            undetected &= s.detach() <= d.threshold_
        loss = torch.relu(margin + self.kappa) + self.lam * det_loss
        return loss, (margin.detach() < 0) & undetected

    def __call__(self, model: nn.Module, detectors: Sequence, x: torch.Tensor, y: torch.Tensor, *,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        x = x.detach()
        with eval_mode(model), frozen_params(model):
            delta = random_start(x, self.norm, self.eps, gen)
            best = (x + delta).clone()
            found = torch.zeros(len(x), dtype=torch.bool, device=x.device)

            def keep_successes(xa: torch.Tensor, ok: torch.Tensor) -> None:
                nonlocal best, found
                best = torch.where(ok.view(-1, 1, 1, 1), xa, best)
                found |= ok

            delta = pgd_steps(x, delta, lambda xa: self._status(model, detectors, xa, y, target), steps=self.steps,
                              alpha=self.alpha, norm=self.norm, eps=self.eps, ascend=False, on_step=keep_successes)
            xa = x + delta
            with torch.no_grad():
                _, ok = self._status(model, detectors, xa, y, target)
            best = torch.where((ok | ~found).view(-1, 1, 1, 1), xa, best)
        return best.detach()


@dataclass
class SuiteResult:
    """What :func:`strong_adaptive_suite` found, per sample.

    ``robust``: still correctly classified by the deployed system after every member. ``broken_by``: the index into
    ``members`` of the first member that broke the sample, -1 if none did, -2 if the deployed system already
    misclassified the clean input. ``x_adv``: each sample's adversarial example (its input where nothing broke it).
    ``budget``: norm, eps, steps, restarts, EOT samples and the BPDA surrogates used.
    """

    robust: torch.Tensor
    broken_by: torch.Tensor
    members: list[str]
    x_adv: torch.Tensor
    budget: dict[str, Any]

    def robust_accuracy(self) -> dict[str, Any]:
        from safedl.utils.stats import proportion

        return proportion(int(self.robust.sum()), len(self.robust))


def _suite_members(preprocessors: Sequence[nn.Module], *, eps: float, norm: str, steps: int, restarts: int,
                   seed: int, early_stop: bool = True) -> list[tuple[str, str, Any]]:
    """(name, BPDA surrogate, attack): APGD-CE and APGD-DLR through each useful surrogate (the preprocessors' own
    approximations, and identity when a non-differentiable preprocessor has one)."""
    from safedl.attacks.evasion.apgd_ce import APGDCE
    from safedl.attacks.evasion.apgd_dlr import APGDDLR

    from safedl.defenses.preprocess._base import Preprocessor

    surrogates = ["approx"]
    own = [type(p).approximation is not Preprocessor.approximation for p in preprocessors
           if isinstance(p, Preprocessor) and not p.differentiable]
    if any(own):  # a smooth surrogate can have vanishing gradients (JPEG's rounding): also try identity
        surrogates.append("identity")
    out = []
    for s in surrogates:
        for name, cls in (("apgd_ce", APGDCE), ("apgd_dlr", APGDDLR)):
            label = name if s == "approx" else f"{name}[bpda=identity]"
            out.append((label, s, cls(eps=eps, norm=norm, steps=steps, restarts=restarts, seed=seed,
                                             early_stop=early_stop)))
    return out


def strong_adaptive_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                          seed: int = 0, preprocessors: Sequence[nn.Module] = (),
                          postprocessors: Sequence[Callable] = (), steps: int = 100, restarts: int = 3,
                          eot_samples: int = 8, early_stop: bool = True) -> SuiteResult:
    """A strong adaptive attack on the defended system within one (norm, eps) budget: APGD-CE and APGD-DLR (Croce &
    Hein 2020) with ``restarts`` restarts of ``steps`` steps each, through BPDA (every BPDA surrogate available) and
    EOT over ``eot_samples`` draws for randomized preprocessors (Athalye et al. 2018). Members run in order, each on
    the samples every earlier one left robust; success is judged on the deployed system (no BPDA/EOT), so a result
    is an adversarial example of what is actually deployed. The per-sample worst case is the headline robust
    accuracy; ``budget`` says what produced it. ``early_stop``: each APGD run stops attacking a sample at its first
    success (the same success set, less work).
    """
    check_choice("strong_adaptive_suite", "norm", norm, ("linf", "l2"))
    deployed = defended_model(preprocessors, model, postprocessors, adaptive=False)
    x, y = x.detach(), y.to(x.device)

    def correct(xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(deployed):
            torch.manual_seed(seed)  # randomized defenses: the same draws for every member's check
            return deployed(xa).argmax(1) == y[idx]

    members = _suite_members(preprocessors, eps=eps, norm=norm, steps=steps, restarts=restarts, seed=seed,
                             early_stop=early_stop)
    all_idx = torch.arange(len(x), device=x.device)
    ok0 = correct(x, all_idx)
    broken_by = torch.where(ok0, -1, -2).to(x.device)
    todo, out = all_idx[ok0], x.clone()
    for i, (_, surrogate, attack) in enumerate(members):
        if len(todo) == 0:
            break
        facing = defended_model(preprocessors, model, postprocessors, adaptive=True, eot_samples=eot_samples,
                                bpda=surrogate)
        x_adv = attack(facing, x[todo], y[todo])
        hit = ~correct(x_adv, todo)
        out[todo[hit]] = x_adv[hit]
        broken_by[todo[hit]] = i
        todo = todo[~hit]
    budget = {"norm": norm, "eps": eps, "steps": steps, "restarts": restarts, "eot_samples": eot_samples,
              "bpda": sorted({s for _, s, _ in members}), "seed": seed, "early_stop": early_stop}
    return SuiteResult(robust=broken_by == -1, broken_by=broken_by, members=[m for m, _, _ in members], x_adv=out,
                       budget=budget)
