"""Live adversarial probes of a rollout: a bounded score-based Square attack (Andriushchenko et al., ECCV 2020;
the registry's ``square``, built as ``redteam/runner.make_attack`` builds it) run in process against each version's full defended pipeline
(preprocessors, detectors, model, postprocessors, exactly as a request on a full-tier key sees it), on a fixed
seeded subset of the clean probes; a probe is robust when the version rejects the attack's final image or answers
its true label. Stored adversarial probes were made against the release they came with; a canary whose defense
was removed can still pass them, a live attack on the canary itself does not (check ``live_robust_accuracy_drop``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from safedl import registry
from safedl.deploy.probes import ProbeSet
from safedl.deploy.release_metrics import release_eps

log = logging.getLogger("safedl.serve.rollout")
DEFAULT_SQUARE_EPS = 8 / 255  # L-inf, when the bundle's manifest measured no square attack (redteam's default)


class LaneOracle(nn.Module):
    """A version's decide function as the attack's black box: log of the served probabilities, uniform for a
    rejected image (an uninformative answer, as ``RemoteClassifier(on_reject="uniform")``); counts its queries."""

    def __init__(self, decide: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.decide = decide
        self.queries_ = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decide(x.clamp(0, 1))
        self.queries_ += len(x)
        probs = d.probs.detach().float().cpu().clone()
        rejected = d.rejected.cpu().bool()
        if bool(rejected.any()):
            probs[rejected] = 1.0 / probs.shape[1]
        return probs.clamp_min(1e-30).log()


def live_subset(ps: ProbeSet, *, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` clean probes drawn with ``seed`` (the same images for both versions, every evaluation)."""
    clean = ps.mask("clean").nonzero().flatten()
    gen = torch.Generator().manual_seed(int(seed))
    return clean[torch.randperm(len(clean), generator=gen)[: min(int(n), len(clean))]].sort().values


def bundle_eps(manifest: dict[str, Any]) -> float:
    """The L-inf eps the release measured the square attack at (its threat model), else the red team's default."""
    return release_eps(manifest, "square") or DEFAULT_SQUARE_EPS


def live_robust(decide: Callable[[torch.Tensor], Any], ps: ProbeSet, idx: torch.Tensor, *, eps: float,
                queries_per_image: int, seed: int) -> tuple[torch.Tensor, int]:
    """(robust per probe in ``idx``, queries spent): Square L-inf at ``eps`` with ``queries_per_image``, then the
    final images judged by ``decide``. A version that raises counts as not robust."""
    x, y = ps.x[idx], ps.y[idx]
    oracle = LaneOracle(decide)
    attack = registry.create("evasion", "square", eps=eps, norm="linf", max_queries=queries_per_image, seed=seed)
    try:
        adv = attack(oracle, x, y)
        d = decide(adv)
    except Exception as exc:  # noqa: BLE001 - a failing version is measured, not propagated
        log.warning("live probe attack failed: %s: %s", type(exc).__name__, exc)
        return torch.zeros(len(idx), dtype=torch.bool), oracle.queries_
    robust = d.rejected.cpu().bool() | (d.labels.cpu().long() == y)
    return robust, oracle.queries_ + len(idx)
