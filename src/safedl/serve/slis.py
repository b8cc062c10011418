"""Bundle SLIs: the robustness numbers a bundle's manifest carries (what the run measured for the deployed system)
as Prometheus gauges, set at start and replaced atomically on every bundle swap.

The SLIs follow the release gate's definitions (``safedl.assess.slo``, after Google's SRE book, ch. 4); the gauge
names, labels and meanings are listed in docs/metrics.md. A number the manifest does not hold is not exported (no
series), never exported as 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class BundleSLIs:
    """The SLIs of one bundle; dicts are keyed by attack id or detector name."""

    version: str
    defense: str
    clean_accuracy: float | None = None
    clean_accuracy_delta: float | None = None
    robust_accuracy: dict[str, float] = field(default_factory=dict)
    adversarial_success_rate: dict[str, float] = field(default_factory=dict)
    detection_precision: dict[str, float] = field(default_factory=dict)
    detection_recall: dict[str, float] = field(default_factory=dict)


def _value(m: Any) -> float | None:
    v = m.get("value") if isinstance(m, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _n(m: Any) -> int:
    n = m.get("n") if isinstance(m, dict) else None
    return int(n) if isinstance(n, (int, float)) else 0


def _most_precise(candidates: list[tuple[float, int]]) -> float | None:
    """The measurement with the largest n (the narrowest interval); among equals, the lowest value."""
    return min(candidates, key=lambda c: (-c[1], c[0]))[0] if candidates else None


def _defense_name(manifest: dict[str, Any]) -> str:
    run = manifest.get("run") or {}
    if "defense" in run:
        return str(run["defense"]) if run["defense"] else "none"
    names = [f"{c.get('name')}" for c in manifest.get("components") or []]
    return "+".join(names) or "none"


def _detection(m: dict[str, Any]) -> tuple[float | None, float | None]:
    """(precision, recall) of an evasion entry's detection metrics: the adaptive attack's when measured (as the
    release gate reads them), at each detector's own calibrated threshold. Precision is on the evaluation mix
    (the clean images and the adversarial ones that fool the model), from the counts behind tpr and fpr."""
    det = m.get("detection_adaptive") if isinstance(m.get("detection_adaptive"), dict) else m.get("detection")
    if not isinstance(det, dict):
        return None, None
    recall = _value(det.get("recall")) if _value(det.get("recall")) is not None else _value(det.get("tpr"))
    precision = _value(det.get("precision"))
    if precision is None and _value(det.get("tpr")) is not None and _value(det.get("fpr")) is not None:
        tp = round(_value(det["tpr"]) * _n(det["tpr"]))
        fp = round(_value(det["fpr"]) * _n(det["fpr"]))
        precision = tp / (tp + fp) if tp + fp else None
    return precision, recall


def bundle_slis(*, manifest: dict[str, Any], version: str) -> BundleSLIs:
    """The SLIs a manifest's ``metrics`` section holds.

    ``metrics`` maps an attack id to ``{"metrics": {...}}`` (the evasion entry or the defense entry the run measured
    for this system) and, in a baseline bundle, ``"baseline"`` to the baseline's metrics. Clean accuracy and its
    delta come from the measurement with the largest n; per-detector precision and recall are the worst over the
    attacks the bundle was evaluated against.
    """
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
    entries = {a: e["metrics"] for a, e in metrics.items()
               if a != "baseline" and isinstance(e, dict) and isinstance(e.get("metrics"), dict)}
    clean, delta = [], []
    base = metrics.get("baseline") if isinstance(metrics.get("baseline"), dict) else {}
    if _value(base.get("clean_accuracy")) is not None:
        clean.append((_value(base["clean_accuracy"]), _n(base["clean_accuracy"])))
    robust, success, precision, recall = {}, {}, {}, {}
    detectors = "+".join(str(c.get("name")) for c in manifest.get("components") or [] if c.get("kind") == "detector")
    for attack, m in entries.items():
        ca, cu = _value(m.get("clean_accuracy")), _value(m.get("clean_accuracy_undefended"))
        if ca is not None:
            clean.append((ca, _n(m["clean_accuracy"])))
            if cu is not None:
                delta.append((ca - cu, _n(m["clean_accuracy"])))
        ra = _value(m.get("robust_accuracy"))
        if ra is not None:
            robust[attack] = ra
        asr = _value(m.get("attack_success_rate"))
        if asr is not None:
            success[attack] = asr
        elif ra is not None:  # a defended system: defended = rejected or correct, so the rest got through wrong
            success[attack] = 1.0 - ra
        p, r = _detection(m)
        name = detectors or "detector"
        if p is not None:
            precision[name] = min(p, precision.get(name, p))
        if r is not None:
            recall[name] = min(r, recall.get(name, r))
    return BundleSLIs(version=version, defense=_defense_name(manifest), clean_accuracy=_most_precise(clean),
                      clean_accuracy_delta=_most_precise(delta), robust_accuracy=robust,
                      adversarial_success_rate=success, detection_precision=precision, detection_recall=recall)


class BundleSLICollector(Collector):
    """Exports the current bundle's SLIs; ``publish`` replaces them in one reference assignment, so a scrape sees
    either the old bundle's numbers or the new one's, never a mix."""

    def __init__(self) -> None:
        self._slis: BundleSLIs | None = None

    def publish(self, slis: BundleSLIs) -> None:
        self._slis = slis

    def describe(self) -> list:
        return []  # names only known per bundle; an empty description keeps the registry from calling collect early

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._slis
        if s is None:
            return
        info = GaugeMetricFamily("safedl_bundle_info", "the bundle being served (=1)", labels=["version", "defense"])
        info.add_metric([s.version, s.defense], 1.0)
        yield info
        for name, doc, value in (
                ("safedl_bundle_clean_accuracy", "measured clean accuracy of the deployed system", s.clean_accuracy),
                ("safedl_bundle_clean_accuracy_delta", "clean accuracy of the deployed system minus the undefended "
                                                       "model's, on the same images", s.clean_accuracy_delta)):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, label, values in (
                ("safedl_bundle_robust_accuracy", "measured robust accuracy per attack", "attack", s.robust_accuracy),
                ("safedl_bundle_adversarial_success_rate", "measured adversarial success rate per attack", "attack",
                 s.adversarial_success_rate),
                ("safedl_bundle_detection_precision", "measured detection precision per detector (worst attack)",
                 "detector", s.detection_precision),
                ("safedl_bundle_detection_recall", "measured detection recall per detector (worst attack)",
                 "detector", s.detection_recall)):
            if values:
                g = GaugeMetricFamily(name, doc, labels=[label])
                for k, v in sorted(values.items()):
                    g.add_metric([k], v)
                yield g
