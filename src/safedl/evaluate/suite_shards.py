"""The strong adaptive suite of one (defense, attack) pair split into shards that run as separate stages.

:func:`~safedl.defenses.adaptive.strong_adaptive_suite` runs once per evaluation batch, and a batch's result depends
only on that batch's images, the model, the preprocessors and the seed (APGD seeds its own generator per call, the
deployed system's check reseeds, every update is per sample). A shard runs a fixed set of those batches, exactly the
calls the unsplit defense stage would make, so the defense stage that concatenates the shards' batches gets the same
success set and examples as one that ran them itself (tests/test_evaluate_suite_shards.py). The split applies where
building the suite's target is cheap and deterministic: the baseline model behind preprocessors that are neither
learned nor randomized (detectors beside them are fine: the suite does not attack them); defenses that train a
model, fit a preprocessor, draw random numbers or postprocess the scores (a postprocessor may carry state from
earlier calls in the stage, e.g. gaussian_noise's generator) keep the suite in their own stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from safedl import registry
from safedl.defenses.adaptive import SuiteResult, strong_adaptive_suite
from safedl.defenses.preprocess._base import Preprocessor
from safedl.errors import ConfigError
from safedl.evaluate.base import AttackOutcome, EvasionState
from safedl.evaluate.context import RunContext
from safedl.profile import AttackSpec, Profile

SPLIT_KINDS = frozenset({"preprocessor", "detector"})  # detectors: not part of the suite's target


@dataclass(frozen=True)
class SuitePlan:
    """Which evaluation batches (their start index) shard ``shard`` of ``shards`` runs."""

    shard: int
    shards: int
    starts: tuple[int, ...]


def batch_starts(n: int, batch_size: int) -> list[int]:
    """The start index of every evaluation batch the suite runs on (the unsplit stage's batching)."""
    return list(range(0, n, batch_size))


def shard_plans(*, n: int, batch_size: int, shards: int) -> list[SuitePlan]:
    """Batches dealt round-robin to at most ``shards`` shards (never more shards than batches; none empty)."""
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"strong suite shards = {shards!r}; allowed: an integer >= 1")
    starts = batch_starts(n, batch_size)
    k = max(1, min(shards, len(starts)))
    return [SuitePlan(i, k, tuple(starts[i::k])) for i in range(k)]


def shardable(profile: Profile, components: Sequence[Any], attack: AttackSpec, category: str) -> bool:
    """True when the suite of this defense against this attack can run in separate stages with the same result:
    the suite runs (enabled, white-box, an eps-bounded evasion attack) on preprocessors alone (detectors beside
    them are not part of its target), none of them learned or randomized, and no postprocessor."""
    if category != "evasion" or not profile.evaluation.strong_adaptive.enabled:
        return False
    if profile.threat_model.model_access != "white-box":
        return False
    kinds = {c.registry_kind for c in components}
    pre = [c for c in components if c.registry_kind == "preprocessor"]
    if not pre or not kinds <= SPLIT_KINDS:
        return False
    if any(not isinstance(p, Preprocessor) or p.randomized or p.needs_fit for p in pre):
        return False
    a = registry.create("evasion", attack.name, **attack.params)
    return bool(a.bounded and a.eps > 0)


def run_batch(ctx: RunContext, components: Sequence[Any], st: EvasionState, start: int) -> SuiteResult:
    """The suite on the evaluation batch at ``start``: the call the unsplit defense stage makes for it."""
    cfg = ctx.profile.evaluation.strong_adaptive
    bs = ctx.profile.evaluation.batch_size
    attack = registry.create("evasion", st.spec["name"], **st.spec.get("params", {}))
    pre = [c for c in components if c.registry_kind == "preprocessor"]
    return strong_adaptive_suite(ctx.baseline, st.x[start:start + bs], st.y[start:start + bs], eps=attack.eps,
                                 norm=attack.norm, seed=ctx.seed, preprocessors=pre,
                                 steps=cfg.steps, restarts=cfg.restarts, eot_samples=cfg.eot_samples)


def run_shard(ctx: RunContext, components: Sequence[Any], outcome: AttackOutcome, plan: SuitePlan
              ) -> dict[str, Any]:
    """Run one shard's batches; its state holds each batch's result (``suite_results`` reads it back)."""
    st = EvasionState.from_state(outcome.state, ctx.device)
    batches = []
    for start in (s for s in plan.starts if s < len(st.x)):  # n_eval may exceed the test split
        c0 = time.process_time()
        r = run_batch(ctx, components, st, start)
        batches.append({"start": start, "broken_by": r.broken_by.cpu(), "robust": r.robust.cpu(),
                        "x_adv": r.x_adv.cpu(), "members": list(r.members), "budget": dict(r.budget),
                        "cpu_s": time.process_time() - c0})
    return {"shard": plan.shard, "shards": plan.shards, "batches": batches}


def suite_results(states: Sequence[Any], device: torch.device) -> dict[int, SuiteResult]:
    """Every shard's batches as SuiteResults by batch start (what ``_strong_suite`` uses instead of running them)."""
    out: dict[int, SuiteResult] = {}
    for state in states:
        for b in state["batches"]:
            out[int(b["start"])] = SuiteResult(robust=b["robust"].to(device), broken_by=b["broken_by"].to(device),
                                               members=list(b["members"]), x_adv=b["x_adv"].to(device),
                                               budget=dict(b["budget"]))
    return out
