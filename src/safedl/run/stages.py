"""The assessment as a task graph: one task per attack and one per (defense, attack) pair, each depending only on
the attack it needs. The tasks are module-level functions over picklable inputs, so any executor in
``safedl.executors`` can run them, in this process, in a worker process or on another machine.

A task never writes into the run directory itself (except under the serial executor, which runs in the driver's
process): it works in a private folder and returns every file it made with its entry and state, and the driver
writes them with the stage's content key (``StageCache.finish``). Each task seeds itself with the profile seed and the
executor sets its thread count, so a stage's numbers do not depend on where or in which order it ran.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from safedl import registry, rundir
from safedl.evaluate.base import AttackOutcome
from safedl.evaluate.context import RunContext
from safedl.evaluate.suite_shards import SuitePlan, run_shard, suite_results
from safedl.run.handlers import get_attack_handler, get_defense_handler
from safedl.run.prepare import model_factory
from safedl.data.dataset import Splits
from safedl.profile import AttackSpec, DefenseSpec, Profile
from safedl.utils import progress
from safedl.utils.clock import StageClock
from safedl.utils.tensors import seed_everything


@dataclass
class StageShared:
    """What every stage reads, shipped once per worker: the profile, the data splits and the baseline.

    In the driver's process (``baseline``, ``fresh`` and ``run_dir`` set) stages use these objects directly and
    write into the run directory; in a worker, the baseline travels as a CPU state_dict, the model is rebuilt with
    ``model_factory`` (``base_dir`` made absolute) and stages work in a private folder.
    """

    profile: Profile
    splits: Splits
    device: str
    base_dir: str
    model_meta: dict[str, Any] = field(default_factory=dict)
    baseline_state: dict[str, torch.Tensor] | None = None
    baseline: nn.Module | None = None
    fresh: Callable[[], nn.Module] | None = None
    run_dir: str | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        if self.baseline is not None or self.fresh is not None:
            raise TypeError("StageShared with a live model or model factory is for in-process executors only")
        return {**self.__dict__, "_cache": {}}

    def model(self) -> tuple[nn.Module, Callable[[], nn.Module]]:
        """The baseline model (eval mode, on the device) and the fresh-model factory, built once per worker."""
        if self.baseline is not None and self.fresh is not None:
            return self.baseline, self.fresh
        if "model" not in self._cache:
            fresh, _ = model_factory(self.profile, self.splits, base_dir=Path(self.base_dir))
            model = fresh()
            model.load_state_dict(self.baseline_state)
            self._cache["model"] = (model.to(torch.device(self.device)).eval(), fresh)
        return self._cache["model"]


@dataclass
class StageResult:
    """A finished stage: its results.json entry, the state later stages need, and the files it made (path
    relative to the run directory -> bytes; empty when it wrote into the run directory itself)."""

    entry: dict[str, Any]
    state: Any = None
    files: dict[str, bytes] = field(default_factory=dict)


@contextlib.contextmanager
def _stage_context(shared: StageShared) -> Iterator[RunContext]:
    """A RunContext for one stage, in the run directory (driver) or a private folder whose files are collected."""
    baseline, fresh = shared.model()
    private = shared.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="safedl-stage-")) if private else Path(shared.run_dir)
    try:
        with progress.disabled():  # the graph view replaces per-stage bars; workers have no terminal of their own
            yield RunContext(profile=shared.profile, splits=shared.splits, device=torch.device(shared.device),
                             run_dir=run_dir, baseline=baseline, build_fresh=fresh,
                             model_meta=shared.model_meta)
    finally:
        if private:
            shutil.rmtree(run_dir, ignore_errors=True)


def _collect(ctx: RunContext, shared: StageShared) -> dict[str, bytes]:
    if shared.run_dir is not None:
        return {}
    return {str(p.relative_to(ctx.run_dir)): p.read_bytes() for p in sorted(ctx.run_dir.rglob("*")) if p.is_file()}


def _note_reused(entry: dict[str, Any], ctx: RunContext) -> None:
    """Record in the entry which of the stage's trainings the model cache answered (the report lists them)."""
    if ctx.model_cache is not None and ctx.model_cache.hits:
        entry["reused_models"] = list(ctx.model_cache.hits)


