"""CPU seconds of one evaluation batch of the strong adaptive suite on a finished run's baseline: the work of one
suite shard stage (safedl.evaluate.suite_shards), without training anything.

    nice -n 10 env PYTHONPATH=src python bench/suite_batch_cost.py RUN_DIR --attack pgd --start 0

RUN_DIR: a run of examples/default.yaml (or any run with that attack stage finished); its baseline checkpoint and
the attack's saved evaluation images are read, nothing is written. The suite runs as the run's profile says
(steps, restarts, batch size, seed) against feature squeezing with ``--bit-depth`` (default 1, as in the default
profile), 1 torch thread. Prints CPU seconds, wall seconds and how many samples each member broke.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from safedl import registry
from safedl.defenses.adaptive import strong_adaptive_suite
from safedl.models import load_checkpoint
from safedl.profile import load_profile
from safedl.run.state import load_stage_state
from safedl.rundir import RunDir, attack_stage_name

log = logging.getLogger("suite_batch_cost")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--attack", default="pgd")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--bit-depth", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    layout = RunDir(args.run_dir)
    prof = load_profile(layout.profile)
    model, _ = load_checkpoint(layout.baseline_model)
    state = load_stage_state(layout.stage_state(attack_stage_name(args.attack)))
    params = state["spec"].get("params", {})
    cfg, bs = prof.evaluation.strong_adaptive, prof.evaluation.batch_size
    x, y = state["x"][args.start:args.start + bs], state["y"][args.start:args.start + bs]
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=args.bit_depth)
    c0, t0 = time.process_time(), time.perf_counter()
    r = strong_adaptive_suite(model.eval(), x, y, eps=float(params.get("eps", 0.3)), norm=params.get("norm", "linf"),
                              seed=prof.seed, preprocessors=[squeeze], steps=cfg.steps, restarts=cfg.restarts,
                              eot_samples=cfg.eot_samples)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    broken = {m: int((r.broken_by == i).sum()) for i, m in enumerate(r.members)}
    log.info("batch at %d (%d images): %.1f CPU s, %.1f s wall; robust %d, broken by %s, wrong when clean %d",
             args.start, len(x), cpu, wall, int(r.robust.sum()), broken, int((r.broken_by == -2).sum()))


if __name__ == "__main__":
    main()
