"""The whole-mode safeguard: a cleanser that removed a whole mode of a class is reported, poison removal is not."""
from __future__ import annotations

import torch

from safedl.evaluate.cleanse_safeguard import per_class_accuracy, whole_mode_classes, whole_mode_note

LABELS = torch.tensor([0] * 10 + [1] * 10)


def test_a_removed_mode_that_costs_its_class_its_accuracy_is_reported():
    flagged = torch.zeros(20, dtype=torch.bool)
    flagged[10:16] = True  # 6 of class 1's 10 samples
    found = whole_mode_classes(flagged=flagged, labels=LABELS, acc_before=[0.98, 0.95], acc_after=[0.97, 0.30])
    assert found == [{"class": 1, "flagged": 6, "n": 10, "accuracy_before": 0.95, "accuracy_after": 0.3}]
    note = whole_mode_note("isolate_cross_fit", found)
    assert "whole mode" in note and "class 1: 6 of its 10" in note and "0.950 -> 0.300" in note


def test_removing_poison_that_keeps_held_out_accuracy_is_not_reported():
    flagged = torch.zeros(20, dtype=torch.bool)
    flagged[10:16] = True  # half of the class, but its held-out accuracy stays: the flagged part was poison
    assert whole_mode_classes(flagged=flagged, labels=LABELS, acc_before=[0.98, 0.95], acc_after=[0.97, 0.93]) == []
    few = torch.zeros(20, dtype=torch.bool)
    few[10] = True  # one sample in ten (under 15%) is not a mode, whatever the accuracy did
    assert whole_mode_classes(flagged=few, labels=LABELS, acc_before=[0.98, 0.95], acc_after=[0.97, 0.30]) == []


def test_per_class_accuracy(digits_splits, tiny_model):
    acc = per_class_accuracy(tiny_model, digits_splits.test)
    assert len(acc) == 10 and all(0.5 < a <= 1.0 for a in acc)
