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
    assert row["target_met"] is grid.target_met(cell, best) is not None  # the target applies to this cell
    # without trusted data the rule falls back to "the smaller mode is poison" and does worse (warned in reports)
    assert max(d["none"]["tpr"]["value"] for d in row["detectors"].values()) < best["tpr"]["value"]


def _rates(tpr: float, fpr: float, asr_after: float | None) -> dict:
    best = {"tpr": {"value": tpr}, "fpr": {"value": fpr}}
    if asr_after is not None:
        best["asr_after"] = {"value": asr_after}
    return best


@pytest.mark.parametrize("rate,mapping,tpr,fpr,asr_after,met", [
    (0.1, "all_to_one", 0.9, 0.05, 0.05, True),      # every target exactly at its bound
    (0.1, "all_to_one", 0.89, 0.0, 0.0, False),      # recall just short of 90%
    (0.1, "all_to_one", 1.0, 0.051, 0.0, False),     # false positives just over 5%
    (0.1, "all_to_one", 1.0, 0.0, 0.06, False),      # the backdoor survives retraining
    (0.2, "all_to_one", 0.95, 0.01, 0.01, True),
    (0.25, "all_to_one", 1.0, 0.0, 0.0, None),       # poison rates outside 5-20%: no target
    (0.1, "all_to_all", 1.0, 0.0, 0.0, None),        # the target is for one-target backdoors
    (0.1, "all_to_one", 1.0, 0.0, None, None),       # no retraining measured: nothing to judge
])
def test_target_is_the_documented_one(grid, rate, mapping, tpr, fpr, asr_after, met):
    """The bench's published target (TPR >= 0.9, FPR <= 0.05, ASR after retraining <= 0.05, for one-target
    backdoors at 5-20% poison), checked on planted numbers at and just past each bound."""
    cell = grid.Cell("digits", 0, "random_patch", rate, mapping, 3)
    assert grid.target_met(cell, _rates(tpr, fpr, asr_after)) is met


def test_all_to_all_cell_measures_asr_on_every_test_image(grid):
    cell = grid.Cell("digits", 0, "checkerboard", 0.1, "all_to_all", 3)
    row = grid.run_cell(cell, trusted=["val"], retrain="none", before_split=False)
    assert row["target"] is None and row["target_met"] is None
    assert row["asr_before"]["n"] == 360  # every test image aims at its label + 1


def test_extra_rows_neural_cleanse_strip_fine_pruning(grid):
    """The rows beside SS/AC on a target (3) and data set (digits) the defaults were not chosen on: Neural Cleanse
    reports both anomaly indices (ours: log L1; the paper's: L1) and names the target; STRIP and fine-pruning are
    scored on the same triggered test images."""
    cell = grid.Cell("digits", 0, "checkerboard", 0.1, "all_to_one", 3)
    row = grid.run_cell(cell, trusted=["val"], retrain="none", before_split=False,
                        extras=["neural_cleanse", "strip", "fine_pruning"])
    n_aimed, n_test = row["asr_before"]["n"], row["clean_accuracy"]["n"]
    nc = row["extra"]["neural_cleanse"]
    for space in ("log_l1", "l1"):
        assert len(nc[space]["index"]) == 10 and nc[space]["target_index"] == nc[space]["index"][3]
    assert nc["log_l1"]["target_flagged"] and nc["asr_after"]["n"] == n_aimed
    assert nc["asr_after"]["value"] < row["asr_before"]["value"]
    st = row["extra"]["strip"]
    assert st["tpr"]["n"] == n_aimed and st["fpr"]["n"] == n_test and st["asr_after"]["n"] == n_aimed
    fp = row["extra"]["fine_pruning"]
    assert set(fp) == {*grid.FINE_PRUNING_VARIANTS, "time_s"}
    assert fp["default"]["asr_after"]["value"] < fp["prune_only"]["asr_after"]["value"]  # fine-tuning does the work


def test_cells_dedupe_all_to_all_and_resume_from_the_out_file(grid, tmp_path):
    import argparse
    import json

    args = argparse.Namespace(data=["digits"], seeds=[0], triggers=["checkerboard"], rates=[0.1],
                              mappings=["all_to_one", "all_to_all"], targets=[0, 8])
    todo = grid.cells(args)
    assert [(c.mapping, c.target) for c in todo] == [("all_to_one", 0), ("all_to_one", 8), ("all_to_all", 0)]
    out = tmp_path / "grid.jsonl"
    out.write_text(json.dumps({**todo[1].row(), "poison_before_split": False}) + "\n")
    done = grid.done_keys(str(out))
    assert [grid.cell_key({**c.row(), "poison_before_split": False}) in done for c in todo] == [False, True, False]
    assert grid.cell_key({**todo[1].row(), "poison_before_split": True}) not in done


RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "poison_generalization.jsonl"


def _measured_settings(grid):
    """(setting keys, target held?, cell) of every measured cell with the data split after poisoning, per trusted
    setting; the keys come from the attack's own info and the trusted set's size, as in a run (``poison_setting``).
    Held: TPR >= 0.9 and FPR <= 0.05 for SS or AC, and ASR after retraining <= 0.05 where it was measured."""
    import json
    from functools import lru_cache

    import torch

    from safedl.data import load_builtin, stratified_split
    from safedl.data.dataset import Dataset
    from safedl.defenses.protocols import poison_setting

    @lru_cache(maxsize=None)
    def val_per_class(data: str, seed: int) -> float:
        val = stratified_split(load_builtin(data), test_fraction=0.2, val_fraction=0.1, seed=seed).val
        return len(val) / val.num_classes

    out = []
    for line in RESULTS.read_text().splitlines():
        row = json.loads(line)
        if row.get("clean_model") or row.get("poison_before_split"):
            continue
        side = 28 if row["data"] == "mnist5k" else 8
        tiny = Dataset(torch.rand(20, 1, side, side), torch.arange(20) % 10, 10, "tiny")
        cell = grid.Cell(row["data"], row["seed"], row["trigger"], row["rate"], row["mapping"], row["target"] or 0)
        info = grid.make_attack(cell, side).poison(tiny, generator=torch.Generator().manual_seed(0)).info
        for tname in ("val", "small", "none"):
            dets = [d[tname] for d in row["detectors"].values() if tname in d]
            if not dets:
                continue
            held = any(d["tpr"]["value"] >= 0.9 and d["fpr"]["value"] <= 0.05
                       and d.get("asr_after", {"value": 0.0})["value"] <= 0.05 for d in dets)
            per_class = {"val": val_per_class(row["data"], row["seed"]), "small": grid.SMALL_TRUSTED / 10,
                         "none": None}[tname]
            out.append((poison_setting(info, trusted=tname != "none", trusted_per_class=per_class), held,
                        (cell, tname)))
    return out


def test_known_weak_table_matches_the_measured_grid(grid):
    """The report's warnings (FEATURE_SPACE_KNOWN_WEAK) cover every measured failing cell, and each warning names a
    setting where a measured cell failed (bench/results/poison_generalization.jsonl, both data sets)."""
    from safedl.defenses.cleanse._common import FEATURE_SPACE_KNOWN_WEAK as WEAK

    measured = _measured_settings(grid)
    assert len(measured) >= 20 and any(held for _, held, _ in measured)
    unwarned = [where for keys, held, where in measured if not held and not keys & set(WEAK)]
    assert not unwarned, f"failing cells the report does not warn about: {unwarned}"
    for key in WEAK:
        assert any(key in keys and not held for keys, held, _ in measured), f"{key}: no measured failure"
