"""Evaluate per-key query detectors (stateful detection, PRADA) against query-based attacks, offline.

Each simulated API key is the victim wrapped in :class:`~safedl.defenses.query.ObservedModel`, which the counted query
interface calls once per query batch, so the detector sees exactly the stream that key would send the service.

- The detector is calibrated on benign streams of the training split (in order, and a user's retry bursts).
- Benign false alarms: ``benign_keys`` keys stream the test and validation images in order, as many more with retry
  bursts, ``benign_queries`` queries each; the metric is the share of those keys ever flagged.
- Attack keys: ``attack_keys`` keys each run the attack until they have sent ``attack_budget`` queries (evasion:
  one evaluation image after another; extraction: one theft with that total budget, its own seed).
  ``queries_to_detection_median`` is the median query number of the first flag among detected keys.
- What blocking at the first flag leaves the attacker (the service's ``block`` response): evasion,
  ``attack_success_rate_after`` = images the key broke with answers up to its first flag (the flagged query is still
  answered: the service judges a query after answering it), over all images it attacked (``robust_accuracy`` = 1
  minus that); extraction, the copy the attack trains from the answers up to the first flag (``fidelity_after``,
  ``surrogate_accuracy_after``: per-key means on the test split).

A per-key detector cannot see an attacker who spreads queries over many keys; the notes say so.
"""
from __future__ import annotations

import copy
import inspect
import logging
import statistics
from typing import Any, Sequence

import torch
from torch import nn

from safedl import registry
from safedl.evaluate.attack_extraction import attacker_pool, deployed_labels
from safedl.evaluate.context import RunContext
from safedl.evaluate.base import AttackOutcome, defense_evaluator
from safedl.attacks.extraction.base import ExtractionOracle
from safedl.defenses.query import ObservedModel
from safedl.defenses.query.streams import burst_stream, calibration_streams, in_order_stream
from safedl.profile import AttackSpec, DefenseSpec
from safedl.utils.progress import progress_bar
from safedl.utils.stats import proportion, scalar
from safedl.utils.tensors import predict

log = logging.getLogger(__name__)
QUERY_ACCESS = ("scores", "labels")


def _attack_spec(ctx: RunContext, attack_id: str) -> tuple[str, AttackSpec]:
    return next((cat, s) for cat, s in ctx.profile.attacks.all() if s.key == attack_id)


def not_applicable(category: str, spec: AttackSpec) -> str | None:
    """Why a query detector cannot see this attack (a white-box or transfer attack sends no query stream)."""
    if category == "extraction":
        return None
    access = getattr(registry.get("evasion", spec.name), "access", "gradients")
    if access not in QUERY_ACCESS:
        return f"{spec.name} is a {access} attack: it sends no stream of queries a query detector could watch"
    return None


def _prepared(ctx: RunContext, component: Any) -> Any:
    """A fresh copy of the detector, grouping by the victim's answered label where it can (PRADA), calibrated on
    benign streams of the training split."""
    det = copy.deepcopy(component)
    if hasattr(det, "classify") and det.classify is None:
        victim = ctx.baseline
        det.classify = lambda x: predict(victim, x)
    calib = [s.to(ctx.device) for s in calibration_streams(ctx.splits.train.x, seed=ctx.profile.seed)]
    return det.calibrate(calib)


def _benign_false_alarms(ctx: RunContext, det: Any, name: str) -> dict[str, Any]:
    """Share of benign keys ever flagged: test+validation images streamed in order, and with retry bursts."""
    qd = ctx.profile.evaluation.query_detection
    benign = torch.cat([ctx.splits.test.x, ctx.splits.val.x])
    out: dict[str, Any] = {}
    with progress_bar(2 * qd.benign_keys, f"{name}: benign keys") as bar:
        for kind, make in (("in_order", in_order_stream), ("bursts", burst_stream)):
            flagged = 0
            for j in range(qd.benign_keys):
                det.reset()
                start = (j * 97) % len(benign)
                stream = make(torch.roll(benign, -start, 0), qd.benign_queries, seed=ctx.profile.seed + j)
                om = ObservedModel(ctx.baseline, {name: det}, key=f"benign-{kind}-{j}")
                with torch.no_grad():
                    for i in range(0, len(stream), 256):
                        om(stream[i:i + 256].to(ctx.device))
                flagged += name in om.first_detection_
                bar.advance(1)
            out[kind] = proportion(flagged, qd.benign_keys)
    return out


