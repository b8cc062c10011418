"""The run spine on an executor: the same numbers serial and in a process pool, a failed stage reported while the
others finish (and redone on resume), and a parallel run stopped by Ctrl-C (KeyboardInterrupt in the driver, as
SIGINT raises it) resumed without redoing finished stages."""
from __future__ import annotations

import functools
import json
import multiprocessing as mp
import tempfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safedl import rundir
from safedl.run import handlers, stages
from safedl.run.cache import StageCache
from safedl.run.critical_path import estimate
from safedl.cli import app
from _profiles import tiny_profile

TINY = tiny_profile(
    training={"epochs": 1},
    attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.2}},
                         {"name": "pgd", "params": {"eps": 0.2, "steps": 3}}]},
    defenses=[{"name": "feature_squeezing", "params": {"bit_depth": 2}, "against": ["pgd"]}],
    evaluation={"n_examples": 2, "gate": {"min_clean_accuracy": 0.1}},
)
WALL_CLOCK = ("time", "latency")  # metrics that measure wall time, not the model


def measured(metrics):
    """Metrics without the wall-clock ones (those differ between any two runs)."""
    if isinstance(metrics, dict):
        return {k: measured(v) for k, v in metrics.items() if not any(w in k for w in WALL_CLOCK)}
    return metrics


def numbers(results):
    return {"baseline": results["baseline"]["metrics"],
            "attacks": [(a["id"], measured(a["metrics"])) for a in results["attacks"]],
            "defenses": [(d["id"], d["against"], measured(d["metrics"])) for d in results["defenses"]]}


