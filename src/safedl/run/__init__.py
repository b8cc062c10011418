"""Orchestration of an assessment (``safedl run``): prepare the data and model, plan the stage graph, run it on an
executor with the stage cache, assemble results.json and render the reports.

    prepare.py   data, model and profile checks before anything is written   planning.py  defense plan, executor
    adopt.py     run-directory adoption and marker                           baseline.py  the baseline stage
    graph.py     the stage graph and its run                                 stages.py    one stage as a task
    cache.py     finished stages by content key                              state.py     packed stage state
    results.py   results.json assembly (risk and gate from safedl.decide)    pipeline.py  Run, run_assessment

What one stage computes lives in ``safedl.evaluate``; nothing but the CLI and ``safedl/__init__.py`` imports this
package.
"""
from safedl.run.adopt import is_run_dir
from safedl.run.pipeline import Run, run_assessment
from safedl.run.prepare import prepare, resolve_paths

__all__ = ["Run", "is_run_dir", "prepare", "resolve_paths", "run_assessment"]