def _with_params(category: str, spec: AttackSpec, **override: Any) -> Any:
    """The profile's attack, with ``override`` applied to the parameters its constructor accepts."""
    cls = registry.get(category, spec.name)
    accepted = inspect.signature(cls.__init__).parameters
    return registry.create(category, spec.name, **{**spec.params, **{k: v for k, v in override.items() if k in accepted}})


def _evasion_key(ctx: RunContext, det: Any, name: str, spec: AttackSpec, key: int) -> dict[str, Any]:
    """One key attacking evaluation images one at a time until its budget is spent: per image, the query number
    at which its attack ended and whether it broke the image."""
    budget = ctx.profile.evaluation.query_detection.attack_budget
    x, y = ctx.eval_set()
    om = ObservedModel(ctx.baseline, {name: det}, key=f"attack-{key}")
    per_query = _with_params("evasion", spec).max_queries
    images, i = [], (key * 50) % len(x)
    while om.queries_ < budget and len(images) < len(x):
        attack = _with_params("evasion", spec, max_queries=min(per_query, budget - om.queries_))
        xa = attack(om, x[i:i + 1], y[i:i + 1])
        broken = bool(predict(ctx.baseline, xa) != y[i:i + 1])
        images.append({"ended_at": om.queries_, "broken": broken})
        i = (i + 1) % len(x)
    return {"sent": om.queries_, "first": om.first_detection_.get(name), "images": images}


def _surrogate_scores(ctx: RunContext, surrogate: nn.Module, victim_labels: torch.Tensor) -> tuple[float, float]:
    """(fidelity, accuracy) of a stolen copy on the test split."""
    pred = predict(surrogate, ctx.splits.test.x.to(ctx.device)).cpu()
    return float((pred == victim_labels).float().mean()), float((pred == ctx.splits.test.y).float().mean())


def _extraction_key(ctx: RunContext, det: Any, name: str, spec: AttackSpec, key: int) -> dict[str, Any]:
    """One key stealing with the attack's largest budget (capped at ``attack_budget``), then the copy it would
    have had if blocked at its first flag."""
    base = _with_params("extraction", spec)
    budget = min(max(base.budgets), ctx.profile.evaluation.query_detection.attack_budget)
    seed = int(spec.params.get("seed", getattr(base, "seed", 0))) + key
    attack = _with_params("extraction", spec, seed=seed)
    output, pool = ctx.profile.threat_model.interface_exposed, attacker_pool(ctx.splits, attack.pool)
    om = ObservedModel(ctx.baseline, {name: det}, key=f"attack-{key}")
    full = attack.extract(ExtractionOracle(om, budget=budget, output=output, device=ctx.device), pool,
                          num_classes=ctx.splits.num_classes, device=ctx.device)
    first = om.first_detection_.get(name)
    row: dict[str, Any] = {"sent": om.queries_, "first": first}
    victim_labels = deployed_labels(ctx.baseline, ctx.splits.test.x.to(ctx.device), None).cpu()
    row["fidelity"], row["surrogate_accuracy"] = _surrogate_scores(ctx, full.surrogate, victim_labels)
    if first is None:
        row["fidelity_blocked"], row["surrogate_accuracy_blocked"] = row["fidelity"], row["surrogate_accuracy"]
        return row
    blocked = _with_params("extraction", spec, seed=seed)
    stolen = blocked.extract(ExtractionOracle(ctx.baseline, budget=first, output=output,
                                              device=ctx.device), pool, num_classes=ctx.splits.num_classes,
                             device=ctx.device)
    row["fidelity_blocked"], row["surrogate_accuracy_blocked"] = _surrogate_scores(ctx, stolen.surrogate,
                                                                                   victim_labels)
    return row


