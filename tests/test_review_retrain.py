"""Reviewed data back into training: ``dataset.extra`` grows only the training split (bad files refused naming the
entry), ``safedl retrain``'s replacement decision (gate and paired comparison), and issue 24's done-when end to end:
serve -> attack traffic rejected -> review queue -> label -> export -> retrain -> compare -> gate -> new bundle."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from safedl.cli import app as cli
from safedl.errors import DataError, ProfileError
from safedl.profile import parse_profile
from safedl.run.prepare import prepare
from safedl.run.retrain import decide_replacement, retrain_profile

BASE = {"name": "rv", "seed": 0, "dataset": {"name": "digits", "test_fraction": 0.2, "val_fraction": 0.1,
                                               "split_seed": 0},
        "model": {"arch": "tiny_cnn"}, "training": {"epochs": 1, "batch_size": 64, "lr": 0.003, "augment": "none"},
        "baseline_only": True}


def _npz(path, x, y):
    np.savez(path, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    return path


def test_dataset_extra_grows_only_the_training_split(tmp_path):
    plain, _, _ = prepare(parse_profile(BASE), base_dir=tmp_path)
    x = torch.rand(5, 1, 8, 8)
    _npz(tmp_path / "rev.npz", x, [1, 2, 3, 4, 5])
    prof = parse_profile({**BASE, "dataset": {**BASE["dataset"], "extra": [{"format": "npz", "path": "rev.npz"}]}})
    grown, _, _ = prepare(prof, base_dir=tmp_path)
    assert len(grown.train) == len(plain.train) + 5 and torch.equal(grown.train.x[-5:], x)
    assert grown.train.y[-5:].tolist() == [1, 2, 3, 4, 5]
    for part in ("val", "test"):
        assert grown.hashes()[part] == plain.hashes()[part]
    assert grown.hashes()["train"] != plain.hashes()["train"] and grown.mean == plain.mean
    _npz(tmp_path / "shape.npz", torch.rand(2, 1, 9, 9), [0, 1])
    _npz(tmp_path / "label.npz", torch.rand(2, 1, 8, 8), [0, 10])
    for name, match in (("shape.npz", r"dataset.extra\[0\].*shape \[1, 9, 9\].*\[1, 8, 8\]"),
                        ("label.npz", r"dataset.extra\[0\].*label 10 is not a class"),
                        ("missing.npz", "missing.npz: file not found")):
        p = parse_profile({**BASE, "dataset": {**BASE["dataset"], "extra": [{"path": name}]}})
        with pytest.raises(DataError, match=match):
            prepare(p, base_dir=tmp_path)
    with pytest.raises(ProfileError, match="extra"):
        parse_profile({**BASE, "dataset": {**BASE["dataset"], "extra": [{"format": "csv", "path": "a"}]}})
    again = retrain_profile(prof, [tmp_path / "rev.npz", tmp_path / "rev.npz"])
    assert len(again.dataset.extra) == 2  # relative "rev.npz" is not resolved yet; the absolute one is added once


def _results(correct: list[int], *, gate: dict) -> dict:
    from safedl.utils.bits import pack

    n = len(correct)
    m = {"value": sum(correct) / n, "ci95": [0.0, 1.0], "n": n}
    return {"data": {"name": "d", "shape": [1, 8, 8], "num_classes": 10, "hashes": {"test": "t"}},
            "baseline": {"metrics": {"clean_accuracy": m}, "per_image": {"clean_correct": pack(torch.tensor(correct,
                                                                                                 dtype=torch.bool))}},
            "attacks": [], "defenses": [], "gate": gate}


def test_replacement_needs_a_passed_configured_gate_and_no_regression():
    ok = {"passed": True, "configured": True, "failures": []}
    old = ("old", _results([1] * 90 + [0] * 10, gate=ok))
    same = ("new", _results([1] * 90 + [0] * 10, gate=ok))
    assert decide_replacement(old, same)["replace"] is True
    worse = ("new", _results([1] * 60 + [0] * 40, gate=ok))
    d = decide_replacement(old, worse)
    assert d["replace"] is False and d["reasons"][0].startswith("regression: new: baseline.clean_accuracy")
    failed = ("new", _results([1] * 90 + [0] * 10, gate={"passed": False, "configured": True,
                                                          "failures": ["min_clean_accuracy: 0.9 < 0.95"]}))
    assert decide_replacement(old, failed)["reasons"] == ["gate: min_clean_accuracy: 0.9 < 0.95"]
    unset = ("new", _results([1] * 90 + [0] * 10, gate={"passed": True, "configured": False, "failures": []}))
    assert "sets no threshold" in decide_replacement(old, unset)["reasons"][0]
