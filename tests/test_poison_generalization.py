"""Reduced generalization grid (bench/measure_poison_generalization.py): a trigger, target class and data set the
feature-space cleansers were not developed on (random-position noise patch, target 3, 8x8 digits)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "measure_poison_generalization.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("measure_poison_generalization", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_random_patch_cell_scored_against_ground_truth(grid):
    cell = grid.Cell("digits", 0, "random_patch", 0.1, "all_to_one", 3)
    row = grid.run_cell(cell, trusted=["val", "none"], retrain="best", before_split=False)
    n_poison, n_clean = row["n_poison"], row["n_train"] - row["n_poison"]
    assert n_poison == round(0.1 * row["n_train"])
    best = row["detectors"][row["best"]]["val"]
    for det in row["detectors"].values():
        for r in det.values():
            assert r["tpr"]["n"] == n_poison and r["fpr"]["n"] == n_clean and len(r["tpr"]["ci95"]) == 2
    # the poisoned class is found and most poison removed, with the trusted set; removing it lowers the ASR
    assert 3 in best["poisoned_classes"] and best["tpr"]["value"] - best["fpr"]["value"] > 0.5
    assert best["asr_after"]["value"] < row["asr_before"]["value"]
    assert row["target_met"] == (best["tpr"]["value"] >= 0.9 and best["fpr"]["value"] <= 0.05
                                 and best["asr_after"]["value"] <= 0.05)
    # without trusted data the rule falls back to "the smaller mode is poison" and does worse (warned in reports)
    assert max(d["none"]["tpr"]["value"] for d in row["detectors"].values()) < best["tpr"]["value"]


def test_all_to_all_cell_measures_asr_on_every_test_image(grid):
    cell = grid.Cell("digits", 0, "checkerboard", 0.1, "all_to_all", 3)
    row = grid.run_cell(cell, trusted=["val"], retrain="none", before_split=False)
    assert row["target"] is None and row["target_met"] is None
    assert row["asr_before"]["n"] == 360  # every test image aims at its label + 1
