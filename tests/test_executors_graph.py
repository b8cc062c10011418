"""The generic executors (serial, process pool): dependency order, shared object shipped once per worker, retry
once, failures reported while the other tasks finish, dead workers, Ctrl-C."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest

import _executor_tasks as T
from safedl.errors import ConfigError
from safedl.executors import Task, check_graph, create_executor
from safedl.executors.progress import GraphView


def test_check_graph_orders_dependencies_and_rejects_bad_graphs():
    tasks = [Task("c", T.add, {"k": 0}, ("b",)), Task("b", T.add, {"k": 0}, ("a",)), Task("a", T.add, {"k": 0})]
    assert check_graph(tasks) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="cycle"):
        check_graph([Task("a", T.add, {}, ("b",)), Task("b", T.add, {}, ("a",))])
    with pytest.raises(ConfigError, match="unknown task"):
        check_graph([Task("a", T.add, {}, ("zzz",))])
    with pytest.raises(ConfigError, match="duplicate"):
        check_graph([Task("a", T.add), Task("a", T.add)])
    assert check_graph([Task("b", T.add, {}, ("given",))], {"given": 1}) == ["b"]


def _graph(tmp_path):
    return [Task("a", T.add, {"k": 1}), Task("b", T.add, {"k": 2}, ("a", "g")),
            Task("bad", T.boom, {}, ("a",)), Task("after_bad", T.add, {"k": 0}, ("bad",)),
            Task("flaky", T.flaky, {"marker": str(tmp_path / "marker")}), Task("c", T.add, {"k": 3}, ("b",))]


@pytest.mark.parametrize("name", ["serial", "process"])
def test_graph_runs_with_retry_and_reports_failures(tmp_path, name):
    seen, events = [], []
    ex = create_executor(name, workers=2, threads_per_task=1)
    out = ex.run(_graph(tmp_path), shared=T.Shared(10), given={"g": 100},
                 on_result=lambda o: seen.append(o.id), on_event=events.append)
    assert out["a"].value == 11 and out["b"].value == 10 + 2 + 11 + 100 and out["c"].value == 10 + 3 + 123
    assert out["bad"].ok is False and out["bad"].attempts == 2 and out["bad"].error == "ValueError: planted failure"
    assert out["after_bad"].skipped and "'bad'" in out["after_bad"].error  # never run on a failed input
    assert out["flaky"].ok and out["flaky"].value == "second attempt" and out["flaky"].attempts == 2
    assert sorted(seen) == sorted(out) and seen.index("a") < seen.index("b") < seen.index("c")
    assert [e.state for e in events if e.task == "bad"] == ["waiting", "running", "retrying", "running", "failed"]
    view = GraphView(enabled=False)
    for e in events:
        view.update(e)
    assert view.counts() == {"done": 4, "reused": 0, "running": 0, "waiting": 0, "failed": 2}


def test_process_pool_ships_shared_once_per_worker_and_sets_threads():
    tasks = [Task(f"t{i}", T.whoami, {"sleep": 0.05}) for i in range(6)]
    out = create_executor("process", workers=2, threads_per_task=1).run(tasks, shared=T.Shared(0))
    pids = {o.value[0] for o in out.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, none of them the driver
    assert {o.value[1] for o in out.values()} == {1}  # each worker unpickled the shared object exactly once
    assert {o.value[2] for o in out.values()} == {1}


def test_dead_worker_fails_its_task_only_and_is_replaced():
    tasks = [Task("dies", T.die), Task("x", T.sleep_then, {"seconds": 0.2, "value": 1}),
             Task("y", T.add, {"k": 1}, ("x",))]
    out = create_executor("process", workers=2).run(tasks, shared=T.Shared(0))
    assert not out["dies"].ok and out["dies"].attempts == 2 and "WorkerDied" in out["dies"].error
    assert "exit code 3" in out["dies"].error
    assert out["x"].value == 1 and out["y"].value == 2


def test_interrupt_stops_process_workers_and_propagates():
    tasks = [Task("quick", T.add, {"k": 0}), Task("slow", T.sleep_then, {"seconds": 60, "value": 0})]

    def interrupt(outcome):
        if outcome.id == "quick":
            raise KeyboardInterrupt

    before = {p.pid for p in mp.active_children()}
    with pytest.raises(KeyboardInterrupt):
        create_executor("process", workers=2).run(tasks, shared=T.Shared(0), on_result=interrupt)
    workers = [p for p in mp.active_children() if p.pid not in before and "ForkServer" not in p.name]
    assert workers == []  # the slow task's worker was terminated, not left running


def test_bad_executor_options_are_user_errors():
    with pytest.raises(ConfigError, match="unknown executor 'gpu'"):
        create_executor("gpu")
    with pytest.raises(ConfigError, match="workers"):
        create_executor("process", workers=0)
