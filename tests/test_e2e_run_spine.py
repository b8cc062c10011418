"""End-to-end run spine on tiny data: results contract, resume/caching, bad input writes nothing."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from _profiles import tiny_profile

PROFILE = tiny_profile(
    attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.2}},
                         {"name": "pgd", "params": {"eps": 0.2, "steps": 5}},
                         {"name": "pgd", "id": "pgd_targeted", "params": {"eps": 0.3, "steps": 10}, "targeted": True}]},
    evaluation={"n_eval": 120, "n_examples": 4, "gate": {"min_clean_accuracy": 0.5, "min_robust_accuracy": 0.99}},
    output={"dir": "runs"},
)


def _write(tmp_path, prof, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(prof))
    return path


def _run(*args):
    return CliRunner().invoke(app, ["run", *map(str, args), "--no-progress", "-q"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spine")
    res = _run(_write(tmp, PROFILE), "--runs-dir", tmp / "runs")
    run_dir = next((tmp / "runs").iterdir())
    return tmp, run_dir, res


def test_results_follow_the_contract(finished_run):
    _, run_dir, res = finished_run
    assert res.exit_code == 1, res.output  # min_robust_accuracy 0.99 cannot hold: the gate must fail with code 1
    r = json.loads((run_dir / "results.json").read_text())
    assert r["schema_version"] == 1 and r["profile"]["name"] == "tiny" and r["environment"]["seed"] == 0
    acc = r["baseline"]["metrics"]["clean_accuracy"]
    assert acc["n"] == 360 and acc["ci95"][0] <= acc["value"] <= acc["ci95"][1] and acc["value"] > 0.7
    ids = [a["id"] for a in r["attacks"]]
    assert ids == ["fgsm", "pgd", "pgd_targeted"]
    for a in r["attacks"]:
        m = a["metrics"]
        assert m["robust_accuracy"]["n"] == 120
        assert m["robust_accuracy"]["value"] <= m["clean_accuracy"]["value"]
        assert m["perturbation"]["linf_max"]["value"] <= a["params"]["eps"] + 1e-6
    assert "targeted_success_rate" in r["attacks"][2]["metrics"]
    assert not r["gate"]["passed"] and any("robust_accuracy" in f for f in r["gate"]["failures"])
    md = (run_dir / "report.md").read_text()
    assert "pgd_targeted" in md and "FAILED" in md and (run_dir / "report.html").is_file()
    for a in r["attacks"]:
        for path in a["artifacts"].values():
            assert (run_dir / path).is_file()


def test_resume_keeps_unchanged_stages_and_redoes_changed_ones(tmp_path, finished_run):
    _, original, _ = finished_run
    run_dir = tmp_path / "copy"
    shutil.copytree(original, run_dir)
    stamp = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*/stage.json")}
    prof = json.loads(json.dumps(PROFILE))
    prof["attacks"]["evasion"][1]["params"]["steps"] = 3  # change one attack only
    res = _run(_write(tmp_path, prof, "q.yaml"), "--resume", run_dir)
    assert res.exit_code == 1, res.output
    new = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*/stage.json")}
    for same in ("baseline", "attack-fgsm", "attack-pgd_targeted"):
        assert new[same] == stamp[same]
    assert new["attack-pgd"] != stamp["attack-pgd"]
    r = json.loads((run_dir / "results.json").read_text())
    assert r["attacks"][1]["params"]["steps"] == 3 and len(r["attacks"]) == 3


def test_same_profile_and_seed_give_the_same_numbers(tmp_path, finished_run):
    tmp, run_dir, _ = finished_run
    before = (run_dir / "results.json").read_bytes()
    _run(_write(tmp_path, PROFILE), "--runs-dir", tmp / "runs")  # the same root as the first run
    (other,) = [d for d in (tmp / "runs").iterdir() if d != run_dir]
    assert (run_dir / "results.json").read_bytes() == before  # a new run never overwrites another
    a = json.loads(before)
    b = json.loads((other / "results.json").read_text())
    assert a["baseline"]["metrics"] == b["baseline"]["metrics"]
    assert len(a["attacks"]) == len(b["attacks"]) == 3
    for x, y in zip(a["attacks"], b["attacks"]):
        x["metrics"].pop("time_per_sample_s"), y["metrics"].pop("time_per_sample_s")  # wall time varies
        assert x["metrics"] == y["metrics"]


def test_a_new_run_dir_never_reuses_an_existing_folder(tmp_path, monkeypatch):
    """Two runs started in the same second get different folders."""
    import datetime as dt

    from safedl.profile import parse_profile
    from safedl.run import Run

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr("safedl.run.pipeline._dt.datetime", Frozen)
    prof = parse_profile(PROFILE, source="p.yaml")
    first = Run.new_run_dir(prof, tmp_path)
    assert first == tmp_path / "20260102T030405Z-tiny"
    first.mkdir()
    second = Run.new_run_dir(prof, tmp_path)
    assert second == tmp_path / "20260102T030405Z-tiny-2"


def test_bad_profile_exits_2_and_writes_nothing(tmp_path):
    bad = dict(PROFILE, seed=-3, attacks={"evasion": [{"name": "nope"}]})
    res = _run(_write(tmp_path, bad), "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2
    assert "seed" in res.output or "seed" in (res.stderr if hasattr(res, "stderr") else "")
    assert not (tmp_path / "runs").exists()


def test_bad_data_file_exits_2_and_writes_nothing(tmp_path):
    bad = dict(PROFILE, dataset={"name": "mine", "format": "npz", "path": "missing.npz"})
    res = _run(_write(tmp_path, bad), "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "missing.npz" in res.output
    assert not (tmp_path / "runs").exists()


def test_validate_init_and_list(tmp_path):
    runner = CliRunner()
    out = tmp_path / "new.yaml"
    assert runner.invoke(app, ["init", str(out)]).exit_code == 0
    assert runner.invoke(app, ["init", str(out)]).exit_code == 2  # no silent overwrite
    assert runner.invoke(app, ["validate", str(out)]).exit_code == 0
    out.write_text(out.read_text().replace("seed: 0", "seed: -1"))
    res = runner.invoke(app, ["validate", str(out)])
    assert res.exit_code == 2 and "seed" in res.output
    res = runner.invoke(app, ["list", "evasion"])
    assert res.exit_code == 0 and "pgd" in res.output and "eps" in res.output and "steps" in res.output
    assert runner.invoke(app, ["list", "nonsense"]).exit_code == 2
