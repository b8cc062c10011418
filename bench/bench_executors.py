"""Issue 16: the assessment graph on the serial, process-pool and Ray executors on this machine: wall time, speed-up
over serial, a check that results.json metrics are identical (same threads per stage), and the per-task overhead of
an empty stage on each executor.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/bench_executors.py --profile grid [--profile default]
        [--executors serial,process,ray] [--workers 2] [--threads-per-task 1] [--epochs N] [--n-eval N]
        [--seed 0] [--overhead 40] [--out bench_executors.json]
    PYTHONPATH=src .venv/bin/python bench/bench_executors.py --profile none --overhead 40     # overhead only

Profiles: ``default`` is examples/default.yaml; ``grid`` is 4 evasion attacks x 5 evasion defenses plus a
label-flipping and a backdoor attack with one cleanser each (28 stages). ``--epochs`` / ``--n-eval`` /
``--queries`` shrink either profile (every executor runs the same shrunken profile; the printout says what ran).
Wall time includes the baseline, which always trains on the driver, and each executor's start-up (forkserver,
local Ray). Timings on a shared machine are noisy; run it alone for clean numbers.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from safedl.run import run_assessment  # noqa: E402
from safedl.executors import Task, create_executor  # noqa: E402
from safedl.profile import parse_profile  # noqa: E402
from safedl.utils.progress import set_enabled  # noqa: E402

log = logging.getLogger("bench_executors")
EVASION = [{"name": "fgsm", "params": {"eps": 0.3}}, {"name": "pgd", "params": {"eps": 0.3, "steps": 10}},
           {"name": "apgd_ce", "params": {"eps": 0.3, "steps": 10}},
           {"name": "square", "params": {"eps": 0.3, "max_queries": 300}}]
EVASION_DEFENSES = [{"name": "feature_squeezing", "params": {"bit_depth": 1}},
                    {"name": "spatial_smoothing", "params": {"window": 3}},
                    {"name": "jpeg_compression", "params": {"quality": 50}},
                    {"name": "feature_squeezing_detector"}, {"name": "mahalanobis"}]


def grid_profile(seed: int) -> dict:
    evasion_ids = [a["name"] for a in EVASION]
    return {
        "name": "grid", "seed": seed, "dataset": {"name": "mnist5k"}, "model": {"arch": "small_cnn"},
        "training": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.001, "augment": "none"},
        "attacks": {"evasion": EVASION,
                    "poisoning": [{"name": "label_flipping", "params": {"strategy": "many_to_one", "flip_rate": 0.2}}],
                    "backdoor": [{"name": "static_patch", "params": {"trigger": "pattern", "poison_fraction": 0.1,
                                                                     "target_class": 7}}]},
        "defenses": [dict(d, against=evasion_ids) for d in EVASION_DEFENSES]
        + [{"name": "data_cleaning", "against": ["label_flipping"]},
           {"name": "spectral_signatures", "against": ["static_patch"]}],
        "evaluation": {"n_eval": 300, "batch_size": 150, "n_examples": 4},
        "output": {"figures": True, "html": False},
    }


def shrink(prof: dict, *, epochs: int | None, n_eval: int | None, queries: int | None) -> dict:
    prof = copy.deepcopy(prof)
    if epochs is not None:
        prof["training"]["epochs"] = epochs
    if n_eval is not None:
        prof["evaluation"]["n_eval"] = n_eval
    if queries is not None:
        for a in prof["attacks"].get("evasion", []):
            if "max_queries" in a.get("params", {}):
                a["params"]["max_queries"] = queries
    return prof


def run_one(prof: dict, executor: str, *, workers: int, threads: int, root: Path) -> tuple[float, dict]:
    p = parse_profile(dict(prof, execution={"executor": executor, "workers": workers, "threads_per_task": threads}))
    t0 = time.perf_counter()
    _, results = run_assessment(p, base_dir=ROOT / "examples", runs_root=root)
    return time.perf_counter() - t0, results


def overhead(n: int, *, workers: int) -> dict:
    """Seconds per empty task: n independent tasks (throughput) and a chain of n (latency), start-up excluded."""
    import _executor_tasks as T
    import ray

    out = {}
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=workers, include_dashboard=False, object_store_memory=100 * 1024**2,
             configure_logging=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})  # workers import the test tasks
    try:
        for name in ("serial", "process", "ray"):
            ex = create_executor(name, workers=workers, threads_per_task=1)
            ex.run([Task("warm", T.empty)], shared=None)  # process: the fork server starts here, not below
            flat = [Task(f"t{i}", T.empty) for i in range(n)]
            chain = [Task(f"c{i}", T.empty, deps=(f"c{i - 1}",) if i else ()) for i in range(n)]
            row = {}
            for label, tasks in (("independent", flat), ("chain", chain)):
                t0 = time.perf_counter()
                ex.run(tasks, shared=None)
                row[label] = (time.perf_counter() - t0) / n
            out[name] = row
    finally:
        ray.shutdown()
    return out


WALL_CLOCK = ("time", "latency")


def measured(obj):
    if isinstance(obj, dict):
        return {k: measured(v) for k, v in obj.items() if not any(w in k for w in WALL_CLOCK)}
    return obj


def numbers(r: dict) -> dict:
    return {"baseline": r["baseline"]["metrics"], "attacks": [(a["id"], measured(a["metrics"])) for a in r["attacks"]],
            "defenses": [(d["id"], d["against"], measured(d["metrics"])) for d in r["defenses"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="append", choices=["default", "grid", "none"], help="none: overhead only")
    ap.add_argument("--executors", default="serial,process,ray")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-task", type=int, default=1)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--n-eval", type=int)
    ap.add_argument("--queries", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overhead", type=int, default=40, help="empty tasks per overhead measurement (0: skip)")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/safedl_bench_executors"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    set_enabled(False)
    torch.set_num_threads(args.threads_per_task)  # the baseline on the driver, same in every run
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "profiles": {}}
    for name in [p for p in args.profile or ["grid"] if p != "none"]:
        base = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text()) if name == "default" \
            else grid_profile(args.seed)
        base["seed"] = args.seed
        prof = shrink(base, epochs=args.epochs, n_eval=args.n_eval, queries=args.queries)
        n_stages = len(parse_profile(prof).attacks.all())
        log.info("profile %s (%d attacks): epochs=%s n_eval=%s", name, n_stages, prof["training"]["epochs"],
                 prof["evaluation"]["n_eval"])
        rows, first = {}, None
        for ex in args.executors.split(","):
            log.info("  %-8s starting (load average %.1f)", ex, os.getloadavg()[0])
            wall, results = run_one(prof, ex, workers=args.workers, threads=args.threads_per_task, root=args.runs)
            nums = numbers(results)
            first = first or nums
            rows[ex] = {"wall_s": wall, "baseline_s": results["baseline"]["time_s"],
                        "load_avg_1m_after": os.getloadavg()[0],
                        "metrics_sha256": hashlib.sha256(json.dumps(nums, sort_keys=True).encode()).hexdigest()[:16],
                        "stages": len(results["attacks"]) + len(results["defenses"]),
                        "failed": len(results["failed_stages"]), "identical_to_first": nums == first}
            log.info("  %-8s wall %7.1f s (baseline %.1f s), %d stages, %d failed, metrics identical to %s: %s", ex,
                     wall, rows[ex]["baseline_s"], rows[ex]["stages"], rows[ex]["failed"],
                     args.executors.split(",")[0], rows[ex]["identical_to_first"])
        if "serial" in rows:
            for ex, row in rows.items():
                row["speedup"] = rows["serial"]["wall_s"] / row["wall_s"]
                g = rows["serial"]["wall_s"] - rows["serial"]["baseline_s"]
                row["speedup_graph"] = g / (row["wall_s"] - row["baseline_s"])
                log.info("  %-8s speed-up %.2fx (stage graph only: %.2fx)", ex, row["speedup"], row["speedup_graph"])
        report["profiles"][name] = {"profile": prof, "results": rows}
    if args.overhead:
        report["overhead_s_per_task"] = overhead(args.overhead, workers=args.workers)
        for ex, row in report["overhead_s_per_task"].items():
            log.info("empty task on %-8s %.4f s independent, %.4f s chained", ex, row["independent"], row["chain"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
