"""The run spine on an executor: the same numbers serial and in a process pool, a failed stage reported while the
others finish (and redone on resume), and a parallel run killed with Ctrl-C resumed without redoing finished stages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safedl.assess import handlers
from safedl.cli import app

TINY = {
    "name": "tiny", "seed": 0,
    "dataset": {"name": "digits"}, "model": {"arch": "tiny_cnn"},
    "training": {"epochs": 1, "batch_size": 64, "lr": 0.003, "augment": "none"},
    "attacks": {"evasion": [{"name": "fgsm", "params": {"eps": 0.2}},
                            {"name": "pgd", "params": {"eps": 0.2, "steps": 3}}]},
    "defenses": [{"name": "feature_squeezing", "params": {"bit_depth": 2}, "against": ["pgd"]}],
    "evaluation": {"n_eval": 60, "batch_size": 60, "n_examples": 2, "gate": {"min_clean_accuracy": 0.1}},
}
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


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serial")
    res, run_dir = run_cli(tmp, TINY, "--threads-per-task", "1")
    assert res.exit_code == 0, res.output
    return run_dir, json.loads((run_dir / "results.json").read_text())


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


def stage_keys(run_dir):
    return {p.parent.name: json.loads(p.read_text())["key"] for p in (run_dir / "stages").glob("*/stage.json")}


def test_failed_stage_is_reported_the_others_finish_and_resume_redoes_it(tmp_path, monkeypatch):
    prof = json.loads(json.dumps(TINY))
    prof["defenses"][0]["against"] = ["fgsm", "pgd"]
    real = handlers.ATTACK_HANDLERS["evasion"]

    def planted(ctx, spec, attack):
        if spec.key == "fgsm":
            raise RuntimeError("planted stage failure")
        return real(ctx, spec, attack)

    monkeypatch.setitem(handlers.ATTACK_HANDLERS, "evasion", planted)
    res, run_dir = run_cli(tmp_path, prof)
    assert res.exit_code == 1, res.output  # the gate fails on a failed stage
    r = json.loads((run_dir / "results.json").read_text())
    failed = {f["stage"]: f for f in r["failed_stages"]}
    assert failed["attack-fgsm"] == {"stage": "attack-fgsm", "kind": "attack", "id": "fgsm", "against": None,
                                     "error": "RuntimeError: planted stage failure", "attempts": 2}
    assert failed["defense-feature_squeezing-vs-fgsm"]["attempts"] == 0  # never run: its attack failed
    assert [a["id"] for a in r["attacks"]] == ["pgd"] and [d["against"] for d in r["defenses"]] == ["pgd"]
    assert not r["gate"]["passed"] and any("attack-fgsm failed" in f for f in r["gate"]["failures"])
    md = (run_dir / "report.md").read_text()
    assert "Failed stages" in md and "planted stage failure" in md
    assert not (run_dir / "stages" / "attack-fgsm" / "stage.json").exists()  # a failure is never cached

    monkeypatch.setitem(handlers.ATTACK_HANDLERS, "evasion", real)
    stamp = (run_dir / "stages" / "attack-pgd" / "stage.json").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads((run_dir / "results.json").read_text())
    assert r["failed_stages"] == [] and [a["id"] for a in r["attacks"]] == ["fgsm", "pgd"]
    assert len(r["defenses"]) == 2
    assert (run_dir / "stages" / "attack-pgd" / "stage.json").stat().st_mtime_ns == stamp


def test_interrupted_process_run_exits_130_and_resumes_reusing_finished_stages(tmp_path, serial_run):
    prof = json.loads(json.dumps(TINY))  # a defense that trains a model: slow enough to be interrupted
    prof["defenses"] = [{"name": "adversarial_training", "params": {"eps": 0.2, "steps": 2, "epochs": 1},
                         "against": ["pgd"]}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), SAFEDL_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "safedl.cli", "run", str(path), "--runs-dir", str(tmp_path / "runs"), "-q",
           "--executor", "process", "--workers", "1", "--threads-per-task", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    marker = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/stages/attack-pgd/stage.json"))
        if found:
            marker = found[0]
            break
        time.sleep(0.05)
    assert marker is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the defense stage runs in its worker
    out, err = proc.communicate(timeout=60)
    run_dir = marker.parents[2]
    assert proc.returncode == 130, err
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "stages" / "defense-adversarial_training-vs-pgd" / "stage.json").exists()
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*/stage.json")}
    assert set(stamps) == {"baseline", "attack-fgsm", "attack-pgd"}

    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q", "--executor", "process",
                                   "--workers", "1", "--threads-per-task", "1"])
    assert res.exit_code == 0, res.output
    for stage, ns in stamps.items():  # finished stages reused, not redone
        assert (run_dir / "stages" / stage / "stage.json").stat().st_mtime_ns == ns
    r = json.loads((run_dir / "results.json").read_text())
    assert [d["id"] for d in r["defenses"]] == ["adversarial_training"] and r["failed_stages"] == []
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
