"""The idle-machine estimate from per-stage CPU seconds: the stage clock counts CPU, not waiting, and the greedy
two-worker replay of the stage graph gives the makespan the executor's scheduling would."""
from __future__ import annotations

import time

import pytest

from safedl.errors import ConfigError
from safedl.run.critical_path import StageCost, estimate, longest_chain, makespan, stage_costs
from safedl.utils.clock import StageClock


def test_stage_clock_counts_cpu_work_not_sleep():
    clock = StageClock()
    time.sleep(0.2)
    slept = clock.cpu()
    t_end = time.process_time() + 0.2
    while time.process_time() < t_end:
        pass
    assert slept < 0.1
    assert clock.cpu() >= 0.2
    assert clock.wall() >= 0.4


def test_makespan_waits_for_the_attack_and_fills_idle_workers():
    stages = [StageCost("attack-a", 10.0), StageCost("attack-b", 2.0),
              StageCost("defense-x-vs-a", 5.0, "attack-a"), StageCost("defense-x-vs-b", 3.0, "attack-b")]
    assert makespan(stages, workers=2) == pytest.approx(15.0)  # b's defense runs while a still runs
    assert makespan(stages, workers=1) == pytest.approx(20.0)
    assert makespan(stages, workers=4) == pytest.approx(15.0)
    assert longest_chain(stages) == pytest.approx(15.0)


def test_makespan_takes_stages_in_graph_order_not_longest_first():
    stages = [StageCost("attack-a", 1.0), StageCost("attack-b", 1.0), StageCost("attack-c", 10.0)]
    assert makespan(stages, workers=2) == pytest.approx(11.0)  # c starts when a worker frees at t = 1
    assert makespan(list(reversed(stages)), workers=2) == pytest.approx(10.0)


def _results(**baseline):
    return {"environment": {"threads": 2}, "baseline": {"cpu_s": 40.0, **baseline},
            "attacks": [{"id": "pgd", "cpu_s": 6.0}, {"id": "fgsm", "cpu_s": 1.0}],
            "defenses": [{"id": "fs", "against": "pgd", "cpu_s": 30.0}]}


def test_estimate_adds_the_baseline_over_its_threads_to_the_stage_makespan():
    est = estimate(_results(), workers=2)
    assert est["baseline_wall_estimate_s"] == pytest.approx(20.0)
    assert est["stages_makespan_s"] == pytest.approx(36.0)
    assert est["estimate_s"] == pytest.approx(56.0)
    assert list(est["by_stage"])[0] == "defense-fs-vs-pgd"


def test_a_run_without_cpu_seconds_is_one_clear_error():
    r = _results()
    del r["attacks"][0]["cpu_s"]
    with pytest.raises(ConfigError, match="attack 'pgd' has no 'cpu_s'"):
        stage_costs(r)
    with pytest.raises(ConfigError, match="workers = 0"):
        makespan([], workers=0)


def _node(stage, kind, dep=None):
    from safedl.executors import Task
    from safedl.run.graph import Node

    return Node(stage, "key", kind, stage, None, Task(stage, len, deps=(dep,) if dep else ()))


def test_chains_first_starts_each_long_defense_right_after_its_attack():
    from safedl.run.graph import chains_first

    # the default profile's graph, in profile order; CPU-like costs of an earlier default run (wall s, README)
    cost = {"attack-fgsm": 2.7, "attack-pgd": 20.9, "attack-square": 59.8, "attack-ensemble": 8.3,
            "attack-label_flipping": 106.1, "attack-static_patch": 118.4, "defense-fs-vs-attack-pgd": 962.6,
            "defense-ss-vs-attack-static_patch": 123.3, "defense-dc-vs-attack-label_flipping": 501.2}
    nodes = [_node(s, "attack") for s in cost if s.startswith("attack-")]
    nodes += [_node(s, "defense", "attack-" + s.split("-vs-attack-")[1]) for s in cost if s.startswith("defense-")]
    nodes.append(_node("defense-fs-vs-pgd-done", "defense", "attack-finished-earlier"))
    cost["defense-fs-vs-pgd-done"] = 1.0
    order = [n.stage for n in chains_first(nodes)]
    assert sorted(order) == sorted(n.stage for n in nodes)
    assert order[:3] == ["defense-fs-vs-pgd-done", "attack-pgd", "defense-fs-vs-attack-pgd"]
    assert order[-3:] == ["attack-fgsm", "attack-square", "attack-ensemble"]  # nothing waits for them

    def replay(stages):
        return makespan([StageCost(s, cost[s], None if s.startswith("attack-") or s.endswith("-done") else
                                   "attack-" + s.split("-vs-attack-")[1]) for s in stages], workers=2)

    profile_order = [n.stage for n in nodes]
    assert replay(order) < replay(profile_order)
    assert replay(order) == pytest.approx(cost["attack-pgd"] + cost["defense-fs-vs-attack-pgd"])  # the longest chain