def run_cli(tmp_path, prof, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q",
                                   *args])
    runs = sorted((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return res, runs[-1]


@functools.lru_cache(maxsize=1)
def serial_reference() -> tuple[Path, dict]:
    """The tiny profile run serially once per test session (the Ray tests compare with it too)."""
    res, run_dir = run_cli(Path(tempfile.mkdtemp(prefix="safedl-serial-")), TINY, "--threads-per-task", "1")
    assert res.exit_code == 0, res.output
    return run_dir, json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def serial_run():
    return serial_reference()


def test_process_pool_gives_the_serial_numbers_and_files(tmp_path, serial_run):
    serial_dir, serial = serial_run
    res, run_dir = run_cli(tmp_path, TINY, "--executor", "process", "--workers", "2", "--threads-per-task", "1")
    assert res.exit_code == 0, res.output
    r = json.loads((run_dir / "results.json").read_text())
    assert r["execution"] == {"executor": "process", "workers": 2, "threads_per_task": 1}
    assert r["failed_stages"] == []
    assert numbers(r) == numbers(serial)
    for a in r["attacks"] + r["defenses"]:  # files made in the workers' private folders were written by the driver
        for path in a.get("artifacts", {}).values():
            assert (run_dir / path).is_file()
    assert stage_keys(run_dir) == stage_keys(serial_dir)  # same content keys: either run can resume the other
    for e in [r["baseline"], *r["attacks"], *r["defenses"]]:  # CPU seconds measured in the worker that ran it
        assert e["cpu_s"] > 0, e.get("id", "baseline")
    est = estimate(r, workers=2)
    assert est["stages_makespan_s"] >= est["stages_cpu_s"] / 2 - 1e-9


def stage_keys(run_dir):
    return {p.parent.name: json.loads(p.read_text())["key"] for p in (run_dir / "stages").glob("*/stage.json")}


def test_failed_stage_is_reported_the_others_finish_and_resume_redoes_it(tmp_path, monkeypatch):
    prof = json.loads(json.dumps(TINY))
    prof["defenses"][0]["against"] = ["fgsm", "pgd"]
    real = handlers.get_attack_handler("evasion")

    def planted(ctx, spec, attack):
        if spec.key == "fgsm":
            raise RuntimeError("planted stage failure")
        return real(ctx, spec, attack)

    monkeypatch.setattr(stages, "get_attack_handler",
                        lambda cat: planted if cat == "evasion" else handlers.get_attack_handler(cat))
    res, run_dir = run_cli(tmp_path, prof)
    assert res.exit_code == 1, res.output  # the gate fails on a failed stage
    r = json.loads((run_dir / "results.json").read_text())
    failed = {f["stage"]: f for f in r["failed_stages"]}
    assert failed["attack-fgsm"] == {"stage": "attack-fgsm", "kind": "attack", "id": "fgsm", "against": None,
                                     "error": "RuntimeError: planted stage failure", "attempts": 2}
    assert failed["defense-feature_squeezing-vs-fgsm"]["attempts"] == 0  # never run: its attack failed
    assert [a["id"] for a in r["attacks"]] == ["pgd"] and [d["against"] for d in r["defenses"]] == ["pgd"]
    assert not r["gate"]["passed"]
    assert any(f.startswith("stage attack-fgsm: failed after 2") for f in r["gate"]["failures"])
    assert [c["passed"] for c in r["gate"]["checks"] if c["name"] == "stage attack-fgsm"] == [False]
    md = (run_dir / "report.md").read_text()
    assert "Failed stages" in md and "planted stage failure" in md
    assert not (run_dir / "stages" / "attack-fgsm" / "stage.json").exists()  # a failure is never cached

    monkeypatch.setattr(stages, "get_attack_handler", handlers.get_attack_handler)
    stamp = (run_dir / "stages" / "attack-pgd" / "stage.json").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads((run_dir / "results.json").read_text())
    assert r["failed_stages"] == [] and [a["id"] for a in r["attacks"]] == ["fgsm", "pgd"]
    assert len(r["defenses"]) == 2
    assert (run_dir / "stages" / "attack-pgd" / "stage.json").stat().st_mtime_ns == stamp


def test_interrupted_process_run_exits_130_and_resumes_reusing_finished_stages(tmp_path, serial_run, monkeypatch):
    prof = json.loads(json.dumps(TINY))
    prof["defenses"] = [{"name": "spatial_smoothing", "params": {"window": 3}, "against": ["pgd"]}]
    finish = StageCache.finish

    def ctrl_c_after_defense(self, name, key, entry, state=None):  # Ctrl-C reaches the driver right after it saved
        finish(self, name, key, entry, state)                        # the defense
        if name.startswith("defense-"):
            raise KeyboardInterrupt

    monkeypatch.setattr(StageCache, "finish", ctrl_c_after_defense)
    args = ["--executor", "process", "--workers", "1", "--threads-per-task", "1"]
    before = {p.pid for p in mp.active_children()}
    res, run_dir = run_cli(tmp_path, prof, *args)
    assert res.exit_code == 130, res.output
    assert [p for p in mp.active_children() if p.pid not in before] == []  # the workers were stopped
    assert not (run_dir / "results.json").exists()
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*/stage.json")}
    # chains first (safedl.run.graph.chains_first): pgd, then its defense, then fgsm, which nothing waits for
    assert set(stamps) == {"baseline", "attack-pgd", rundir.defense_stage_name("spatial_smoothing", "pgd")}

    monkeypatch.setattr(StageCache, "finish", finish)
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q", *args])
    assert res.exit_code == 0, res.output
    for stage, ns in stamps.items():  # finished stages reused, not redone
        assert (run_dir / "stages" / stage / "stage.json").stat().st_mtime_ns == ns
    r = json.loads((run_dir / "results.json").read_text())
    assert [d["id"] for d in r["defenses"]] == ["spatial_smoothing"] and r["failed_stages"] == []
    assert numbers(r)["attacks"] == numbers(serial_run[1])["attacks"]


def test_bad_execution_options_exit_2_and_write_nothing(tmp_path):
    for args in (["--executor", "gpu"], ["--executor", "process", "--ray-address", "auto"], ["--workers", "0"]):
        res = CliRunner().invoke(app, ["run", str(_profile_file(tmp_path, TINY)), "--runs-dir", str(tmp_path / "runs"),
                                       *args])
        assert res.exit_code == 2, (args, res.output)
    res = CliRunner().invoke(app, ["run", str(_profile_file(tmp_path, dict(TINY, execution={"executor": "gpu"}))),
                                   "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "execution.executor" in res.output
    assert not (tmp_path / "runs").exists()


def _profile_file(tmp_path, prof):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def test_ray_tasks_ask_for_a_gpu_share_only_on_cuda():
    import torch

    from safedl.run.planning import executor_for
    from safedl.profile import parse_profile

    prof = parse_profile(dict(TINY, execution={"executor": "ray", "workers": 4}))
    assert executor_for(prof, torch.device("cuda")).gpus_per_task == 0.25
    assert executor_for(prof, torch.device("cpu")).gpus_per_task is None
    prof = parse_profile(dict(TINY, execution={"executor": "ray", "gpus_per_task": 0.5}))
    assert executor_for(prof, torch.device("cuda")).gpus_per_task == 0.5
