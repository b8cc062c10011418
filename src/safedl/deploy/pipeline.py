"""The defended system as one object: preprocessors -> detectors -> model -> postprocessors (the layered pipeline
of ART's documentation and of production secure-vision services).

The offline defense evaluation measures exactly this object, a bundle stores it, and the HTTP service serves it,
so what is deployed is what was measured.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from safedl.defenses.adaptive import BPDA, defended_model
from safedl.defenses.protocols import (CertifierProtocol, DetectorProtocol, PostprocessorProtocol,
                                       PreprocessorProtocol)
from safedl.deploy.detector_guard import DetectorFailurePolicy, GuardedScoring
from safedl.deploy.output_sanity import REASON as SANITY_REASON
from safedl.deploy.output_sanity import OutputSanity
from safedl.deploy.shared_forward import can_share, shared_forward, sharing_detectors
from safedl.errors import ConfigError
from safedl.utils.tensors import eval_mode, model_device


@dataclass(frozen=True)
class Decision:
    """What the defended system answers for a batch of N images.

    ``labels``: the model's label (also for rejected images); ``probs``: N x K scores after the postprocessors
    (vote shares under randomized smoothing); ``rejected``: a detector flagged the image or the certifier
    abstained; ``reasons``: None, ``"detector:<name>"`` (the first detector over its threshold),
    ``"abstain:<certifier>"`` or ``"sanity:overconfident_far"`` (the output sanity check); ``detector_scores`` / ``thresholds``: per detector name; ``bundle_version``: the
    bundle that decided (set by the service, which may swap bundles); ``detector_failures``: per detector that
    failed under a ``fail_open`` policy, why (its scores and threshold are then absent: deploy/detector_guard.py).
    """

    labels: torch.Tensor
    probs: torch.Tensor
    rejected: torch.Tensor
    reasons: list[str | None]
    detector_scores: dict[str, torch.Tensor]
    thresholds: dict[str, float]
    bundle_version: str | None = None
    detector_failures: dict[str, str] = field(default_factory=dict)

    def accepted_correct(self, y: torch.Tensor) -> torch.Tensor:
        """Per image: accepted and classified as ``y`` (clean accuracy counts these)."""
        return (self.labels == y.to(self.labels.device)) & ~self.rejected

    def defended(self, y: torch.Tensor) -> torch.Tensor:
        """Per image: rejected or classified as ``y`` (robust accuracy counts these)."""
        return self.rejected | (self.labels == y.to(self.labels.device))


class PreprocessedDetector:
    """A detector that sees the output of the preprocessors in front of it: the deployed score runs the real
    preprocessors, the differentiable ``score_torch`` goes through BPDA for non-differentiable ones, so
    detector-aware attacks get gradients."""

    def __init__(self, detector: Any, preprocessors: Sequence[nn.Module]):
        self.detector = detector
        self.real = nn.Sequential(*preprocessors)
        self.adaptive = nn.Sequential(*[p if p.differentiable else BPDA(p) for p in preprocessors])

    @property
    def name(self) -> str:
        return self.detector.registry_name

    @property
    def threshold_(self) -> float:
        return self.detector.threshold_

    @property
    def score_scale_(self) -> float:
        return self.detector.score_scale_

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.detector.score(self.real(x))

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.score_torch(self.adaptive(x))


def _check(components: Sequence[Any], protocol: type, kind: str) -> list[Any]:
    for c in components:
        if not isinstance(c, protocol):
            raise ConfigError(f"SecurePipeline: {type(c).__name__} is not a {kind} (it lacks the {protocol.__name__} "
                              "interface)")
    return list(components)


class SecurePipeline:
    """preprocessors -> detectors -> model -> postprocessors, or a certifier around the model.

    ``decide(x)`` answers a batch (:class:`Decision`). Detectors score the preprocessed input (the raw input for
    one that ``sees_raw_input``) and must be fitted already. Inference is thread-safe (one lock around a decision) and deterministic for a given input batch:
    randomized preprocessors restart their seeded generators at every decision. A certifier (randomized smoothing)
    replaces the plain forward pass with its PREDICT and cannot be combined with pre- or postprocessors.
    """

    def __init__(self, *, model: nn.Module, preprocessors: Sequence[nn.Module] = (), detectors: Sequence[Any] = (),
                 postprocessors: Sequence[nn.Module] = (), certifier: Any = None,
                 class_names: Sequence[str] | None = None, input_shape: Sequence[int] | None = None,
                 batch_size: int = 256, detector_failure: DetectorFailurePolicy | None = None,
                 output_sanity: OutputSanity | None = None, share_forward: bool = True):
        self.preprocessors = _check(preprocessors, PreprocessorProtocol, "preprocessor")
        self.postprocessors = _check(postprocessors, PostprocessorProtocol, "postprocessor")
        self.detectors = [PreprocessedDetector(d, () if d.sees_raw_input else self.preprocessors)
                          for d in _check(detectors, DetectorProtocol, "detector")]
        if certifier is not None:
            _check([certifier], CertifierProtocol, "certifier")
            if self.preprocessors or self.postprocessors:
                raise ConfigError("SecurePipeline: a certifier (randomized smoothing) certifies the model alone; it "
                                  "cannot be combined with preprocessors or postprocessors")
            certifier.with_model(model)
        self.model, self.certifier = model.eval(), certifier
        self.deployed = defended_model(self.preprocessors, self.model, self.postprocessors, adaptive=False).eval()
        self.class_names = list(class_names) if class_names is not None else None
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
        self.batch_size = int(batch_size)
        # None (the offline evaluation): a detector's exception propagates; a bundle's policy otherwise
        self.detector_failure = detector_failure
        self._guard = GuardedScoring(detector_failure) if detector_failure is not None else None
        self.output_sanity = output_sanity  # deploy/output_sanity.py: a confident answer far from the training data
        # deploy/shared_forward.py: detectors scoring from the served model's logits join its forward pass (their
        # work then runs inline, without the policy's timeout); False: every detector scores in its own thread
        self.share_forward = bool(share_forward)
        self._sharing = sharing_detectors(self.detectors) \
            if can_share(preprocessors=self.preprocessors, certifier=certifier) else []
        self._lock = threading.Lock()

    # -- what the pipeline holds ------------------------------------------------------------------------------
    @property
    def components(self) -> list[Any]:
        """Every defense component in deployment order (input side first)."""
        cert = [self.certifier] if self.certifier is not None else []
        return [*self.preprocessors, *(d.detector for d in self.detectors), *cert, *self.postprocessors]

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def to(self, device: torch.device | str) -> "SecurePipeline":
        self.model.to(device)
        for d in self.detectors:
            fitted = getattr(d.detector, "model_", None)
            if isinstance(fitted, nn.Module):
                fitted.to(device)
        return self

    def attack_surface(self, *, eot_samples: int = 8, bpda: str = "approx") -> nn.Module:
        """The classifier as an adaptive attacker sees it (BPDA, EOT, straight-through postprocessors)."""
        return defended_model(self.preprocessors, self.model, self.postprocessors, adaptive=True,
                              eot_samples=eot_samples, bpda=bpda)

    # -- inference --------------------------------------------------------------------------------------------
    def decide(self, x: torch.Tensor, *, with_detectors: bool = True) -> Decision:
        """Classify and screen a batch x (float N x C x H x W in [0, 1]); ``with_detectors=False`` skips the
        detectors (the classifier's own answer, as the metrics of detection need)."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"SecurePipeline.decide: x must be a float N x C x H x W tensor, got {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"SecurePipeline.decide: images must be {self.input_shape} (C, H, W), got "
                             f"{tuple(x.shape[1:])}")
        with self._lock, torch.no_grad():
            self._restart_randomness()
            shared = [d for d in self._sharing if d.detector.model_ is self.model] \
                if with_detectors and self.share_forward else []
            if shared:
                labels, probs, abstain, scores, failures = self._classify_shared(x, shared)
            else:
                labels, probs, abstain = self._classify(x)
                scores, failures = {}, {}
            if with_detectors:
                rest, rest_failures = self._score(x, [d for d in self.detectors if d not in shared])
                scores, failures = {**scores, **rest}, {**failures, **rest_failures}
            scores = {d.name: scores[d.name] for d in self.detectors if d.name in scores}  # deployment order
        thresholds = {d.name: float(d.threshold_) for d in self.detectors if d.name in scores}
        rejected = abstain.clone()
        reasons: list[str | None] = [f"abstain:{self.certifier.registry_name}" if a else None for a in abstain.tolist()]
        for name, s in scores.items():
            flagged = s > thresholds[name]
            for i in torch.nonzero(flagged & ~rejected).flatten().tolist():
                reasons[i] = f"detector:{name}"
            rejected |= flagged
        if self.output_sanity is not None and with_detectors:
            insane = self.output_sanity.check(x, probs) & ~rejected
            for i in torch.nonzero(insane).flatten().tolist():
                reasons[i] = SANITY_REASON
            rejected |= insane
        return Decision(labels=labels, probs=probs, rejected=rejected, reasons=reasons, detector_scores=scores,
                        thresholds=thresholds, detector_failures=failures)

    def _score(self, x: torch.Tensor, detectors: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """These detectors' scores, under the detector failure policy when there is one."""
        if not detectors:
            return {}, {}
        if self._guard is None:
            return {d.name: d.score(x).to(x.device) for d in detectors}, {}
        return self._guard.score(detectors, x)

    def _classify_shared(self, x: torch.Tensor, shared: list[Any]) -> tuple[Any, ...]:
        """The classifier and the forward-sharing detectors in one pass (deploy/shared_forward.py)."""
        with eval_mode(self.deployed):
            out, scores, failures = shared_forward(x, preprocessors=self.preprocessors, model=self.model,
                                                   post=self.deployed.post, detectors=shared,
                                                   batch_size=self.batch_size, guard=self._guard)
        labels, probs, abstain = self._answer(out, x)
        return labels, probs, abstain, scores, failures

    def _classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.certifier is not None:
            labels, probs = self.certifier.predict_with_shares(x)
            labels, probs = labels.to(x.device), probs.to(x.device)
            abstain = labels < 0
            return torch.where(abstain, probs.argmax(1), labels), probs, abstain
        dev = model_device(self.model)
        outs = []
        with eval_mode(self.deployed):
            for i in range(0, len(x), self.batch_size):
                outs.append(self.deployed(x[i:i + self.batch_size].to(dev)).to(x.device))
        out = torch.cat(outs) if outs else torch.empty(0, 0, device=x.device)
        return self._answer(out, x)

    def _answer(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the deployed module returns logits (no postprocessors) or log-scores (postprocessors)
        probs = out.softmax(1) if not self.postprocessors else out.exp()
        return out.argmax(1), probs, torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def _restart_randomness(self) -> None:
        for p in self.preprocessors:
            p.__dict__.pop("_gens", None)
