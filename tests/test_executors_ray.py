"""The Ray executor on Ray's testing cluster on this machine (``ray.cluster_utils.Cluster``: a head without CPUs
and two 1-CPU worker nodes, no dashboard, small object stores; one Ray start for the whole module):
the graph semantics of the other executors (values, retry once, failures, the shared object fetched once per
worker), a node removed while it runs a task (the task is retried on the other node and the graph finishes), and
the tiny assessment across the nodes with the same numbers as the serial run."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import _executor_tasks as T
from safedl.executors import Task, create_executor
from test_e2e_executors import TINY, numbers, run_cli, serial_reference

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
HERE = Path(__file__).resolve().parent
STORE = 80 * 1024**2


@pytest.fixture(scope="module")
def cluster():
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE,
                                                                     "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1, object_store_memory=STORE) for _ in range(2)]
    path = os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])
    ray.init(address=c.address, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_ray_graph_semantics_match_the_other_executors(cluster, tmp_path):
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


def test_lost_node_task_is_retried_on_the_other_node(cluster, tmp_path):
    c, (keep, lose) = cluster
    markers = tmp_path / "markers"
    markers.mkdir()
    tasks = [Task(f"t{i}", T.on_node, {"seconds": 4.0, "markers": str(markers), "name": f"t{i}"}) for i in range(2)]
    tasks.append(Task("after", T.empty, {}, ("t0", "t1")))
    victim: dict[str, str] = {}

    def remove_when_busy():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            hit = [m.name.split("@")[0] for m in markers.iterdir() if m.name.endswith("@" + lose.node_id)]
            if hit:
                victim["task"] = hit[0]
                c.remove_node(lose)
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_when_busy)
    remover.start()
    out = create_executor("ray", threads_per_task=1).run(tasks, shared=T.Shared(0))
    remover.join()
    assert victim, "no task started on the node to remove"
    lost = out[victim["task"]]
    assert lost.ok and lost.attempts == 2 and lost.value == keep.node_id  # retried elsewhere, finished there
    assert all(o.ok for o in out.values())  # the rest of the graph finished (after both inputs)


def test_assessment_on_two_nodes_gives_the_serial_numbers(cluster, tmp_path):
    c, _ = cluster
    c.add_node(num_cpus=1, object_store_memory=STORE)  # the previous test removed one
    c.wait_for_nodes()
    res, ray_dir = run_cli(tmp_path / "r", TINY, "--executor", "ray", "--threads-per-task", "1")
    assert res.exit_code == 0, res.output
    r = json.loads((ray_dir / "results.json").read_text())
    assert r["execution"]["executor"] == "ray" and r["failed_stages"] == []
    assert numbers(r) == numbers(serial_reference()[1])
    for a in r["attacks"] + r["defenses"]:  # figures made on the nodes were sent back and written by the driver
        for path in a.get("artifacts", {}).values():
            assert (ray_dir / path).is_file()