def _detection_metrics(rows: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    firsts = [r["first"] for r in rows if r["first"] is not None and r["first"] <= budget]
    n = len(rows)
    return {"queries_to_detection_median": scalar(statistics.median(firsts), n=len(firsts)) if firsts else None,
            "detected_within_budget": proportion(len(firsts), n),
            "detected_within_500": proportion(sum(f <= 500 for f in firsts), n)}


def _evasion_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    images = [(im, r["first"]) for r in rows for im in r["images"]]
    broken = sum(im["broken"] for im, _ in images)
    before = sum(im["broken"] and (first is None or im["ended_at"] <= first) for im, first in images)
    return {"attack_success_rate": proportion(broken, len(images)),
            "attack_success_rate_after": proportion(before, len(images)),
            "robust_accuracy": proportion(len(images) - before, len(images))}


def _extraction_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in ("fidelity", "surrogate_accuracy", "fidelity_blocked",
                                                     "surrogate_accuracy_blocked")}
    return {"attack_success_rate": scalar(mean["fidelity"], n=n),
            "attack_success_rate_after": scalar(mean["fidelity_blocked"], n=n),
            "fidelity_after": scalar(mean["fidelity_blocked"], n=n),
            "surrogate_accuracy_after": scalar(mean["surrogate_accuracy_blocked"], n=n)}


@defense_evaluator("query_detector", "evasion", "extraction")
def defend_query_detector(ctx: RunContext, spec: DefenseSpec, components: Sequence[Any],
                          outcome: AttackOutcome) -> dict[str, Any]:
    """Queries until a per-key detector flags the attack, benign keys it flags, and what blocking leaves."""
    category, attack_spec = _attack_spec(ctx, outcome.entry["id"])
    det = _prepared(ctx, components[0])
    qd = ctx.profile.evaluation.query_detection
    benign = _benign_false_alarms(ctx, det, spec.key)
    run_key = _evasion_key if category == "evasion" else _extraction_key
    rows = []
    with progress_bar(qd.attack_keys, f"{spec.key} vs {attack_spec.key}: attack keys") as bar:
        for j in range(qd.attack_keys):
            det.reset()
            rows.append(run_key(ctx, det, spec.key, attack_spec, j))
            bar.advance(1)
    metrics = _detection_metrics(rows, qd.attack_budget)
    metrics.update(_evasion_metrics(rows) if category == "evasion" else _extraction_metrics(rows))
    metrics["benign_false_alarm_rate"] = proportion(
        sum(int(round(v["value"] * v["n"])) for v in benign.values()), 2 * qd.benign_keys)
    metrics["benign_false_alarm_rate_in_order"] = benign["in_order"]
    metrics["benign_false_alarm_rate_bursts"] = benign["bursts"]
    metrics["threshold"] = scalar(float(det.threshold_ if hasattr(det, "threshold_") else det.delta_))
    keys = [{k: v for k, v in r.items() if k != "images"} | ({"images": len(r["images"])} if "images" in r else {})
            for r in rows]
    notes = [f"{qd.attack_keys} attack keys x {qd.attack_budget} queries, {2 * qd.benign_keys} benign keys x "
             f"{qd.benign_queries} queries (half in order, half retry bursts); threshold calibrated on training-split "
             "streams for the detector's fpr",
             "attack_success_rate_after assumes the service blocks a key at its first flag; a per-key detector does "
             "not see an attacker who spreads the queries over many keys"]
    return {"metrics": metrics, "keys": keys, "notes": notes, "artifacts": {}}


defend_query_detector.not_applicable = not_applicable  # type: ignore[attr-defined]  # read by plan_defenses
