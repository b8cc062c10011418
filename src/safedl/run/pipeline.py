"""The run spine: baseline -> attack simulation -> defenses -> risk -> gate -> results.json and reports.

Each stage writes its result atomically into ``RUN_DIR/stages/<stage>/`` together with a content key (a hash of the
profile sections and inputs it depends on; ``safedl.run.cache``). ``resume`` reuses every stage whose key still
matches, so a crash or Ctrl-C loses no finished stage and a changed profile redoes only what changed.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import torch
import yaml

from safedl.data.dataset import Splits
from safedl.executors import Executor
from safedl.profile import Profile
from safedl.report.render import write_reports
from safedl.run.adopt import adopt_run_dir
from safedl.evaluate.canary import canary_entry, canary_records
from safedl.run.baseline import baseline_stage
from safedl.run.cache import StageCache
from safedl.run.graph import build_graph, run_graph
from safedl.run.planning import executor_for, plan_defenses, suite_shards_for
from safedl.run.prepare import prepare, resolve_paths
from safedl.run.results import assemble_results, data_summary
from safedl.run.stages import StageShared
from safedl.rundir import RunDir
from safedl.utils.io import atomic_write_json, atomic_write_text, json_hash


class Run:
    """One assessment run in its own directory."""

    def __init__(self, profile: Profile, *, run_dir: Path, device: torch.device, base_dir: Path = Path(".")):
        self.profile, self.run_dir, self.device, self.base_dir = profile, Path(run_dir), device, base_dir
        self.layout = RunDir(self.run_dir)
        self.cache = StageCache(self.layout)

    @staticmethod
    def new_run_dir(profile: Profile, root: Path | None = None) -> Path:
        root = Path(root if root is not None else profile.output.dir)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path, k = root / f"{stamp}-{profile.name}", 1
        while path.exists():
            k += 1
            path = root / f"{stamp}-{profile.name}-{k}"
        return path

    def execute(self, *, splits: Splits, fresh, model_meta: dict, executor: Executor | None = None) -> dict[str, Any]:
        """Baseline on this process, then the stage graph on ``executor`` (default: the profile's ``execution``)."""
        p = self.profile
        plan = plan_defenses(p)
        executor = executor if executor is not None else executor_for(p, self.device)
        canaries = canary_records(p.canary_records, splits)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.layout.profile, yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
        data_info = data_summary(p, splits)
        # dataset.extra and field_test are left out of the key: their content is in the splits' hashes, and runs made
        # before these fields existed keep their keys (a resumed run reuses its stages)
        baseline_key = json_hash({"data": data_info["hashes"],
                                  "dataset": p.dataset.model_dump(exclude={"extra", "field_test"}),
                                  "model": p.model.model_dump(),
                                  # the poisoned model's mode is not the baseline's: it keys the attack stages
                                  "training": p.training.model_dump(exclude={"mode", "finetune"}), "seed": p.seed})
        baseline, baseline_entry = baseline_stage(p, cache=self.cache, key=baseline_key, splits=splits, fresh=fresh,
                                                  model_meta=model_meta, device=self.device, base_dir=self.base_dir)
        graph = build_graph(p, plan, baseline_key, suite_shards=suite_shards_for(p, executor))
        entries, failed = run_graph(graph, executor, self._shared(splits, fresh, model_meta, baseline, executor),
                                    self.cache)
        results = assemble_results(
            p, run_id=self.run_dir.name, device=self.device, executor=executor, data_info=data_info,
            baseline_entry=baseline_entry, failed=failed,
            attacks=[entries[n.stage] for n in graph if n.kind == "attack" and n.stage in entries],
            defenses=[entries[n.stage] for n in graph if n.kind == "defense" and n.stage in entries])
        if canaries is not None:  # stored with the run, checked by every retraining (safedl retrain)
            results["canaries"] = canary_entry(p.canary_records, baseline, *canaries, device=self.device)
        atomic_write_json(self.layout.results, results)
        write_reports(results, self.run_dir, html=p.output.html, figures=p.output.figures)
        return results

    def _shared(self, splits: Splits, fresh, model_meta: dict, baseline, executor: Executor) -> StageShared:
        """What every stage reads: live objects for an in-process executor, picklable ones for workers."""
        p = self.profile
        if executor.in_process:
            return StageShared(profile=p, splits=splits, device=str(self.device), base_dir=str(self.base_dir),
                               model_meta=model_meta, baseline=baseline, fresh=fresh, run_dir=str(self.run_dir))
        return StageShared(profile=p, splits=splits, device=str(self.device), model_meta=model_meta,
                           base_dir=str(Path(self.base_dir).resolve()),
                           baseline_state={k: v.detach().cpu() for k, v in baseline.state_dict().items()})


def run_assessment(profile: Profile, *, base_dir: Path = Path("."), run_dir: Path | None = None,
                   runs_root: Path | None = None, device: torch.device | str = "cpu") -> tuple[Path, dict]:
    """Run (or resume, when ``run_dir`` is an existing run) a whole assessment; returns (run dir, results).

    Paths in the profile are resolved against ``base_dir`` and saved absolute; resuming refuses a folder that is
    not a safedl run and a run whose data changed.
    """
    profile = resolve_paths(profile, Path(base_dir))
    splits, fresh, meta = prepare(profile, base_dir=base_dir)
    canary_records(profile.canary_records, splits)  # a bad canary source fails before anything is written
    run_dir = Path(run_dir) if run_dir is not None else Run.new_run_dir(profile, runs_root)
    adopt_run_dir(run_dir, profile, splits)
    run = Run(profile, run_dir=run_dir, device=torch.device(device), base_dir=base_dir)
    return run_dir, run.execute(splits=splits, fresh=fresh, model_meta=meta)
