"""The report is rendered from results.json alone: metric formatting and per-class tables."""
from __future__ import annotations

from safedl.report.render import _per_class, fmt_metric, to_markdown


def test_metric_prints_value_interval_and_n():
    assert fmt_metric({"value": 0.5, "ci95": [0.4, 0.6], "n": 100}) == "0.500 [0.400, 0.600] (n=100)"
    assert fmt_metric({"value": None, "n": 3}) == "n/a"
    assert fmt_metric({"value": float("nan")}) == "n/a"


def test_per_class_counts_print_as_integers_and_rates_as_fractions():
    (kind, header, rows), = _per_class({"flagged": [559.0, 9.0], "clean_accuracy": [1.0, 0.97]})
    assert kind == "table" and header == ["class", "flagged (per class)", "clean_accuracy (per class)"]
    assert rows == [["0", "559", "1.000"], ["1", "9", "0.970"]]
    md = to_markdown([("table", header, rows)])
    assert "| 0 | 559 | 1.000 |" in md