def attack_stage(shared: StageShared, inputs: dict[str, Any], *, category: str, spec: AttackSpec) -> StageResult:
    """Run one attack of the profile."""
    with _stage_context(shared) as ctx:
        attack = registry.create(category, spec.name, **spec.params)
        seed_everything(shared.profile.seed)
        clock = StageClock()
        outcome = get_attack_handler(category)(ctx, spec, attack)
        entry = outcome.entry
        entry.setdefault("id", spec.key)
        entry.setdefault("name", spec.name)
        entry.setdefault("category", category)
        entry.setdefault("time_s", clock.wall())
        entry.setdefault("cpu_s", clock.cpu())
        _note_reused(entry, ctx)
        return StageResult(entry=entry, state=outcome.state, files=_collect(ctx, shared))


def suite_stage(shared: StageShared, inputs: dict[str, Any], *, attack_id: str,
                components: list[tuple[str, str, dict]], plan: SuitePlan) -> StageResult:
    """Run one shard of a defense's strong adaptive suite (``safedl.evaluate.suite_shards``)."""
    (attack,) = inputs.values()
    outcome = AttackOutcome(entry=attack.entry, state=attack.state)
    with _stage_context(shared) as ctx:
        parts = [registry.create(k, n, **prm) for k, n, prm in components]
        seed_everything(shared.profile.seed)
        clock = StageClock()
        state = run_shard(ctx, parts, outcome, plan)
        entry = {"shard": plan.shard, "shards": plan.shards, "batches": list(plan.starts), "against": attack_id,
                 "time_s": clock.wall(), "cpu_s": clock.cpu(),
                 "batch_cpu_s": [float(b.get("cpu_s", 0.0)) for b in state["batches"]]}
        return StageResult(entry=entry, state=state)


def defense_stage(shared: StageShared, inputs: dict[str, Any], *, dspec: DefenseSpec, kind: str, attack_id: str,
                  components: list[tuple[str, str, dict]]) -> StageResult:
    """Evaluate one defense against one attack; ``inputs`` holds that attack's StageResult and the StageResults of
    the shards of its strong adaptive suite that ran as their own stages (if any)."""
    attack = inputs[rundir.attack_stage_name(attack_id)]
    shards = [r for k, r in sorted(inputs.items()) if k != rundir.attack_stage_name(attack_id)]
    outcome = AttackOutcome(entry=attack.entry, state=attack.state)
    with _stage_context(shared) as ctx:
        ctx.outcomes[attack_id] = outcome
        ctx.suite_batches = suite_results([r.state for r in shards], ctx.device)
        parts = [registry.create(k, n, **prm) for k, n, prm in components]
        handler = get_defense_handler(kind, outcome.entry["category"])
        seed_everything(shared.profile.seed)
        clock = StageClock()
        entry = handler(ctx, dspec, parts, outcome)
        entry.setdefault("id", dspec.key)
        entry.setdefault("name", dspec.name or "pipeline")
        entry.setdefault("kind", kind)
        entry["against"] = attack_id
        entry.setdefault("params", dspec.params if dspec.name else
                         {"pipeline": [c.model_dump() for c in dspec.pipeline or []]})
        entry.setdefault("time_s", clock.wall())
        entry.setdefault("cpu_s", clock.cpu())
        if shards:  # the critical path (safedl.run.critical_path) replays them as stages of their own
            entry["suite_shards"] = [r.entry for r in shards]
        _note_reused(entry, ctx)
        return StageResult(entry=entry, files=_collect(ctx, shared))
