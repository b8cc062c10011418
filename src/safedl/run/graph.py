"""The stage graph: one node per attack and per (defense, attack) pair, each with the content key its stage is
saved under; running it reuses finished stages and saves each other stage the moment it finishes."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from safedl import registry, rundir
from safedl.executors import Executor, Outcome, Task
from safedl.executors.progress import GraphView
from safedl.evaluate.suite_shards import shard_plans, shardable
from safedl.profile import AttackSpec, DefenseSpec, Profile
from safedl.run.cache import StageCache
from safedl.run.planning import defense_kinds
from safedl.run.stages import StageResult, StageShared, attack_stage, defense_stage, suite_stage
from safedl.utils import progress
from safedl.utils.io import json_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """A stage of the graph: its folder name, content key, kind, component id, attack it is evaluated against."""

    stage: str
    key: str
    kind: str
    id: str
    against: str | None
    task: Task


def build_graph(profile: Profile, plan: list[tuple[DefenseSpec, str, str]], baseline_key: str, *,
                suite_shards: int = 1) -> list[Node]:
    """One node per attack and per (defense, attack) pair, with the content key its stage is saved under; with
    ``suite_shards`` > 1, a defense whose strong adaptive suite can run apart (``suite_shards.shardable``) also gets
    up to that many suite nodes (kind ``suite``) it waits for, each running some of the suite's batches."""
    p = profile
    nodes, attack_keys = [], {}
    specs = {spec.key: (cat, spec) for cat, spec in p.attacks.all()}
    for cat, spec in p.attacks.all():
        parts = {"baseline": baseline_key, "category": cat, "spec": spec.model_dump(),
                 "evaluation": p.evaluation.model_dump(exclude={"gate"}), "output": p.output.figures}
        if cat in ("poisoning", "backdoor") and p.training.mode == "finetune":  # scratch runs keep their old keys
            parts["finetune"] = p.training.finetune.model_dump()
        if cat in ("poisoning", "backdoor") and p.canary_records.source != "none":
            parts["canaries"] = p.canary_records.model_dump(exclude={"max_changes"})
        key = json_hash(parts)
        attack_keys[spec.key] = key
        name = rundir.attack_stage_name(spec.key)
        nodes.append(Node(name, key, "attack", spec.key, None,
                          Task(name, attack_stage, {"category": cat, "spec": spec})))
    for dspec, aid, kind in plan:
        key = json_hash({"attack": attack_keys[aid], "defense": dspec.model_dump(), "kind": kind})
        stage = rundir.defense_stage_name(dspec.key, aid)
        kwargs = {"dspec": dspec, "kind": kind, "attack_id": aid, "components": defense_kinds(dspec)}
        suites = _suite_nodes(p, dspec, aid, key, specs[aid], suite_shards) if suite_shards > 1 else []
        nodes += suites
        deps = (rundir.attack_stage_name(aid), *(n.stage for n in suites))
        nodes.append(Node(stage, key, "defense", dspec.key, aid, Task(stage, defense_stage, kwargs, deps=deps)))
    return nodes


def _suite_nodes(p: Profile, dspec: DefenseSpec, aid: str, defense_key: str, attack: tuple[str, AttackSpec],
                 shards: int) -> list[Node]:
    """The suite nodes of one defense stage (none when its suite cannot run apart with the same result)."""
    components = defense_kinds(dspec)
    if not shardable(p, [registry.create(k, n, **prm) for k, n, prm in components], attack[1], attack[0]):
        return []
    out = []
    for plan in shard_plans(n=p.evaluation.n_eval, batch_size=p.evaluation.batch_size, shards=shards):
        name = rundir.suite_stage_name(dspec.key, aid, plan.shard, plan.shards)
        key = json_hash({"defense": defense_key, "suite_batches": list(plan.starts)})
        kwargs = {"attack_id": aid, "components": components, "plan": plan}
        out.append(Node(name, key, "suite", dspec.key, aid,
                        Task(name, suite_stage, kwargs, deps=(rundir.attack_stage_name(aid),))))
    return out


def chains_first(nodes: list[Node]) -> list[Node]:
    """The order stages are offered to the executor: defenses whose attack already finished, then each attack a
    defense waits for immediately followed by its defenses, then the attacks nothing waits for (profile order within
    each). Greedy scheduling in profile order would start a long defense only after every attack; this starts each
    attack -> defense chain as early as it can (the makespan, not any number, changes: each stage seeds itself)."""
    attacks = {n.stage for n in nodes if n.kind == "attack"}
    waits = {n.task.deps[0] for n in nodes if n.kind != "attack" and n.task.deps}
    after = [n for n in nodes if n.kind == "suite"] + [n for n in nodes if n.kind == "defense"]  # suites first
    ready = [n for n in after if not set(n.task.deps) & attacks]
    chains = []
    for a in (n for n in nodes if n.stage in attacks and n.stage in waits):
        chains += [a, *(n for n in after if a.stage in n.task.deps)]
    leaves = [n for n in nodes if n.stage in attacks and n.stage not in waits]
    return ready + chains + leaves


def run_graph(graph: list[Node], executor: Executor, shared: StageShared, cache: StageCache
              ) -> tuple[dict[str, dict], list[dict]]:
    """Reuse finished stages, run the others on ``executor`` and save each the moment it finishes; returns the
    entries by stage and the failed stages (in graph order)."""
    entries: dict[str, dict] = {}
    todo = []
    view = GraphView(title=f"stages ({executor.name})", enabled=progress.enabled())
    for n in graph:
        cached = cache.cached(n.stage, n.key)
        if cached is None:
            todo.append(n)
            continue
        log.info("%s: reusing finished stage", n.stage)
        entries[n.stage] = cached["entry"]
        view.mark_reused(n.stage)
    needed = {d for n in todo for d in n.task.deps}
    todo = [n for n in todo if n.kind != "suite" or n.stage in needed]  # a reused defense needs no suite shards
    given: dict[str, StageResult] = {}
    for d in {d for n in todo for d in n.task.deps} - {n.stage for n in todo}:  # finished attacks still needed
        state = cache.state(d)
        given[d] = StageResult(entry=entries[d], state=state if executor.in_process else dict(state))
    by_stage = {n.stage: n for n in graph}
    failed: dict[str, dict] = {}

    def save(out: Outcome) -> None:
        n = by_stage[out.id]
        if not out.ok:
            failed[n.stage] = {"stage": n.stage, "kind": n.kind, "id": n.id, "against": n.against,
                               "error": out.error, "attempts": out.attempts}
            return
        for rel, data in out.value.files.items():
            cache.write_file(rel, data)
        cache.finish(n.stage, n.key, out.value.entry, out.value.state if n.kind in ("attack", "suite") else None)
        entries[n.stage] = out.value.entry
        log.debug("%s: finished in %.1f s", n.stage, out.time_s)

    if todo:
        with view:
            executor.run([n.task for n in chains_first(todo)], shared=shared, given=given, on_result=save, on_event=view.update)
    return entries, [failed[n.stage] for n in graph if n.stage in failed]
