"""The rollout checks: the probe set run through the stable and the canary version's full defended pipelines
(preprocessors, detectors, model, postprocessors, exactly as a request), compared pair by pair.

Outcomes per probe: clean probe correct = answered (not rejected) with its label; adversarial probe robust =
rejected or answered with its label; triggered probe attack success = answered with the backdoor's target.
Each check compares a one-sided bound (decide/paired.py) with its limit: in ``evidence`` mode a check fails when
even the bound most favourable to the canary is past the limit; in ``non_inferiority`` mode it passes only when
the least favourable one is within it, fails when even the most favourable one is past it, and otherwise holds
(too little evidence: the controller stays at the current step, ``verdict``). Latency is no proportion: the canary's p99 over single-image probe calls (interleaved with
the stable version's, alternating which goes first) against ``latency_p99_ratio`` x the stable p99 (or
``latency_slack_s`` above it); in ``evidence`` mode the canary's side is the distribution-free lower bound of its
p99 (order statistics), so one timer spike does not roll a release back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from safedl.decide.paired import paired_difference, proportion_bounds
from safedl.deploy.probes import ProbeSet
from safedl.serve.rollout.config import Checks

LATENCY_SAMPLES = 64  # single-image calls per version per evaluation


@dataclass(frozen=True)
class ProbeRun:
    """One version's answers on the probe set: labels, rejected flags, per-call latencies, failures."""

    labels: torch.Tensor
    rejected: torch.Tensor
    latencies: list[float]
    errors: int
    calls: int


def run_probes(decide: Callable[[torch.Tensor], Any], ps: ProbeSet, *, batch: int = 64) -> ProbeRun:
    """``decide`` (a full pipeline's, under its model lock) over the probe set in batches (a batch that raises
    counts as failed calls and its images as wrong answers)."""
    labels, rejected, errors, calls = [], [], 0, 0
    for i in range(0, len(ps), batch):
        x = ps.x[i:i + batch]
        calls += 1
        try:
            d = decide(x)
            labels.append(d.labels.cpu().long())
            rejected.append(d.rejected.cpu().bool())
        except Exception:  # noqa: BLE001 - a failing version is measured, not propagated
            errors += 1
            labels.append(torch.full((x.shape[0],), -1, dtype=torch.long))
            rejected.append(torch.zeros(x.shape[0], dtype=torch.bool))
    return ProbeRun(torch.cat(labels), torch.cat(rejected), [], errors, calls)


def latencies(decides: dict[str, Callable[[torch.Tensor], Any]], ps: ProbeSet, *,
              samples: int = LATENCY_SAMPLES) -> dict[str, list[float]]:
    """Seconds per single-image call of each version, interleaved (both see the same load)."""
    out: dict[str, list[float]] = {k: [] for k in decides}
    order = list(decides.items())
    for i in range(min(samples, len(ps))):
        for name, decide in (order if i % 2 == 0 else order[::-1]):  # alternating: neither always runs second
            t0 = time.perf_counter()
            try:
                decide(ps.x[i:i + 1])
            except Exception:  # noqa: BLE001 - counted by run_probes
                pass
            out[name].append(time.perf_counter() - t0)
    return out


def p99(values: list[float]) -> float | None:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), 0.99)) if values else None


def quantile_lower_bound(values: list[float], *, q: float = 0.99, confidence: float = 0.95) -> float:
    """A distribution-free one-sided lower ``confidence`` bound of the ``q`` quantile: the order statistic
    X_(k) with the largest k such that P(Binomial(n, q) >= k) >= confidence (so one timer spike in n samples does
    not decide it); the smallest sample when no k qualifies."""
    from scipy.stats import binom

    xs = sorted(values)
    n = len(xs)
    ks = [k for k in range(1, n + 1) if binom.sf(k - 1, n, q) >= confidence]
    return xs[(max(ks) if ks else 1) - 1]


def verdict(lower: float, upper: float, limit: float, cfg: Checks) -> str:
    """``pass``, ``fail`` or ``hold`` of a statistic whose larger values are worse. ``evidence``: fail when the
    near bound is past the limit, else pass. ``non_inferiority``: pass when the far bound is within the limit, fail
    when even the near bound is past it, else hold (too little evidence either way: stay at the current step)."""
    if lower > limit:
        return "fail"
    if cfg.mode == "evidence" or upper <= limit:
        return "pass"
    return "hold"


def insufficient(n: int) -> str:
    return f"insufficient evidence, n={n}: held at this step (not rolled back, not promoted)"


