"""Compare model versions evaluated on the same test images: per metric the difference, a paired test and a verdict.

Every later run is compared with the first (the reference). A metric with a per-image record in both runs
(``per_image`` in results.json: the baseline's and poisoned models' clean correctness, each evasion attack's robust
images, each poisoning attack's hits on its aimed inputs) is tested with the exact McNemar test on the discordant
pairs (McNemar 1947; the exact binomial form, Fagerland et al. 2013); a metric without one (defense entries) with
Fisher's exact test on the two proportions, labelled "unpaired"; so is every metric when the runs' test splits
differ (same data set, another split seed: fix ``dataset.split_seed`` to compare on the same images). The p-values of one comparison are adjusted with
Holm's step-down method (Holm 1979), so the chance of calling any metric changed when none is stays below ``alpha``.
Verdict: "better" / "worse" (by the metric's direction) when the adjusted p < alpha, else "no significant change".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from safedl.errors import UserError
from safedl.utils.bits import unpack

ALPHA = 0.05
NO_CHANGE = "no significant change"
FIELD = "baseline.field_accuracy"  # on dataset.field_test, compared only between runs on the same field set


@dataclass
class Metric:
    key: str
    value: dict[str, Any]
    higher_is_better: bool
    per_image: Optional[torch.Tensor]


def _m(metrics: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    m = metrics.get(name)
    return m if isinstance(m, dict) and m.get("value") is not None and m.get("n") else None


def _bits(entry: dict[str, Any], name: str) -> Optional[torch.Tensor]:
    rec = (entry.get("per_image") or {}).get(name)
    return unpack(rec) if isinstance(rec, dict) else None


def run_metrics(results: dict[str, Any]) -> dict[str, Metric]:
    """Every comparable proportion of a run, keyed ``baseline.clean_accuracy``, ``pgd.robust_accuracy``, ..."""
    out: dict[str, Metric] = {}

    def add(key: str, m: Optional[dict], higher: bool, bits: Optional[torch.Tensor]) -> None:
        if m is not None:
            out[key] = Metric(key, m, higher, bits if bits is not None and len(bits) == m["n"] else None)

    base = results.get("baseline", {})
    add("baseline.clean_accuracy", _m(base.get("metrics", {}), "clean_accuracy"), True, _bits(base, "clean_correct"))
    add(FIELD, _m(base.get("metrics", {}), "field_accuracy"), True, _bits(base, "field_correct"))
    for a in results.get("attacks", []):
        m = a.get("metrics", {})
        if a.get("category") == "evasion":
            add(f"{a['id']}.robust_accuracy", _m(m, "robust_accuracy"), True, _bits(a, "robust"))
            continue
        add(f"{a['id']}.clean_accuracy", _m(m, "clean_accuracy"), True, _bits(a, "clean_correct"))
        for name in ("attack_success_rate", "targeted_success_rate"):
            add(f"{a['id']}.{name}", _m(m, name), False, _bits(a, "hit"))
    for d in results.get("defenses", []):
        m, label = d.get("metrics", {}), f"{d['id']} vs {d['against']}"
        for name, higher in (("robust_accuracy", True), ("clean_accuracy", True), ("clean_accuracy_after", True),
                             ("attack_success_rate_after", False)):
            add(f"{label}.{name}", _m(m, name), higher, None)
    return out


def mcnemar_exact(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """(images only A got right, images only B got right, two-sided exact p)."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def fisher_p(ma: dict[str, Any], mb: dict[str, Any]) -> float:
    from scipy.stats import fisher_exact

    ka, kb = round(ma["value"] * ma["n"]), round(mb["value"] * mb["n"])
    return float(fisher_exact([[ka, ma["n"] - ka], [kb, mb["n"] - kb]]).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adj, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adj[i] = running
    return adj


def _hashes(results: dict[str, Any]) -> dict[str, Any]:
    return (results.get("data") or {}).get("hashes") or {}


def _same_test_images(ref: dict[str, Any], new: dict[str, Any], names: tuple[str, str]) -> bool:
    """True when both runs hold the same test split (paired tests allowed); refuses different data sets."""
    da, db = ref.get("data") or {}, new.get("data") or {}
    for key in ("name", "shape", "num_classes"):
        if key in da and key in db and da[key] != db[key]:
            raise UserError(f"{names[0]} and {names[1]} assess different data ({key}: {da[key]!r} vs {db[key]!r}); "
                            "compare runs of model versions on the same data set")
    ha, hb = da.get("hashes", {}).get("test"), db.get("hashes", {}).get("test")
    return bool(ha) and ha == hb


def compare_pair(ref: dict[str, Any], new: dict[str, Any], *, names: tuple[str, str] = ("A", "B"),
                 alpha: float = ALPHA) -> list[dict[str, Any]]:
    """One row per metric both runs measured: values, difference (B - A), test, p, Holm-adjusted p, verdict."""
    paired = _same_test_images(ref, new, names)
    same_field = _hashes(ref).get("field") == _hashes(new).get("field")  # dataset.field_test: its own images
    ma, mb = run_metrics(ref), run_metrics(new)
    rows = []
    for key in [k for k in ma if k in mb]:
        a, b = ma[key], mb[key]
        if key == FIELD and not same_field:
            continue  # accuracies on different field sets say nothing about the change
        row = {"metric": key, "a": a.value, "b": b.value, "diff": float(b.value["value"]) - float(a.value["value"]),
               "higher_is_better": a.higher_is_better}
        pair = same_field if key == FIELD else paired
        if pair and a.per_image is not None and b.per_image is not None and len(a.per_image) == len(b.per_image):
            only_a, only_b, p = mcnemar_exact(a.per_image, b.per_image)
            row.update(test="McNemar exact (paired)", discordant={"only_a": only_a, "only_b": only_b}, p=p)
        else:
            why = "no per-image record" if pair else "different test images (set dataset.split_seed to pair)"
            row.update(test=f"Fisher exact (unpaired: {why})", p=fisher_p(a.value, b.value))
        rows.append(row)
    for row, p_adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = p_adj
        up = row["diff"] > 0
        row["verdict"] = NO_CHANGE if p_adj >= alpha or row["diff"] == 0 else (
            "better" if up == row["higher_is_better"] else "worse")
    return rows


def compare_runs(runs: list[tuple[str, dict[str, Any]]], *, alpha: float = ALPHA) -> dict[str, Any]:
    """Every run after the first against the first; ``regressions`` lists each metric that got significantly worse."""
    if len(runs) < 2:
        raise UserError("compare needs at least two run directories")
    ref_name, ref = runs[0]
    comparisons = [{"run": name, "rows": compare_pair(ref, res, names=(ref_name, name), alpha=alpha)}
                   for name, res in runs[1:]]
    regressions = [f"{c['run']}: {r['metric']} {r['a']['value']:.4f} -> {r['b']['value']:.4f} "
                   f"(p_holm={r['p_holm']:.3g})" for c in comparisons for r in c["rows"] if r["verdict"] == "worse"]
    return {"reference": ref_name, "runs": [n for n, _ in runs], "alpha": alpha, "comparisons": comparisons,
            "regressions": regressions, "method": __doc__.split("\n\n", 1)[1].strip()}
