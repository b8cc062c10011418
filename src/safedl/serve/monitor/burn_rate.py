"""Service SLOs of ``safedl serve`` as multi-window, multi-burn-rate Prometheus alerts (Google SRE Workbook,
"Alerting on SLOs", ch. 5: alert when the error budget burns 14.4x too fast over 1 h *and* 5 min — 2% of a 30-day
budget in an hour: page — or 6x too fast over 6 h *and* 30 min — 5% in six hours: ticket; the short window makes
the alert stop soon after the burn does).

A service SLO file (``safedl monitor slo-rules FILE``)::

    period_days: 30
    objectives:
      - name: availability        # share of predict requests not answered 5xx
        sli: availability
        target: 0.999
      - name: latency             # share of predict requests answered within threshold_s
        sli: latency
        threshold_s: 0.25         # one of the latency histogram's bucket bounds
        target: 0.99

The error ratio of each objective is recorded over 5m, 30m, 1h and 6h (``safedl:slo_errors:ratio_rate<w>``,
labelled ``slo``), and two alerts per objective compare it with ``factor x (1 - target)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prometheus_client.utils import floatToGoString

from safedl.errors import UserError
from safedl.serve.metrics import LATENCY_BUCKETS
from safedl.serve.monitor.config import field_path

PREDICT = "/v1/predict"
WINDOWS = ("5m", "30m", "1h", "6h")
# (alert suffix, long window, short window, burn factor, severity): the workbook's page and ticket alerts for a
# 30-day budget; the factors scale with the period so the budget share stays 2% / 5%
BURNS = (("FastBurn", "1h", "5m", 14.4, "critical"), ("SlowBurn", "6h", "30m", 6.0, "warning"))


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    sli: Literal["availability", "latency"]
    target: float = Field(gt=0.0, lt=1.0)
    threshold_s: Optional[float] = None
    description: Optional[str] = None

    @model_validator(mode="after")
    def _threshold(self) -> "Objective":
        if self.sli == "latency":
            if self.threshold_s not in LATENCY_BUCKETS:
                raise ValueError(f"threshold_s must be one of the latency buckets "
                                 f"{', '.join(f'{b:g}' for b in LATENCY_BUCKETS)} (got {self.threshold_s!r})")
        elif self.threshold_s is not None:
            raise ValueError("threshold_s belongs to a latency objective only")
        return self


class ServiceSLO(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    period_days: float = Field(30.0, ge=1.0, le=365.0)
    objectives: list[Objective] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "ServiceSLO":
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique (got {', '.join(names)})")
        return self


def load_service_slo(path: str | Path) -> ServiceSLO:
    """Read and validate a service SLO file; UserError (exit 2) naming the file, the key and the value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such SLO file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return ServiceSLO.model_validate(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"{path}: {field_path(err['loc'])} = {json.dumps(err.get('input'), default=str)[:120]}: {err['msg']}") from None


def _error_ratio(o: Objective, window: str) -> str:
    sel = f'endpoint="{PREDICT}"'
    if o.sli == "availability":
        bad = f'sum by (instance, job) (rate(safedl_requests_total{{{sel},status=~"5.."}}[{window}]))'
        total = f"sum by (instance, job) (rate(safedl_requests_total{{{sel}}}[{window}]))"
        return f"{bad} / {total}"
    total = f"sum by (instance, job) (rate(safedl_request_latency_seconds_count{{{sel}}}[{window}]))"
    fast = (f'sum by (instance, job) (rate(safedl_request_latency_seconds_bucket{{{sel},le="{floatToGoString(o.threshold_s)}"}}'
            f"[{window}]))")
    return f"({total} - {fast}) / {total}"


def _alert(o: Objective, slo: ServiceSLO, suffix: str, long: str, short: str, factor: float, severity: str) -> dict:
    scaled = factor * slo.period_days / 30.0  # the same budget share burnt per window for another period
    bound = round(scaled * (1.0 - o.target), 10)
    metric = "safedl:slo_errors:ratio_rate"
    return {"alert": f"SafedlSLO{suffix}_{o.name}",
            "expr": f'{metric}{long}{{slo="{o.name}"}} > {bound:g} and {metric}{short}{{slo="{o.name}"}} > {bound:g}',
            "labels": {"severity": severity, "slo": o.name},
            "annotations": {
                "summary": f"SLO {o.name} ({o.sli}, target {o.target:g}): error budget burning {scaled:g}x too "
                           f"fast over {long} and {short}",
                "runbook_url": f"docs/runbook.md#slo-burn-rate-{suffix.lower()}"}}


def burn_rate_rules(slo: ServiceSLO) -> dict:
    """The Prometheus rule file (as a dict) for ``slo``."""
    records = [{"record": f"safedl:slo_errors:ratio_rate{w}", "expr": _error_ratio(o, w), "labels": {"slo": o.name}}
               for o in slo.objectives for w in WINDOWS]
    alerts = [_alert(o, slo, *burn) for o in slo.objectives for burn in BURNS]
    return {"groups": [{"name": "safedl-slo-error-ratios", "rules": records},
                       {"name": "safedl-slo-burn-rate", "rules": alerts}]}


def render_rules(slo: ServiceSLO, *, source: str) -> str:
    """``burn_rate_rules`` as YAML, with a header naming the SLO file it came from."""
    head = (f"# Generated by `safedl monitor slo-rules {source}`: do not edit; change the SLO file and regenerate.\n"
            "# Multi-window burn-rate alerts (SRE Workbook ch. 5); promtool-tested by tests/test_serve_monitor_burn_rate.py.\n")
    return head + yaml.safe_dump(burn_rate_rules(slo), sort_keys=False, width=200)
