"""Evaluate defenses against one extraction attack: the same attack re-run, at every budget, on the defended system.

- postprocessor (rounding, top_k, class_labels, reverse_sigmoid, ...): the deployed system answers through it, so
  the attacker's scores are hardened; fidelity is measured against the label the defended system answers.
- trainer (dp_training, ...): the victim is a model trained by the defense with the baseline's recipe and seed.

``curve_after`` is the curve with the defense next to the attack's own (``curve_before``); ``attack_success_rate_after``
is the fidelity at the largest budget, and ``clean_accuracy_after`` what the defense costs legitimate users.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

from torch import nn

from safedl.evaluate.attack_extraction import (attacker_pool, curve_metrics, deployed_labels, extraction_curve,
                                             transfer_success)
from safedl.evaluate.context import RunContext
from safedl.evaluate.defense_models import train_defense_model
from safedl.evaluate.base import AttackOutcome, defense_evaluator
from safedl.profile import DefenseSpec
from safedl.utils.stats import proportion, scalar

log = logging.getLogger(__name__)


def _evaluate(ctx: RunContext, spec: DefenseSpec, outcome: AttackOutcome, victim: nn.Module,
              postprocess: nn.Module | None) -> dict[str, Any]:
    from safedl import registry

    a = outcome.entry
    spec_a = next(s for s in ctx.profile.attacks.extraction if s.key == a["id"])
    attack = registry.create("extraction", spec_a.name, **spec_a.params)  # the same attack, run on the defended system
    output = ctx.profile.threat_model.interface_exposed
    test = ctx.splits.test
    tx = test.x.to(ctx.device)
    points, surrogate = extraction_curve(victim, attack, attacker_pool(ctx.splits, attack.pool), tx, test.y,
                                         output=output, num_classes=ctx.splits.num_classes, device=ctx.device,
                                         postprocess=postprocess, description=f"{spec.key} vs {a['id']}")
    x, y = ctx.eval_set()
    transfer = transfer_success(victim, surrogate, x, y, eps=attack.transfer_eps, postprocess=postprocess)
    correct = (deployed_labels(victim, tx, postprocess).cpu() == test.y)
    metrics = curve_metrics(points, transfer, suffix="_after")
    metrics["clean_accuracy_after"] = proportion(int(correct.sum()), len(correct))
    entry: dict[str, Any] = {"metrics": metrics, "curve_before": a.get("curve", []), "curve_after": points,
                             "notes": [], "artifacts": {}}
    if ctx.profile.output.figures:
        from safedl.report.extraction_figures import curve_figure

        path = ctx.artifact_dir("defenses") / f"{spec.key}_vs_{a['id']}_extraction.png".replace("/", "_")
        if curve_figure(path, {"undefended": a.get("curve", []), f"with {spec.key}": points},
                        title=f"{a['id']} against {spec.key}: stolen model vs query budget"):
            entry["artifacts"]["extraction curve with and without the defense (95% CI)"] = ctx.rel(path)
    return entry


@defense_evaluator("postprocessor", "extraction")
def defend_extraction_postprocessor(ctx: RunContext, spec: DefenseSpec, components: Sequence[Any],
                                    outcome: AttackOutcome) -> dict[str, Any]:
    """Output hardening: the attacker only ever sees the post-processed answers."""
    post = copy.deepcopy(components[0]).to(ctx.device).eval()
    if ctx.profile.threat_model.interface_exposed == "labels" and getattr(post, "preserves_argmax", True):
        log.info("%s: the interface already answers labels only; a label-preserving postprocessor changes nothing",
                 spec.key)
    return _evaluate(ctx, spec, outcome, ctx.baseline, post)


@defense_evaluator("trainer", "extraction")
def defend_extraction_trainer(ctx: RunContext, spec: DefenseSpec, components: Sequence[Any],
                              outcome: AttackOutcome) -> dict[str, Any]:
    """A victim trained by the defense (e.g. DP-SGD) with the baseline's recipe and seed, stolen the same way."""
    trainer = components[0]
    trained = train_defense_model(ctx, trainer, architecture=trainer.architecture, facts=trainer.facts)
    entry = _evaluate(ctx, spec, outcome, trained.model, None)
    entry["notes"].append(f"{trainer.registry_name}: a fresh model trained with the baseline recipe and seed"
                          f"{' (reloaded from the stage folder)' if trained.reloaded else ''}")
    for name, value in trained.facts.items():
        entry["metrics"][name] = scalar(float(value))
    return entry
