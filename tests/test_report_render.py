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


def _m(v):
    return {"value": v, "ci95": [max(0.0, v - 0.05), min(1.0, v + 0.05)], "n": 100}


def test_summary_figures_compare_each_defense_with_the_undefended_system(tmp_path):
    from safedl.report.figures import summary_figures

    results = {
        "baseline": {"metrics": {"clean_accuracy": _m(0.98)}},
        "attacks": [{"id": "pgd", "category": "evasion", "metrics": {"robust_accuracy": _m(0.0)}},
                    {"id": "bd", "category": "backdoor",
                     "metrics": {"attack_success_rate": _m(1.0), "baseline": {"attack_success_rate": _m(0.01)}}}],
        "defenses": [{"id": "fs", "against": "pgd", "metrics": {"robust_accuracy": _m(0.7),
                                                                "robust_accuracy_nonadaptive": _m(0.8)}},
                     {"id": "ss", "against": "bd", "metrics": {"attack_success_rate_after": _m(0.0)}}],
    }
    figs = summary_figures(results, tmp_path)
    assert len(figs) == 4 and all((tmp_path / p).stat().st_size > 0 for p in figs.values())
    # no poisoning attack or defense: only the evasion figures
    results["attacks"] = results["attacks"][:1]
    results["defenses"] = results["defenses"][:1]
    assert sorted(summary_figures(results, tmp_path / "b")) == ["Accuracy under each evasion attack",
                                                                "Evasion defenses: robust accuracy"]
