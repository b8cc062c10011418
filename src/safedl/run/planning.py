"""Planning a run: which (defense, attack) pairs can be evaluated, and the executor the profile asks for."""
from __future__ import annotations

import torch

from safedl import registry
from safedl.errors import ProfileError
from safedl.executors import Executor, create_executor
from safedl.profile import DefenseSpec, Profile
from safedl.run.handlers import get_attack_handler, get_defense_handler, load_handlers


def defense_kinds(spec: DefenseSpec) -> list[tuple[str, str, dict]]:
    """(kind, name, params) of each component of a defense spec."""
    parts = [(spec.name, spec.params)] if spec.name else [(c.name, c.params) for c in spec.pipeline or []]
    return [(registry.find_kind(n, registry.DEFENSE_KINDS), n, p) for n, p in parts]


def plan_defenses(profile: Profile) -> list[tuple[DefenseSpec, str, str]]:
    """Every (defense, attack id, handler kind) pair to evaluate; raises ProfileError for impossible pairs."""
    load_handlers()
    attacks = {a.key: cat for cat, a in profile.attacks.all()}
    attack_specs = {a.key: a for _, a in profile.attacks.all()}
    plan, errors = [], []
    for i, d in enumerate(profile.defenses):
        kinds = defense_kinds(d)
        kind = kinds[0][0] if len(kinds) == 1 else "pipeline"
        present = {k for k, _, _ in kinds}
        if "certifier" in present and present & {"preprocessor", "postprocessor", "trainer"}:
            errors.append((f"defenses[{i}].pipeline", "a certifier (randomized smoothing, IBP) certifies the "
                           "model it trains alone; list it without preprocessors, postprocessors or trainers"))
        targets = list(attacks) if "all" in d.against else d.against
        matched = 0
        for aid in targets:
            handler = get_defense_handler(kind, attacks[aid])
            why_not = None if handler is None else getattr(handler, "not_applicable", lambda c, a: None)(
                attacks[aid], attack_specs[aid])
            if handler is None or why_not:
                if "all" not in d.against:
                    errors.append((f"defenses[{i}].against", f"a {kind} defense ({d.key}) cannot be evaluated against "
                                   f"{attacks[aid]} attack {aid!r}" + (f": {why_not}" if why_not else "")))
                continue
            plan.append((d, aid, kind))
            matched += 1
        if matched == 0 and "all" in d.against:
            errors.append((f"defenses[{i}]", f"no attack in the profile that a {kind} defense ({d.key}) applies to"))
    if errors:
        lines = [f"{len(errors)} error(s) in the threat profile"] + [f"  {k}: {m}" for k, m in errors]
        raise ProfileError("\n".join(lines), errors=errors)
    for cat, a in profile.attacks.all():
        try:
            get_attack_handler(cat)
        except KeyError:
            raise ProfileError(f"attacks.{cat}: no stage can run {cat} attacks in this installation",
                               errors=[(f"attacks.{cat}", "no handler")]) from None
    return plan



def executor_for(profile: Profile, device: torch.device) -> Executor:
    """The executor the profile's ``execution`` section asks for (``--executor`` etc. override it on the CLI)."""
    ex = profile.execution
    gpus = None
    if ex.executor == "ray" and device.type == "cuda":
        gpus = ex.gpus_per_task or (1.0 / ex.workers if ex.workers else 1.0)
    return create_executor(ex.executor, workers=ex.workers, threads_per_task=ex.threads_per_task,
                           address=ex.ray_address, gpus_per_task=gpus, preload=("safedl.run._preload",))


def suite_shards_for(profile: Profile, executor: Executor) -> int:
    """How many stages a shardable strong adaptive suite is split into: ``execution.suite_shards``, else one per
    worker when the executor runs stages in parallel (a cluster, workers unknown: one per evaluation batch), else 1;
    never more than the suite's evaluation batches. One per worker, not per batch: replaying the default run's stage
    costs, greedy scheduling with more shards than workers finishes later (README, issue 28)."""
    ev = profile.evaluation
    batches = max(1, -(-ev.n_eval // ev.batch_size))
    if profile.execution.suite_shards is not None:
        return min(profile.execution.suite_shards, batches)
    workers, _ = executor.resolved()
    if executor.in_process or (workers is not None and workers <= 1):  # in process: one stage at a time
        return 1
    return batches if workers is None else min(workers, batches)
