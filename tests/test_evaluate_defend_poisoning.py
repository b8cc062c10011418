"""The poisoning/backdoor defense stage handlers produce results-contract entries scored against ground truth."""
from __future__ import annotations

import json

import pytest
import torch

from _poison_planted import TARGET, fresh, plant_backdoor, trigger
from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.evaluate.base import AttackOutcome
from safedl.run.handlers import get_defense_handler
from safedl.models import TrainRecipe
from safedl.profile import DefenseSpec, Profile


@pytest.fixture(scope="module")
def ctx_outcome(digits_splits, tiny_model, tmp_path_factory):
    profile = Profile(training=TrainRecipe(epochs=8, batch_size=64, lr=3e-3, augment="none"))
    ctx = RunContext(profile=profile, splits=digits_splits, device=torch.device("cpu"),
                     run_dir=tmp_path_factory.mktemp("run"), baseline=tiny_model,
                     build_fresh=lambda: fresh(digits_splits))
    p = plant_backdoor(digits_splits.train, 0.1)
    m = ctx.train_like_baseline(p)
    keep = digits_splits.test.y != TARGET
    state = {"poisoned": p, "model_state": m.state_dict(), "attack": None, "target_class": TARGET,
             "test_triggered_x": trigger(digits_splits.test.x[keep]), "test_triggered_y": digits_splits.test.y[keep]}
    outcome = AttackOutcome(entry={"name": "planted", "id": "planted", "category": "backdoor"}, state=state)
    return ctx, outcome


def _run(ctx, outcome, kind, name, **params):
    spec = DefenseSpec(name=name, params=params)
    handler = get_defense_handler(kind, "backdoor")
    entry = handler(ctx, spec, [registry.create(kind, name, **params)], outcome)
    json.dumps(entry)  # JSON-serialisable
    for label, rel in entry.get("artifacts", {}).items():
        assert (ctx.run_dir / rel).is_file(), label
    return entry


def test_cleanser_entry_scored_against_ground_truth(ctx_outcome):
    ctx, outcome = ctx_outcome
    e = _run(ctx, outcome, "cleanser", "spectral_signatures")
    det = e["metrics"]["detection"]
    assert det["tpr"]["value"] >= 0.9 and det["fpr"]["value"] <= 0.05
    assert det["tpr"]["n"] == outcome.state["poisoned"].n_poison and len(det["fpr"]["ci95"]) == 2
    assert det["auroc"]["value"] > 0.9 and "f1" in det and "precision" in det
    assert e["metrics"]["attack_success_rate_after"]["value"] < 0.2
    assert e["metrics"]["clean_accuracy_after"]["value"] > 0.85
    assert {"flagged samples (highest scores)", "outlier scores per class"} <= set(e["artifacts"])
    assert e["per_class"]["true_poison"][TARGET] == outcome.state["poisoned"].n_poison


def test_repair_detector_inspector_trainer_entries(ctx_outcome):
    ctx, outcome = ctx_outcome
    rep = _run(ctx, outcome, "repair", "pruning", pruning_ratio=0.25)
    assert {"clean_accuracy_after", "attack_success_rate_after", "attack_success_rate_before"} <= set(rep["metrics"])
    det = _run(ctx, outcome, "detector", "strip", fpr=0.05)
    assert det["metrics"]["detection"]["tpr"]["value"] >= 0.9
    assert det["metrics"]["detection"]["fpr"]["value"] <= 0.12
    insp = _run(ctx, outcome, "inspector", "model_inspection")
    assert "weight histograms per layer" in insp["artifacts"]
    pcm = _run(ctx, outcome, "inspector", "per_class_monitoring")
    assert len(pcm["per_class"]["per_class_accuracy"]) == len(pcm["per_class"]["per_class_accuracy_reference"]) == 10
    tr = _run(ctx, outcome, "trainer", "robust_loss", loss="label_smoothing")
    assert tr["metrics"]["clean_accuracy_after"]["n"] == len(ctx.splits.test)


def test_neural_cleanse_entry_flags_the_target_and_shows_its_index(ctx_outcome):
    ctx, outcome = ctx_outcome
    e = _run(ctx, outcome, "repair", "neural_cleanse", steps=40, batch_size=64, early_stop_patience=10)
    assert e["metrics"]["target_class_flagged"]["value"] == 1.0
    note = next(n for n in e["notes"] if n.startswith(f"anomaly index of class {TARGET} (log_l1)"))
    assert float(note.split(": ")[1].split(" ")[0]) > 2.0
    assert e["metrics"]["attack_success_rate_after"]["value"] < e["metrics"]["attack_success_rate_before"]["value"]
    assert "reverse-engineered triggers" in e["artifacts"]