def _check(name: str, stat: dict, limit: float, cfg: Checks, *, note: str | None = None) -> dict[str, Any]:
    """Pass/fail/hold of a statistic whose larger values are worse, against ``limit``."""
    if not stat["n"]:
        return {"check": name, "passed": True, "hold": False, "value": None, "bound": None, "limit": limit, "n": 0,
                "note": note or "no probes of this kind: not checked"}
    bound = stat["lower"] if cfg.mode == "evidence" else stat["upper"]
    v = verdict(stat["lower"], stat["upper"], limit, cfg)
    if v == "hold":
        note = "; ".join(filter(None, [insufficient(stat["n"]), note]))
    return {"check": name, "passed": v == "pass", "hold": v == "hold", "value": stat["value"], "bound": bound,
            "limit": limit, "n": stat["n"], "note": note}


def _drop(stable_ok: torch.Tensor, canary_ok: torch.Tensor, cfg: Checks) -> dict:
    return paired_difference(stable_ok, canary_ok, confidence=cfg.confidence)


def live_check(stable: torch.Tensor, canary: torch.Tensor, cfg: Checks, *, note: str) -> dict[str, Any]:
    """``live_robust_accuracy_drop``: stable - canary robust accuracy under the live attack (serve/rollout/live.py),
    paired on the same probes."""
    return _check("live_robust_accuracy_drop", _drop(stable, canary, cfg), cfg.live_robust_accuracy_drop, cfg,
                  note=note)


def evaluate(ps: ProbeSet, stable: ProbeRun, canary: ProbeRun, lat: dict[str, list[float]], *, cfg: Checks,
             traffic: tuple[int, int] = (0, 0)) -> list[dict[str, Any]]:
    """Every check of one evaluation (``traffic``: the canary's (5xx, requests) since it started)."""
    y, target = ps.y, ps.target
    clean, adv, trig = ps.mask("clean"), ps.mask("adversarial"), ps.mask("triggered")
    note = None if len(ps) >= cfg.min_probes else f"{len(ps)} probe images (fewer than min_probes {cfg.min_probes})"

    def ok_clean(r: ProbeRun) -> torch.Tensor:
        return (~r.rejected & (r.labels == y))[clean]

    def robust(r: ProbeRun) -> torch.Tensor:
        return (r.rejected | (r.labels == y))[adv]

    def hit(r: ProbeRun) -> torch.Tensor:
        return (~r.rejected & (r.labels == target))[trig & (y != target)]

    errors, calls = canary.errors + traffic[0], canary.calls + len(lat.get("canary", [])) + traffic[1]
    disagree = (canary.labels != stable.labels) | (canary.rejected != stable.rejected)
    checks = [
        _check("error_rate", proportion_bounds(errors, calls, confidence=cfg.confidence), cfg.error_rate, cfg),
        _check("clean_accuracy_drop", _drop(ok_clean(stable), ok_clean(canary), cfg), cfg.clean_accuracy_drop,
               cfg, note=note),
        _check("robust_accuracy_drop", _drop(robust(stable), robust(canary), cfg), cfg.robust_accuracy_drop, cfg,
               note=note),
        _check("backdoor_asr_increase", paired_difference(hit(canary), hit(stable), confidence=cfg.confidence),
               cfg.backdoor_asr_increase, cfg, note=note),
        _check("disagreement", proportion_bounds(int(disagree[clean].sum()), int(clean.sum()),
                                                 confidence=cfg.confidence), cfg.disagreement, cfg, note=note),
    ]
    return [_latency_check(lat, cfg)] + checks


def _latency_check(lat: dict[str, list[float]], cfg: Checks) -> dict[str, Any]:
    """Canary p99 against the stable p99 x ratio (or + slack): fails when the canary p99's distribution-free lower
    bound is past the limit; ``non_inferiority`` passes only when its point estimate is within it (else holds)."""
    s, c = p99(lat.get("stable", [])), p99(lat.get("canary", []))
    if s is None or c is None:
        return {"check": "latency_p99", "passed": True, "hold": False, "value": c, "bound": None, "limit": None,
                "n": 0, "note": "no latency samples"}
    limit = max(cfg.latency_p99_ratio * s, s + cfg.latency_slack_s)
    lower = quantile_lower_bound(lat["canary"], confidence=cfg.confidence)
    v = verdict(lower, c, limit, cfg)
    note = f"stable p99 {s:.6f} s" + (f"; {insufficient(len(lat['canary']))}" if v == "hold" else "")
    return {"check": "latency_p99", "passed": v == "pass", "hold": v == "hold", "value": c,
            "bound": lower if cfg.mode == "evidence" else c, "limit": limit, "n": len(lat["canary"]), "note": note}
