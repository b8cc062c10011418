"""A whole run with the strong adaptive suite in shards (a process pool, one shard per evaluation batch) has the
serial unsplit run's defense entry, and a resumed run reuses the shards."""
from __future__ import annotations

from test_evaluate_suite_shards import shard_profile


def _defense(results):
    (d,) = results["defenses"]
    return d


def _numbers(entry):
    """The entry's metrics without the one timing metric (wall-clock latency differs between any two runs)."""
    return {k: v for k, v in entry["metrics"].items() if k != "latency_added_ms_per_image"}


def test_a_process_run_with_the_suite_in_shards_has_the_serial_unsplit_run_s_defense_entry(tmp_path):
    from safedl.run import run_assessment

    serial = shard_profile(execution={"executor": "serial"})  # one stage at a time: the suite stays in one stage
    # the default with a pool: one shard per worker
    pool = shard_profile(execution={"executor": "process", "workers": 2, "threads_per_task": 1})
    _, whole = run_assessment(serial, base_dir=tmp_path, run_dir=tmp_path / "whole")
    run_b, split = run_assessment(pool, base_dir=tmp_path, run_dir=tmp_path / "split")
    a, b = _defense(whole), _defense(split)
    assert "suite_shards" not in a
    assert [s["batches"] for s in b["suite_shards"]] == [[0, 60], [30]]
    assert all(s["cpu_s"] > 0 and len(s["batch_cpu_s"]) == len(s["batches"]) for s in b["suite_shards"])
    assert _numbers(a) == _numbers(b) and a["confusion_evasion"] == b["confusion_evasion"]
    assert a["metrics"]["strong_suite_broken_by"]["apgd_ce"] > 0
    assert (run_b / "stages" / "suite-feature_squeezing-vs-pgd-1of2" / "stage.json").is_file()
    # resumed serially: every stage, shards included, is reused and the entry is the same
    _, again = run_assessment(serial.model_copy(update={"execution": pool.execution.model_copy(
        update={"executor": "serial", "suite_shards": 2})}), base_dir=tmp_path, run_dir=run_b)
    assert _defense(again) == b


def test_a_finished_unsplit_defense_is_reused_without_running_shards(tmp_path):
    from safedl.run import run_assessment

    run_dir, first = run_assessment(shard_profile(execution={"executor": "serial"}), base_dir=tmp_path,
                                    run_dir=tmp_path / "run")
    _, again = run_assessment(shard_profile(execution={"executor": "serial", "suite_shards": 2}), base_dir=tmp_path,
                              run_dir=run_dir)
    assert _defense(again) == _defense(first)
    assert not list((run_dir / "stages").glob("suite-*"))  # the defense was finished: no shard ran
