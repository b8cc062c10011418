"""The Ray executor on one small local Ray (2 CPUs, no dashboard): the graph semantics of the other executors
(values, retry once, failures; a lost worker is
tested with a lost node in test_executors_ray_cluster.py), the shared object fetched once per worker, and a tiny assessment
with the same numbers as the serial run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import _executor_tasks as T
from safedl.executors import Task, create_executor
from test_executors_run import TINY, numbers, run_cli

ray = pytest.importorskip("ray")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    path = os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, configure_logging=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def test_ray_graph_semantics_match_the_other_executors(local_ray, tmp_path):
    tasks = [Task("a", T.add, {"k": 1}), Task("b", T.add, {"k": 2}, ("a", "g")),
             Task("bad", T.boom, {}, ("a",)), Task("after_bad", T.add, {"k": 0}, ("bad",)),
             Task("flaky", T.flaky, {"marker": str(tmp_path / "marker")}),
             Task("c", T.add, {"k": 3}, ("b",))] + [Task(f"who{i}", T.whoami, {"sleep": 0.05}) for i in range(4)]
    seen = []
    out = create_executor("ray", threads_per_task=1).run(tasks, shared=T.Shared(10), given={"g": 100},
                                                         on_result=lambda o: seen.append(o.id))
    assert ray.is_initialized()  # an existing Ray session is used, not shut down
    assert out["a"].value == 11 and out["b"].value == 123 and out["c"].value == 136
    assert out["bad"].attempts == 2 and out["bad"].error == "ValueError: planted failure"
    assert out["after_bad"].skipped and out["flaky"].value == "second attempt" and out["flaky"].attempts == 2
    assert sorted(seen) == sorted(out)
    who = [out[f"who{i}"].value for i in range(4)]
    assert {w[1] for w in who} == {1} and {w[2] for w in who} == {1}  # shared fetched once per worker; 1 thread


def test_ray_assessment_gives_the_serial_numbers(local_ray, tmp_path):
    res, serial_dir = run_cli(tmp_path / "s", TINY, "--threads-per-task", "1")
    assert res.exit_code == 0, res.output
    res, ray_dir = run_cli(tmp_path / "r", TINY, "--executor", "ray", "--threads-per-task", "1")
    assert res.exit_code == 0, res.output
    serial = json.loads((serial_dir / "results.json").read_text())
    r = json.loads((ray_dir / "results.json").read_text())
    assert r["execution"]["executor"] == "ray" and r["failed_stages"] == []
    assert numbers(r) == numbers(serial)
    for a in r["attacks"] + r["defenses"]:
        for path in a.get("artifacts", {}).values():
            assert (ray_dir / path).is_file()