def test_a_defense_waits_for_its_suite_shards_which_run_on_both_workers():
    r = {"environment": {"threads": 2}, "baseline": {"cpu_s": 40.0},
         "attacks": [{"id": "pgd", "cpu_s": 6.0}, {"id": "fgsm", "cpu_s": 1.0}],
         "defenses": [{"id": "fs", "against": "pgd", "cpu_s": 2.0,
                       "suite_shards": [{"shard": 0, "shards": 2, "cpu_s": 14.0},
                                        {"shard": 1, "shards": 2, "cpu_s": 16.0}]}]}
    stages = stage_costs(r)
    assert [s.name for s in stages][-1] == "defense-fs-vs-pgd"
    assert stages[-1].waits == ("suite-fs-vs-pgd-1of2", "suite-fs-vs-pgd-2of2")
    est = estimate(r, workers=2)
    assert est["stages_makespan_s"] == pytest.approx(6.0 + 16.0 + 2.0)  # the shards in parallel, then the merge
    assert est["longest_chain_s"] == pytest.approx(24.0)
    assert estimate(r, workers=1)["stages_makespan_s"] == pytest.approx(39.0)


def test_the_suite_is_split_only_when_stages_run_in_parallel():
    from safedl.executors import create_executor
    from safedl.profile import Profile
    from safedl.run.planning import suite_shards_for

    p = Profile.model_validate({"evaluation": {"n_eval": 1000, "batch_size": 250}})
    assert suite_shards_for(p, create_executor("serial")) == 1
    assert suite_shards_for(p, create_executor("process", workers=1)) == 1
    assert suite_shards_for(p, create_executor("process", workers=2)) == 2  # one per worker
    assert suite_shards_for(p, create_executor("process", workers=8)) == 4  # at most one per evaluation batch
    fixed = p.model_copy(update={"execution": p.execution.model_copy(update={"suite_shards": 3})})
    assert suite_shards_for(fixed, create_executor("process", workers=2)) == 3


def test_chains_first_puts_a_defense_s_suite_shards_between_its_attack_and_it():
    from safedl.executors import Task
    from safedl.run.graph import Node, chains_first

    def node(stage, kind, *deps):
        return Node(stage, "key", kind, stage, None, Task(stage, len, deps=deps))

    nodes = [node("attack-pgd", "attack"), node("attack-fgsm", "attack"), node("suite-fs-1of2", "suite", "attack-pgd"),
             node("suite-fs-2of2", "suite", "attack-pgd"),
             node("defense-fs-vs-pgd", "defense", "attack-pgd", "suite-fs-1of2", "suite-fs-2of2")]
    order = [n.stage for n in chains_first(nodes)]
    assert order == ["attack-pgd", "suite-fs-1of2", "suite-fs-2of2", "defense-fs-vs-pgd", "attack-fgsm"]
    costs = stage_costs({"attacks": [{"id": "pgd", "cpu_s": 1.0}, {"id": "fgsm", "cpu_s": 1.0}],
                         "defenses": [{"id": "fs", "against": "pgd", "cpu_s": 1.0, "suite_shards": [
                             {"shard": 0, "shards": 2, "cpu_s": 1.0}, {"shard": 1, "shards": 2, "cpu_s": 1.0}]}]})
    from safedl.run.critical_path import chains_first as replay_order

    assert [s.name for s in replay_order(costs)] == [
        "attack-pgd", "suite-fs-vs-pgd-1of2", "suite-fs-vs-pgd-2of2", "defense-fs-vs-pgd", "attack-fgsm"]
